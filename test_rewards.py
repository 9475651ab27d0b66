"""Tests of rewards.py: the math against hand-computed values or a second implementation, then the behaviour of
the reward models on tiny data that the tests write (models from the real cache, classifiers cached in tmp)."""
import json
import math

import numpy as np
import pytest
import torch

import assets
import rewards

# (statement, complex reflection, simple reflection, two non-reflections); written for these tests
STATEMENTS = [
    ("I failed my driving test for the third time and my friends all drive already.",
     "You feel embarrassed and left behind, because keeping up with your friends matters a lot to you.",
     "You failed the driving test again.", "Just book another one.", "What car do you want?"),
    ("My mum keeps reading my messages and I never get any privacy at home.",
     "It sounds like you feel trapped and distrusted, and you want to be treated as someone with a life of your own.",
     "Your mum reads your messages.", "She is your mum, she has the right.", "Do you like school?"),
    ("Since the layoffs I lie awake every night doing sums about the mortgage.",
     "The worry is following you into the night, and underneath it is fear of failing the people who rely on you.",
     "You are worried about the mortgage since the layoffs.", "Try a sleep app.", "Everyone has money problems."),
    ("I moved to a new city for this job and I have not made a single friend in six months.",
     "You sound lonely, and it hurts that a move meant to open doors has left you feeling shut out.",
     "You moved for work and have no friends yet.", "Join a gym, that is how people meet.", "Is the job good?"),
    ("My brother borrowed money from me again and acts like I'm mean for asking for it back.",
     "You feel used and a bit guilty at once, because you care about him but also want to be respected.",
     "Your brother borrowed money again.", "Stop lending him money.", "How old is he?"),
    ("Ever since the diagnosis people treat me like I'm made of glass.",
     "It seems you feel diminished by their caution, and what you want is to still be seen as yourself.",
     "People treat you differently since the diagnosis.", "They mean well, you should be grateful.",
     "What did the doctor say?"),
    ("I quit drinking two months ago and my old mates keep asking me out to the pub.",
     "You are proud of the change and also afraid of losing your friends, which makes each invitation a test.",
     "Your friends keep inviting you to the pub.", "Just have one, it won't hurt.", "Do you play football?"),
    ("My teacher said my essay was lazy in front of the whole class.",
     "You felt humiliated, and it stings all the more because you had actually put effort into it.",
     "Your teacher called your essay lazy.", "Teachers say things like that all the time.", "Which subject?"),
]


def write_counsel(path, statements, empathy_shift=0):
    """A tiny data set in the project's schema: levels 2, 1, 0, 0 with empathy labels that do not follow them."""
    with open(path, "w") as f:
        for i, (s, hi, mid, lo1, lo2) in enumerate(statements):
            resp = [{"text": hi, "type": "complex_reflection", "reflection": 2, "empathy": (2 + empathy_shift) % 3},
                    {"text": mid, "type": "simple_reflection", "reflection": 1, "empathy": 1},
                    {"text": lo1, "type": "advice", "reflection": 0, "empathy": 0},
                    {"text": lo2, "type": "closed_question", "reflection": 0, "empathy": None if i % 2 else 2}]
            f.write(json.dumps({"id": f"t{i}", "topic": "test", "prompt": s, "responses": resp}) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_counsel(d / "train.jsonl", STATEMENTS[:6])
    write_counsel(d / "valid.jsonl", STATEMENTS[6:])
    return d


@pytest.fixture(scope="module")
def clf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rewards_cache")


@pytest.fixture(scope="module")
def rm(data_dir, clf_cache):
    return rewards.load_reward_models(data_dir, cache_dir=clf_cache)


# ----------------------------------------------------------------------------------------------------------
# math: pure functions against hand-computed values or a second implementation

def test_distinct_2_hand_computed():
    # bigrams (a,b) (b,c) (a,b) (b,d): 3 distinct of 4; lower-cased; bigrams never cross two texts
    assert rewards.distinct_2(["a b c", "A B d"]) == pytest.approx(0.75)
    assert rewards.distinct_2(["x y", "y z"]) == pytest.approx(1.0)  # no (y, y) across the boundary
    assert rewards.distinct_2(["go go go go"]) == pytest.approx(1 / 3)
    assert rewards.distinct_2(["one", "", "  "]) == 0.0


def test_edit_rate_hand_computed():
    assert rewards.edit_rate("the cat sat", "the dog sat") == pytest.approx(1 / 3)  # one substitution
    assert rewards.edit_rate("a b c d", "a c d e") == pytest.approx(2 / 4)  # delete b, insert e
    assert rewards.edit_rate("I feel sad", "i FEEL sad") == 0.0  # lower-cased words
    assert rewards.edit_rate("a b", "") == 1.0
    assert rewards.edit_rate("", "") == 0.0
    assert rewards.edit_rate("x", "a b c x") == pytest.approx(3 / 4)


def test_nidf_and_specificity_hand_computed():
    # df: a 3, b 1, c 1 of N = 3 -> idf a 0, b = c = log 3 -> NIDF a 0, b = c 1
    table = rewards.nidf_table(["a b", "a c", "A."])
    assert table == pytest.approx({"a": 0.0, "b": 1.0, "c": 1.0})
    assert rewards.specificity("a b", table) == pytest.approx(0.5)
    assert rewards.specificity("a unseen", table) == pytest.approx(0.5)  # unseen word: max idf, NIDF 1
    assert rewards.specificity("  ", table) == 0.0


def test_expected_score():
    big = 50.0
    logits = torch.tensor([[big, 0, 0], [0, big, 0], [0, 0, big], [0, 0, 0]])
    assert torch.allclose(rewards.expected_score(logits), torch.tensor([0.0, 0.5, 1.0, 0.5]), atol=1e-6)


def test_fluency_mapping_is_the_papers():
    lp = torch.tensor([0.0, -math.log(25.0), -math.log(50.0), -1e6])  # ppl 1, 25, 50, huge
    assert torch.allclose(rewards.fluency_from_logprob(lp), torch.tensor([0.98, 0.5, 0.0, 0.0]), atol=1e-5)


def test_pair_features():
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    assert rewards.pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 1.0, 3.0, -2.0, 2.0, 3.0]]


