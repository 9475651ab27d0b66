"""The reward models r_k (reflection, empathy, fluency) and the evaluation-only metrics.

Paper: EMORL (Kong et al. 2025), the reward models of the experimental setup and the evaluation. Each objective k has
a scorer that maps (client statement, counsellor response) to a score in [0, 1]; rl.py turns it into a reward and
search.py / eval.py average the objectives. Run `python rewards.py [DATA_DIR]` for the report figures (ranking
accuracy of the two classifiers and mean scores per reflection level on the valid and test splits).

* reflection: classifier P(level | statement, response) over levels 0 (no reflection), 1 (simple), 2 (complex);
  score = expected level / 2 = sum_c c * P(c) / (C - 1).
* empathy: the same construction for the empathy label (0 cold, 1 neutral, 2 warm).
* fluency: perplexity of the response under a FROZEN copy of the base generator, mapped as in the paper:
  ppl = exp(-mean_t log p(y_t | x, y_<t)), score = clip((50 - ppl) / 50, 0, 1): ppl in [1, 50] maps linearly
  onto [0.98, 0] (ppl 10 -> 0.8, ppl >= 50 -> 0). The mean runs over the response tokens and the end-of-turn
  token that the chat template appends after an assistant message ('<|im_end|>' for SmolLM2).

Evaluation-only metrics (never rewards):
* diversity2: corpus-level distinct-2 = |unique word bigrams| / |all word bigrams| over all responses, words =
  `text.lower().split()`, bigrams taken inside each response only; 0 if there are no bigrams.
* edit_rate: word-level Levenshtein distance (insert/delete/substitute, cost 1 each) between statement and response
  words (`lower().split()`), divided by max(len(statement words), len(response words)); 0 for two empty texts.
  High = the response does not just copy the client.
* coherence: cosine similarity of the MiniLM embeddings of statement and response, clipped to [0, 1].
* specificity: mean normalised inverse document frequency (NIDF, See et al. 2019) of the response's words
  (`re.findall(r"[a-z0-9']+", text.lower())`): idf(w) = log(N / df(w)) with N documents = the training split's
  statements and responses, NIDF = (idf - min idf) / (max idf - min idf) in [0, 1]; unseen words get the max
  idf (NIDF 1). An empty response scores 0.

Empty or whitespace-only responses get 0 for every objective and metric (never NaN) without any model call.

Departures from the paper:
1. Reflection is scored by a RoBERTa classifier fine-tuned on PAIR and empathy by a BERT classifier in the paper;
   neither PAIR nor those checkpoints can be fetched here. We train a small classifier (one-hidden-layer MLP,
   weight decay, full batch, a few seconds) on FROZEN all-MiniLM-L6-v2 features [u, v, u*v, |u-v|] of
   (statement u, response v) from our own training split. It is trained on first use and cached on disk under
   a key that hashes the training file, the encoder name, the seed and the hyper-parameters.
2. Fluency uses the frozen base generator (SmolLM2-135M-Instruct) instead of GPT-2, conditioned on the same chat
   prompt the policy sees, with the end-of-turn token counted (a response that should have stopped but did not
   is less fluent). The (50 - ppl) / 50 mapping is the paper's.
3. The scores are used as given in [0, 1]; any log transform for the RL reward (the authors' code uses
   log(clip(score, 1e-4, 0.9999))) is rl.py's business.

Shapes: B rows (statement/response pairs), T tokens, V vocabulary, D = 384 encoder size, F = 4D features,
C = 3 classes.
"""
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import assets

OBJECTIVES = assets.OBJECTIVES  # ("reflection", "empathy", "fluency")
LEARNED = ("reflection", "empathy")  # objectives scored by a classifier on encoder features
METRICS = ("diversity2", "edit_rate", "coherence", "specificity")
N_CLASSES = 3
# classifier hyper-parameters; part of the cache key, so changing them retrains
CLF_HPARAMS = dict(hidden=64, weight_decay=1.0, lr=1e-3, steps=300)


