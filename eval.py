"""Stage 4 of EMORL (paper Sec. 4): score every method on held-out test sets and put quality and training cost
side by side (the paper's Table 2 and Figures 3-4).

A "method" is a generator described by (adapters, weights, level): the base model is one all-zero adapter,
a fine-tuned model or single-policy baseline is one adapter with weight 1, an aggregation is K adapters with
searched weights at a level. All of them go through the same decoder (aggregate.ensemble_generate) with the
same decoding settings, so the comparison differs only in the models.

Departures from the paper:
  1. Scores come from our reward models (rewards.py), not the paper's RoBERTa/BERT/GPT-2 scorers.
  2. The second test set is our own long-message set standing in for Psych8k.
"""
import time

import numpy as np

from aggregate import ensemble_generate
from rewards import OBJECTIVES

COLUMNS = OBJECTIVES + ("mean", "diversity2", "edit_rate", "coherence", "specificity")


def score_texts(rm, prompts, texts):
    """Per-statement scores: {objective or metric: array (n,)}, plus the corpus-level diversity-2 (float)."""
    s = rm.score(prompts, texts, OBJECTIVES)
    out = {k: np.asarray(s[k], dtype=np.float64) for k in OBJECTIVES}
    out["mean"] = np.mean([out[k] for k in OBJECTIVES], axis=0)           # the paper's mean reward
    out.update(rm.metrics(prompts, texts))
    return out


def summarise(per_item):
    """mean and standard deviation over statements (diversity-2 is one corpus figure: std 0)."""
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in per_item.items()}


def evaluate(model, tok, rm, statements, adapters, weights, level, max_new_tokens, greedy=True, seed=0,
             batch_size=32):
    """Decode the statements with one method and score them. Returns (summary, texts, seconds)."""
    t0 = time.perf_counter()
    texts, _ = ensemble_generate(model, tok, statements, adapters, weights, level, max_new_tokens=max_new_tokens,
                                 greedy=greedy, seed=seed, batch_size=batch_size)
    return summarise(score_texts(rm, statements, texts)), texts, time.perf_counter() - t0


def over_seeds(summaries):
    """Combine one summary per seed: mean of the per-seed means, std across seeds (std over statements if 1 seed)."""
    if len(summaries) == 1:
        return summaries[0]
    return {k: {"mean": float(np.mean([s[k]["mean"] for s in summaries])),
                "std": float(np.std([s[k]["mean"] for s in summaries]))} for k in summaries[0]}


# ----------------------------------------------------------------------------------------------------------
# the results table

def _pm(d, digits=3):
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d["std"] else f"{d['mean']:.{digits}f}"


def _cost(c):
    if c is None:
        return "-"
    if isinstance(c, dict):
        return f"{c['mean']:.0f} ± {c['std']:.0f}" if c.get("std") else f"{c['mean']:.0f}"
    return f"{c:.0f}"


def results_table(rows, test_set):
    """Markdown table: one row per method on one test set."""
    head = ["method", "weights"] + list(COLUMNS) + ["train data points", "train s", "search evals", "search s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r["scores"][test_set]
        weights = ", ".join(f"{x:g}" for x in r["weights"]) if r.get("weights") else "-"
        cells = [r["method"], weights] + [_pm(q[c]) for c in COLUMNS] + [
            _cost(r.get("data_points")), _cost(r.get("seconds")), _cost(r.get("search_evals")),
            _cost(r.get("search_seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_section(rows, statements, n=3):
    out = []
    for i, s in enumerate(statements[:n]):
        out.append(f"**Client:** {s}\n")
        for r in rows:
            out.append(f"- *{r['method']}*: {r['samples'][i]}")
        out.append("")
    return "\n".join(out)