def test_train_classifier_learns_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float() * 2
    a = rewards.train_classifier(x, y, seed=1, steps=200, lr=1e-2)
    b = rewards.train_classifier(x, y, seed=1, steps=200, lr=1e-2)
    assert (a(x).argmax(-1) == y).float().mean() > 0.95
    assert torch.equal(a(x), b(x))
    s = rewards.expected_score(a(x))
    assert s[y == 2].min() > s[y == 0].max()


def test_ranking_accuracy_hand_computed():
    class LengthScorer:  # score = number of words, so the expected accuracy can be worked out by hand
        def score(self, prompts, responses, objectives):
            return {objectives[0]: np.array([len(r.split()) for r in responses], dtype=float)}

    def rec(*responses):
        return {"prompt": "p", "responses": [{"text": t, "reflection": lv, "empathy": None} for t, lv in responses]}

    records = [rec(("w w w", 2), ("w", 0), ("w w w w", 0)),  # one of two pairs right: 0.5
               rec(("w w", 2), ("w", 0), ("w", 1)),  # right: 1.0
               rec(("w", 2), ("w", 1))]  # no level-0 response: skipped
    assert rewards.ranking_accuracy(LengthScorer(), records, "reflection") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="reflection, empathy"):
        rewards.ranking_accuracy(LengthScorer(), records, "fluency")


# ----------------------------------------------------------------------------------------------------------
# behaviour on the real (cached) models

PROMPTS = [s[0] for s in STATEMENTS[:4]] + [STATEMENTS[0][0]]
RESPONSES = [STATEMENTS[0][1], STATEMENTS[1][2], "ok", STATEMENTS[3][3] + " " + STATEMENTS[3][1], "What car?"]


def test_embed_is_unit_norm_and_batch_independent(rm):
    e = rewards.embed(rm.encoder, rm.enc_tok, RESPONSES)
    assert e.shape == (len(RESPONSES), 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(RESPONSES)), atol=1e-5)
    one = torch.cat([rewards.embed(rm.encoder, rm.enc_tok, [t]) for t in RESPONSES])
    assert torch.allclose(e, one, atol=1e-5)


def test_end_of_turn_is_what_the_template_appends(rm):
    assert rewards.end_of_turn(rm.lm_tok) == "<|im_end|>"


def test_mean_response_logprob_matches_a_plain_loop(rm):
    tok = rm.lm_tok
    prompts = [tok(assets.chat_prompt(tok, p), add_special_tokens=False).input_ids for p in PROMPTS[:3]]
    targets = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in RESPONSES[:3]]
    batched = rewards.mean_response_logprob(rm.lm, tok.pad_token_id, prompts, targets)
    for b, (p, t) in enumerate(zip(prompts, targets)):  # unpadded, full logits, explicit sum over the target
        with torch.no_grad():
            logp = rm.lm(input_ids=torch.tensor([p + t])).logits[0].log_softmax(-1)  # (T, V)
        ref = sum(logp[len(p) + j - 1, t[j]].item() for j in range(len(t))) / len(t)
        assert batched[b].item() == pytest.approx(ref, abs=1e-4)