# ----------------------------------------------------------------------------------------------------------
# sentence features and the classifiers

@torch.no_grad()
def embed(encoder, tok, texts, batch_size=64, max_length=256):
    """Mean-pooled (over the attention mask), L2-normalised encoder embeddings: (n, D) float32."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    out = torch.zeros(len(texts), encoder.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = encoder(**enc).last_hidden_state  # (b, T, D)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
        out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


def pair_features(u, v):
    """(n, D) statement and (n, D) response embeddings -> (n, 4D) [u, v, u*v, |u-v|] (InferSent-style)."""
    return torch.cat([u, v, u * v, (u - v).abs()], dim=-1)


class Classifier(nn.Module):
    """Standardise the features, then a one-hidden-layer MLP (or logistic regression if hidden == 0) -> C logits."""

    def __init__(self, in_dim, n_classes=N_CLASSES, hidden=64):
        super().__init__()
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sd", torch.ones(in_dim))
        # the product and difference blocks are ~100x smaller than u and v; standardising lets one weight decay
        # treat all four blocks alike
        self.net = (nn.Linear(in_dim, n_classes) if hidden == 0 else
                    nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, n_classes)))

    def forward(self, x):  # (B, F) -> (B, C)
        return self.net((x - self.mu) / self.sd)


def expected_score(logits):
    """(B, C) logits -> (B,) expected label / (C - 1) = sum_c c P(c) / (C - 1), in [0, 1]."""
    levels = torch.arange(logits.shape[-1], dtype=logits.dtype)
    return logits.softmax(-1) @ levels / (logits.shape[-1] - 1)


def train_classifier(x, y, n_classes=N_CLASSES, seed=0, hidden=64, weight_decay=1.0, lr=1e-3, steps=300):
    """Full-batch AdamW on cross-entropy; (n, F) float features, (n,) int labels -> Classifier in eval mode."""
    with torch.random.fork_rng():  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        clf = Classifier(x.shape[1], n_classes, hidden)
    clf.mu.copy_(x.mean(0))
    clf.sd.copy_(x.std(0) + 1e-6)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.requires_grad_(False)
    return clf.eval()


def labelled_pairs(records, label):
    """(statements, responses, labels) for every non-empty response whose `label` is not None."""
    triples = [(r["prompt"], x["text"], x[label]) for r in records for x in r["responses"]
               if x.get(label) is not None and x["text"].strip()]
    return [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]


def classifier_key(data_file, encoder_name, seed, label):
    """Cache key: a hash of the training file's bytes, the encoder, the seed, the label and the hyper-parameters."""
    h = hashlib.sha256(Path(data_file).read_bytes())
    h.update(json.dumps([encoder_name, seed, label, CLF_HPARAMS], sort_keys=True).encode())
    return f"{label}-{h.hexdigest()[:16]}"


def _save_atomic(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    torch.save(obj, tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is shared like the model folders
    os.replace(tmp, path)  # readers see either no file or the complete one


def load_or_train_classifiers(data_dir, encoder, tok, encoder_name, seed, cache_dir):
    """{label: Classifier} for the LEARNED objectives, read from cache_dir or trained on the train split."""
    train_file = Path(data_dir) / "train.jsonl"
    records = assets.load_split("train", data_dir)  # parsed even on a cache hit: a clear error if it is missing
    classifiers = {}
    for label in LEARNED:
        path = Path(cache_dir) / (classifier_key(train_file, encoder_name, seed, label) + ".pt")
        if path.exists():
            saved = torch.load(path, weights_only=True)
            clf = Classifier(saved["in_dim"], saved["n_classes"], saved["hidden"])
            clf.load_state_dict(saved["state_dict"])
            classifiers[label] = clf.requires_grad_(False).eval()
            continue
        statements, responses, labels = labelled_pairs(records, label)
        print(f"training the {label} classifier on {len(labels)} (statement, response) pairs from {train_file}",
              file=sys.stderr)
        x = pair_features(embed(encoder, tok, statements), embed(encoder, tok, responses))  # (n, F)
        clf = train_classifier(x, torch.tensor(labels), N_CLASSES, seed, **CLF_HPARAMS)
        _save_atomic({"state_dict": clf.state_dict(), "in_dim": x.shape[1], "n_classes": N_CLASSES,
                      "hidden": CLF_HPARAMS["hidden"]}, path)
        classifiers[label] = clf
    return classifiers


# ----------------------------------------------------------------------------------------------------------
# fluency: perplexity under the frozen base generator

def end_of_turn(tok):
    """The text the chat template appends after an assistant message (minus whitespace), e.g. '<|im_end|>' for
    SmolLM2; the EOS token for a model without a chat template."""
    if not getattr(tok, "chat_template", None):
        return tok.eos_token or ""
    sentinel = "XYZZY-RESPONSE-END"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    return tok.apply_chat_template(msgs, tokenize=False).split(sentinel)[-1].strip()


@torch.no_grad()
def mean_response_logprob(lm, pad_id, prompt_ids, target_ids):
    """Mean log p(target token | prompt, earlier target tokens) per row; lists of token-id lists -> (B,).

    Rows are left-padded, so every row's target sits at the right end and only the last max_len + 1 positions
    need logits (logits_to_keep): a (B, L, V) tensor instead of (B, T, V)."""
    seqs = [p + t for p, t in zip(prompt_ids, target_ids)]
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs])  # (B, T)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
    # explicit positions so the first real token is position 0 as in an unpadded call: RoPE models do not care
    # (attention sees only relative positions), absolute-position models such as GPT-2 do
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    L = max(len(t) for t in target_ids)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L + 1).logits  # (B, L+1, V)
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, L, V): position j predicts ids[:, T-L+j]
    tok_logp = logp.gather(-1, ids[:, T - L:].unsqueeze(-1)).squeeze(-1)  # (B, L)
    n = torch.tensor([len(t) for t in target_ids])  # (B,)
    is_target = torch.arange(L).unsqueeze(0) >= (L - n).unsqueeze(1)  # (B, L): the last n[b] columns
    return (tok_logp * is_target).sum(-1) / n


def fluency_from_logprob(mean_logprob):
    """The paper's mapping: ppl = exp(-mean log p), score = clip((50 - ppl) / 50, 0, 1); (B,) -> (B,)."""
    ppl = torch.exp(-mean_logprob.clamp(min=-20.0))  # clamp: exp(20) is already far past 50, and no inf
    return ((50.0 - ppl) / 50.0).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# evaluation-only metrics (definitions in the module docstring)

def distinct_2(texts):
    bigrams = [b for t in texts for b in zip(t.lower().split(), t.lower().split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def edit_rate(prompt, response):
    a, b = prompt.lower().split(), response.lower().split()
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))  # DP row: distance from a[:0] to b[:j]
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def idf_words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def nidf_table(documents):
    """{word: NIDF in [0, 1]} from a list of documents; words not in the table count as NIDF 1 (max idf)."""
    df = Counter(w for d in documents for w in set(idf_words(d)))
    idf = {w: math.log(len(documents) / c) for w, c in df.items()}
    lo, hi = min(idf.values()), max(idf.values())
    return {w: (v - lo) / (hi - lo) if hi > lo else 1.0 for w, v in idf.items()}


def specificity(text, nidf):
    words = idf_words(text)
    return sum(nidf.get(w, 1.0) for w in words) / len(words) if words else 0.0


# ----------------------------------------------------------------------------------------------------------
# the reward models together