def test_scores_in_unit_interval_and_batch_independent(rm):
    batch = rm.score(PROMPTS, RESPONSES)
    assert set(batch) == set(rewards.OBJECTIVES)
    for name, s in batch.items():
        assert s.shape == (len(RESPONSES),)
        assert np.all((s >= 0) & (s <= 1)) and not np.isnan(s).any(), name
    single = [rm.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)]
    for name in rewards.OBJECTIVES:
        np.testing.assert_allclose(batch[name], [s[name][0] for s in single], atol=1e-4, err_msg=name)
    assert batch["fluency"].max() > 0  # the mapping does not flatten everything to 0
    only = rm.score(PROMPTS, RESPONSES, ("empathy",))
    assert list(only) == ["empathy"] and np.allclose(only["empathy"], batch["empathy"])


def test_empty_responses_score_zero(rm):
    prompts = [STATEMENTS[0][0]] * 3
    responses = ["", "   \n", STATEMENTS[0][1]]
    s = rm.score(prompts, responses)
    m = rm.metrics(prompts, responses)
    for name, v in list(s.items()) + [(k, m[k]) for k in ("edit_rate", "coherence", "specificity")]:
        assert not np.isnan(v).any() and v[0] == 0 and v[1] == 0, name
    assert s["reflection"][2] > 0
    assert all(v.tolist() == [0.0] for v in rm.score(["x"], [" "]).values())


def test_unknown_objective_lists_known_ones(rm):
    with pytest.raises(ValueError, match="reflection, empathy, fluency"):
        rm.score(PROMPTS, RESPONSES, ("reflection", "politeness"))


def test_metrics_ranges(rm):
    m = rm.metrics(PROMPTS, RESPONSES)
    assert set(m) == set(rewards.METRICS) and isinstance(m["diversity2"], float)
    for k in ("edit_rate", "coherence", "specificity"):
        assert m[k].shape == (len(RESPONSES),) and np.all((m[k] >= 0) & (m[k] <= 1)), k
    same = rm.metrics([PROMPTS[0]], [PROMPTS[0]])
    assert same["coherence"][0] == pytest.approx(1.0, abs=1e-4) and same["edit_rate"][0] == 0.0
    # a copy of the statement is less specific than a response built from words never seen in training
    rare = rm.metrics([PROMPTS[0]], ["Zygomorphic quokkas juggle marmalade."])
    assert rare["specificity"][0] == pytest.approx(1.0)


def test_reflection_model_learns_its_training_data(rm, data_dir):
    records = assets.load_split("train", data_dir)
    assert rewards.ranking_accuracy(rm, records, "reflection") >= 0.8
    means = rewards.scores_by_level(rm, records, "reflection", ("reflection",))
    assert means[2]["reflection"] > means[1]["reflection"] > means[0]["reflection"]


def test_classifier_cache_reused_and_invalidated(rm, data_dir, clf_cache, monkeypatch):
    files = sorted(clf_cache.glob("*.pt"))
    assert [f.name.split("-")[0] for f in files] == ["empathy", "reflection"]
    assert not list(clf_cache.glob("*.tmp-*"))  # atomic writes leave no temp files

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache is valid")

    monkeypatch.setattr(rewards, "train_classifier", no_training)
    again = rewards.load_or_train_classifiers(data_dir, rm.encoder, rm.enc_tok, assets.DEFAULT_ENCODER, 0, clf_cache)
    x = torch.randn(5, 4 * 384)
    for label in rewards.LEARNED:
        assert torch.equal(again[label](x), rm.classifiers[label](x))

    changed = data_dir.parent / (data_dir.name + "-changed")
    changed.mkdir()
    write_counsel(changed / "train.jsonl", STATEMENTS[:6], empathy_shift=1)
    monkeypatch.undo()
    new = rewards.load_or_train_classifiers(changed, rm.encoder, rm.enc_tok, assets.DEFAULT_ENCODER, 0, clf_cache)
    assert len(list(clf_cache.glob("*.pt"))) == 4  # new keys for both labels
    assert not torch.equal(new["empathy"](x), rm.classifiers["empathy"](x))


def test_score_file_and_table(rm, tmp_path):
    good = tmp_path / "gen.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in zip(PROMPTS, RESPONSES)) + "\n")
    rows = rewards.score_file(good, rm)
    assert len(rows) == len(RESPONSES)
    assert set(rows[0]) == {"prompt", "response", *rewards.OBJECTIVES, "edit_rate", "coherence", "specificity"}
    table = rewards.format_table(rows)
    assert "reflection" in table and "mean" in table and len(table.splitlines()) == len(rows) + 2


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "line 2: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', "line 3: missing or non-string key(s) response"),
    ('[1, 2]\n', "line 1: missing"),
])
def test_score_file_errors_name_file_and_line(rm, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match="bad.jsonl") as err:
        rewards.score_file(path, rm)
    assert message in str(err.value)