class RewardModels:
    """Holds the encoder, the two classifiers, the frozen generator for fluency and the NIDF table."""

    def __init__(self, encoder, enc_tok, classifiers, lm, lm_tok, nidf):
        self.encoder, self.enc_tok, self.classifiers = encoder, enc_tok, classifiers
        self.lm, self.lm_tok, self.nidf = lm, lm_tok, nidf
        self.eot = end_of_turn(lm_tok)

    def _pair_embeddings(self, prompts, responses):
        """Embeddings (n, D) of the statements (each unique one once) and of the responses."""
        unique = list(dict.fromkeys(prompts))
        u = embed(self.encoder, self.enc_tok, unique)[[unique.index(p) for p in prompts]]
        return u, embed(self.encoder, self.enc_tok, responses)

    @torch.no_grad()
    def _fluency(self, prompts, responses, batch_size=16):
        # the chat template already holds its special tokens: do not let the tokenizer add a BOS on top
        special = not getattr(self.lm_tok, "chat_template", None)
        prompt_ids = [self.lm_tok(assets.chat_prompt(self.lm_tok, p), add_special_tokens=special).input_ids
                      for p in prompts]
        eot_ids = self.lm_tok(self.eot, add_special_tokens=False).input_ids
        target_ids = [self.lm_tok(r.strip(), add_special_tokens=False).input_ids + eot_ids for r in responses]
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]))
        out = torch.zeros(len(prompts))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lp = mean_response_logprob(self.lm, self.lm_tok.pad_token_id,
                                       [prompt_ids[i] for i in idx], [target_ids[i] for i in idx])
            out[idx] = fluency_from_logprob(lp)
        return out

    def score(self, prompts, responses, objectives=OBJECTIVES):
        """{objective: (n,) float64 array in [0, 1]} for each requested objective."""
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; known objectives: {', '.join(OBJECTIVES)}")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        keep = [i for i, r in enumerate(responses) if r.strip()]  # empty responses stay 0 and cost nothing
        out = {o: np.zeros(len(responses)) for o in objectives}
        if not keep:
            return out
        ps, rs = [prompts[i] for i in keep], [responses[i] for i in keep]
        if any(o in LEARNED for o in objectives):
            x = pair_features(*self._pair_embeddings(ps, rs))  # (n, F)
            for o in objectives:
                if o in LEARNED:
                    with torch.no_grad():
                        out[o][keep] = expected_score(self.classifiers[o](x)).numpy()
        if "fluency" in objectives:
            out["fluency"][keep] = self._fluency(ps, rs).numpy()
        return out

    def metrics(self, prompts, responses):
        """Per-item arrays for edit_rate, coherence, specificity; a corpus-level float for diversity2."""
        keep = [i for i, r in enumerate(responses) if r.strip()]
        coherence = np.zeros(len(responses))
        if keep:
            u, v = self._pair_embeddings([prompts[i] for i in keep], [responses[i] for i in keep])
            coherence[keep] = (u * v).sum(-1).clamp(0.0, 1.0).numpy()  # unit vectors: dot = cosine
        return {"diversity2": distinct_2(responses),
                "edit_rate": np.array([edit_rate(p, r) if r.strip() else 0.0 for p, r in zip(prompts, responses)]),
                "coherence": coherence,
                "specificity": np.array([specificity(r, self.nidf) for r in responses])}


def load_reward_models(data_dir=assets.DATA_DIR, encoder=assets.DEFAULT_ENCODER, generator=assets.DEFAULT_GENERATOR,
                       seed=0, cache_dir=None):
    """Build the RewardModels; classifiers are cached in cache_dir (default assets.cache_dir() / 'rewards')."""
    cache_dir = Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "rewards"
    enc, enc_tok = assets.load_encoder(encoder)
    enc.requires_grad_(False)
    classifiers = load_or_train_classifiers(data_dir, enc, enc_tok, encoder, seed, cache_dir)
    lm, lm_tok = assets.load_generator(generator)  # a separate instance: never the policy being trained
    lm.requires_grad_(False)
    train = assets.load_split("train", data_dir)
    nidf = nidf_table([r["prompt"] for r in train] + [x["text"] for r in train for x in r["responses"]])
    return RewardModels(enc, enc_tok, classifiers, lm, lm_tok, nidf)


# ----------------------------------------------------------------------------------------------------------
# scoring files, tables, and the classifiers' report figures

PER_ITEM = OBJECTIVES + tuple(m for m in METRICS if m != "diversity2")


def score_file(path, rm):
    """Score a JSONL file of {"prompt", "response"} -> one dict per line with every objective and per-item metric."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected JSON lines of {{\"prompt\", \"response\"}})")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("prompt", "response")
                       if not isinstance(rec, dict) or not isinstance(rec.get(k), str)]
            if missing:
                raise ValueError(f"{path}, line {i}: missing or non-string key(s) {', '.join(missing)}")
            items.append((rec["prompt"], rec["response"]))
    prompts, responses = [p for p, _ in items], [r for _, r in items]
    values = {**rm.score(prompts, responses), **rm.metrics(prompts, responses)}
    return [{"prompt": p, "response": r, **{k: float(values[k][i]) for k in PER_ITEM}}
            for i, (p, r) in enumerate(items)]


def format_table(rows, width=40):
    """Plain-text table: one line per row (response cut to `width` characters), then the column means."""
    cols = [c for c in PER_ITEM if rows and c in rows[0]]
    cut = lambda s: s if len(s) <= width else s[:width - 3] + "..."
    lines = [f"{'#':>4}  {'response':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for i, r in enumerate(rows, 1):
        text = cut(" ".join(r["response"].split()))
        lines.append(f"{i:>4}  {text:<{width}}  " + "  ".join(f"{r[c]:>11.3f}" for c in cols))
    if rows:
        means = [np.mean([r[c] for r in rows]) for c in cols]
        lines.append(f"{'':>4}  {'mean':<{width}}  " + "  ".join(f"{m:>11.3f}" for m in means))
    return "\n".join(lines)


def ranking_accuracy(rm, records, label):
    """Mean over statements of the fraction of (label 2, label 0) response pairs of that statement that the `label`
    model orders correctly (strictly higher score for the label-2 response); statements without a pair are skipped."""
    if label not in LEARNED:
        raise ValueError(f"no labels for {label!r}; ranking accuracy is defined for: {', '.join(LEARNED)}")
    rows = [(s, x) for s, r in enumerate(records) for x in r["responses"] if x.get(label) is not None]
    scores = rm.score([records[s]["prompt"] for s, _ in rows], [x["text"] for _, x in rows], (label,))[label]
    per_statement = []
    for s in range(len(records)):
        hi = [scores[j] for j, (t, x) in enumerate(rows) if t == s and x[label] == 2]
        lo = [scores[j] for j, (t, x) in enumerate(rows) if t == s and x[label] == 0]
        if hi and lo:
            per_statement.append(np.mean([a > b for a in hi for b in lo]))
    return float(np.mean(per_statement)) if per_statement else float("nan")


def scores_by_level(rm, records, label="reflection", objectives=OBJECTIVES):
    """{level: {objective: mean score}} over the responses grouped by their `label` level (0, 1, 2)."""
    rows = [(r["prompt"], x["text"], x[label]) for r in records for x in r["responses"] if x.get(label) is not None]
    scores = rm.score([p for p, _, _ in rows], [t for _, t, _ in rows], objectives)
    levels = np.array([lv for _, _, lv in rows])
    return {lv: {o: float(scores[o][levels == lv].mean()) for o in objectives} for lv in sorted(set(levels.tolist()))}


if __name__ == "__main__":
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else assets.DATA_DIR
    rm = load_reward_models(data_dir)
    for split in ("valid", "test"):
        records = assets.load_split(split, data_dir)
        print(f"{split}: ranking accuracy reflection {ranking_accuracy(rm, records, 'reflection'):.3f}, "
              f"empathy {ranking_accuracy(rm, records, 'empathy'):.3f}")
        for lv, means in scores_by_level(rm, records).items():
            print(f"  reflection level {lv}: " + ", ".join(f"{o} {m:.3f}" for o, m in means.items()))
