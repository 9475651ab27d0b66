"""Benchmark of the ensemble decoder (paper Sec. 3.2, "efficient" in EMORL): what decoding with K aggregated
models costs next to one model, next to K models run one after another, and next to the authors' uncached loop.

Run:  python bench.py                   (batch 8, 32 and 64 new tokens, K = 3; about 7 minutes on a quiet 2-core CPU,
                                          most of it the full-recompute loop)
      python bench.py --skip-full       (minutes less: without the authors' loop)
      python bench.py --quick           (smoke test: batch 2, 8 tokens)
      python bench.py --json out.json   (also write the table as JSON)

Variants, all greedy, all decoding exactly T tokens per row (EOS ignored / forbidden) on the same B statements:
  1. single:     HF `model.generate`, one LoRA adapter, batch B: the plain cost of one model;
  2. K x single: 1. times K, what running the K models separately costs;
  3. ours:       `aggregate.ensemble_generate(level="hidden")`, K adapters stacked in one batch over one base;
  4. sequential: `sequential_generate` below, K KV caches, the K models run one after another at every step;
  5. full:       `aggregate.generate_full_recompute`, the authors' loop (every model re-runs the whole prefix).
Throughput counts output tokens: B T / seconds (the ensemble outputs B T tokens, not K B T).
Peak memory: the single decode and the ensemble decode each run in a fresh process (`--measure-rss`), which
reports its peak resident set size while decoding (VmHWM, KiB, reset after loading, see `reset_peak_rss`), the
resident weights (memory-mapped, so they become resident at the first forward), torch and the KV caches
included.

Legend: K models, B statements, P prompt tokens, T new tokens, D hidden size.

Notes:
  1. The adapters are random (A, B ~ N(0, 0.02^2)), not trained: a fresh adapter has B = 0 and would make every
     model the same; a small scale keeps the text model-like, so the attention and cache shapes are realistic.
  2. Timings are the minimum over --repeats, measured side by side in one process after a warm-up; on a busy
     machine compare the ratios, not the seconds. When other processes hold the cores, torch's default of one
     thread per core can be ten times slower than --threads 1 (threads wait on each other); the header prints
     the load average for that reason.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import assets
from aggregate import aggregate_hidden, check_weights, ensemble_generate, generate_full_recompute
from lora import add_lora, for_inference, lora_layers, set_adapter, write_json
from rl import encode, eos_ids

TARGETS = {"ours_vs_k_single": 1.1, "full_speedup_at_64": 15.0, "rss_ratio": 1.3}


# ----------------------------------------------------------------------------------------------------------
# the variants

def bench_adapters(model, k, seed=0, scale=0.02):
    """K adapters with non-zero A and B (float32), small enough that the text stays model-like."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        out.append({n: (torch.randn(m.lora_A.shape, generator=g) * scale,
                        torch.randn(m.lora_B.shape, generator=g) * scale) for n, m in lora_layers(model).items()})
    return out


@for_inference
def single_generate(model, tok, statements, adapter, max_new_tokens):
    """One fine-tuned model, HF generate, greedy, exactly T tokens per row. -> (B, T) token lists"""
    set_adapter(model, adapter)
    ids, mask = encode(tok, statements)                                   # (B, P)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_k=None, top_p=None,
                         pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(model, tok))
    return out[:, ids.shape[1]:].tolist()


@for_inference
def sequential_generate(model, tok, statements, adapters, weights, max_new_tokens):
    """Greedy hidden-state aggregation with one KV cache per model, the K models run one after another at every
    step (the obvious cached loop; ensemble_generate stacks them into one batch instead). EOS is not a stop.
    -> (B, T) token lists"""
    w = check_weights(weights, len(adapters))
    lm_head = model.get_output_embeddings()
    ids, mask = encode(tok, statements)                                   # (B, P)
    pos = (mask.cumsum(1) - 1).clamp(min=0)                               # left padding: positions from 0
    caches = [DynamicCache(config=model.config) for _ in adapters]

    def forward_all(input_ids, mask, pos):
        hs = []
        for a, cache in zip(adapters, caches):
            set_adapter(model, a)                                         # model k = base + adapter k
            out = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                                   use_cache=True)
            hs.append(out.last_hidden_state[:, -1])
        return torch.stack(hs)                                            # (K, B, D)

    h = forward_all(ids, mask, pos)
    last_pos = pos[:, -1]
    new = []
    for t in range(max_new_tokens):
        y = lm_head(aggregate_hidden(h, w)).argmax(-1)                    # (B,)
        new.append(y)
        if t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
        last_pos = last_pos + 1
        h = forward_all(y[:, None], mask, last_pos[:, None])
    return torch.stack(new, 1).tolist()                                   # (B, T)


def variants(model, tok, statements, adapters, weights, T, skip_full):
    """name -> a call that decodes T tokens and returns the token lists (None where tokens are not compared)."""
    v = {
        "single": lambda: (single_generate(model, tok, statements, adapters[0], T), None)[1],
        "ours": lambda: ensemble_generate(model, tok, statements, adapters, weights, level="hidden",
                                          max_new_tokens=T, ignore_eos=True, batch_size=len(statements))[1],
        "sequential": lambda: sequential_generate(model, tok, statements, adapters, weights, T),
    }
    if not skip_full:
        v["full"] = lambda: generate_full_recompute(model, tok, statements, adapters, weights, max_new_tokens=T,
                                                    ignore_eos=True)[1]
    return v


# ----------------------------------------------------------------------------------------------------------
# setup and memory

def agreement(a, b):
    """How far two greedy decodes (lists of B token lists) agree: rows identical, and per row the number of
    tokens before the first difference (T where the row is identical)."""
    first = [next((t for t, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
    return {"rows_identical": sum(f == len(r) for f, r in zip(first, a)), "rows": len(a), "first_difference": first}


def setup(batch, k):
    """The default generator with LoRA layers, K random adapters, equal weights and B test statements."""
    model, tok = assets.load_generator()
    add_lora(model)
    adapters = bench_adapters(model, k)
    prompts = [r["prompt"] for r in assets.load_split("test")]
    statements = [prompts[i % len(prompts)] for i in range(batch)]
    return model, tok, statements, adapters, [1.0 / k] * k


def rss_high_water_kib():
    """Peak RSS of this process since its start or the last `reset_peak_rss` (VmHWM, KiB). Not getrusage's
    ru_maxrss: across fork + exec that keeps the parent's peak, so a child of the benchmark (1 GB resident)
    would report at least 1 GB whatever it does."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status: the memory measurement needs Linux")


def reset_peak_rss():
    """Restart the high-water mark (Linux >= 4.0: write 5 to clear_refs), so that the number is the decode's own
    peak and not a transient of loading, which is the same for both decodes and would hide their difference."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_rss(which, batch, T, k):
    """Runs in a fresh process: load, reset the peak, one decode, then print the peaks as a JSON line."""
    model, tok, statements, adapters, weights = setup(batch, k if which == "ensemble" else 1)
    before_peak = rss_high_water_kib()
    gc.collect()
    reset_peak_rss()
    if which == "single":
        single_generate(model, tok, statements, adapters[0], T)
    else:
        ensemble_generate(model, tok, statements, adapters, weights, level="hidden", max_new_tokens=T,
                          ignore_eos=True, batch_size=batch)
    print(json.dumps({"which": which, "before_peak_kib": before_peak, "decode_peak_kib": rss_high_water_kib()}))


def rss_in_subprocess(which, batch, T, k, threads):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-rss", which, "--batch", str(batch),
           "--tokens", str(T), "--k", str(k)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement ({which}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# the benchmark

def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark the EMORL ensemble decoder against single and K-model "
                                            "decoding and the authors' full-recompute loop.")
    p.add_argument("--batch", type=int, default=8, help="B, statements decoded at once")
    p.add_argument("--tokens", default="32,64", help="comma-separated T values, new tokens per row")
    p.add_argument("--k", type=int, default=3, help="K, number of aggregated models (adapters)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the minimum is reported")
    p.add_argument("--skip-full", action="store_true", help="skip the slow full-recompute loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 2, 8 tokens")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--measure-rss", choices=["single", "ensemble"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.tokens = 2, "8"
    args.tokens = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    if args.batch < 1 or args.k < 1 or args.repeats < 1 or not args.tokens or min(args.tokens) < 1:
        p.error("--batch, --k, --repeats and every --tokens value must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_rss:
        measure_rss(args.measure_rss, args.batch, max(args.tokens), args.k)
        return None

    B, K = args.batch, args.k
    model, tok, statements, adapters, weights = setup(B, K)
    print(f"bench: {assets.DEFAULT_GENERATOR}, float32, B={B}, K={K}, T={args.tokens}, "
          f"threads={torch.get_num_threads()}, repeats={args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    # warm-up: first calls pay for kernel selection and allocator growth, which is not decoding cost
    for fn in variants(model, tok, statements, adapters, weights, 2, args.skip_full).values():
        fn()

    # ------------------------------------------------------------------------------------------------------
    # timings, side by side: every repeat runs every variant, so load changes hit all of them alike
    runs, identical = [], True
    for T in args.tokens:
        seconds, tokens = {}, {}
        calls = variants(model, tok, statements, adapters, weights, T, args.skip_full)
        for r in range(args.repeats):
            for name, fn in calls.items():
                print(f"  T={T} repeat {r + 1}/{args.repeats}: {name} ...", end=" ", flush=True)
                t0 = time.perf_counter()
                tokens[name] = fn()
                dt = time.perf_counter() - t0
                seconds[name] = min(dt, seconds.get(name, float("inf")))
                print(f"{dt:.2f} s", flush=True)
        seconds["k_single"] = K * seconds["single"]
        compared = [n for n in ("ours", "sequential", "full") if n in tokens]
        same = all(tokens[n] == tokens["ours"] for n in compared)
        identical &= same
        run = {"tokens": T, "seconds": seconds,
               "tokens_per_s": {n: B * T / s for n, s in seconds.items()},
               "ours_vs_k_single": seconds["ours"] / seconds["k_single"],
               "ours_vs_single": seconds["ours"] / seconds["single"],
               "sequential_vs_ours": seconds["sequential"] / seconds["ours"],
               "full_speedup": seconds["full"] / seconds["ours"] if "full" in seconds else None,
               "tokens_identical": same, "compared": compared,
               "agreement": {n: agreement(tokens["ours"], tokens[n]) for n in compared if n != "ours"},
               "sample": tok.decode(tokens["ours"][0], skip_special_tokens=True).strip()}
        runs.append(run)

    # ------------------------------------------------------------------------------------------------------
    # peak memory, each decode in its own fresh process (a process's peak never goes down: no sharing)
    print("  peak memory: single and ensemble decode in fresh processes ...", flush=True)
    T_mem = max(args.tokens)
    single = rss_in_subprocess("single", B, T_mem, K, args.threads)
    ensemble = rss_in_subprocess("ensemble", B, T_mem, K, args.threads)
    memory = {"tokens": T_mem, "single_decode_peak_kib": single["decode_peak_kib"],
              "ensemble_decode_peak_kib": ensemble["decode_peak_kib"],
              "single_before_peak_kib": single["before_peak_kib"], "ensemble_before_peak_kib": ensemble["before_peak_kib"],
              "ratio": ensemble["decode_peak_kib"] / single["decode_peak_kib"]}

    # ------------------------------------------------------------------------------------------------------
    # report
    names = {"single": "single model (HF generate)", "k_single": f"{K} x single", "ours": "ours (stacked, cached)",
             "sequential": f"sequential ({K} caches)", "full": "full recompute (authors)"}
    for run in runs:
        T, s = run["tokens"], run["seconds"]
        print(f"\nT = {T} new tokens, B = {B}, K = {K}")
        print(f"  {'variant':<28}{'seconds':>9}{'tok/s':>9}{'/ ours':>9}")
        for n in names:
            if n in s:
                print(f"  {names[n]:<28}{s[n]:>9.2f}{run['tokens_per_s'][n]:>9.1f}{s[n] / s['ours']:>9.2f}")
        print(f"  ours / {K} x single = {run['ours_vs_k_single']:.2f} (target <= {TARGETS['ours_vs_k_single']}), "
              f"ours / single = {run['ours_vs_single']:.2f}, sequential / ours = {run['sequential_vs_ours']:.2f}")
        if run["full_speedup"] is not None:
            target = f" (target >= {TARGETS['full_speedup_at_64']:.0f}x at 64 tokens)" if T == 64 else ""
            print(f"  speedup over full recompute = {run['full_speedup']:.1f}x{target}")
        print(f"  tokens identical ({' = '.join(run['compared'])}): {'yes' if run['tokens_identical'] else 'no'}")
        for n, a in run["agreement"].items():
            print(f"    {n} vs ours: {a['rows_identical']}/{a['rows']} rows identical; "
                  f"tokens before the first difference, per row: {a['first_difference']}")
        print(f"  sample (ours, row 0): {run['sample'][:100]!r}")
    mib = lambda kib: kib / 1024
    print(f"\npeak RSS while decoding T = {T_mem} (fresh process, weights included): "
          f"single {mib(memory['single_decode_peak_kib']):.0f} MiB, "
          f"ensemble {mib(memory['ensemble_decode_peak_kib']):.0f} MiB, "
          f"ratio {memory['ratio']:.2f} (target <= {TARGETS['rss_ratio']})")
    print(f"  (peak before decoding, torch + model as loaded: single {mib(memory['single_before_peak_kib']):.0f} MiB, "
          f"ensemble {mib(memory['ensemble_before_peak_kib']):.0f} MiB)")

    print(f"\nsummary: B = {B}, K = {K}, seconds; ratios of ours to {K} x single, to single, full recompute / ours")
    print(f"  {'T':>4}{'single':>8}{'ours':>8}{'seq':>8}{'full':>8}{'ours/Kx1':>10}{'ours/1':>8}{'full/ours':>10}"
          f"{'same':>6}")
    for run in runs:
        s = run["seconds"]
        full = f"{s['full']:>8.1f}" if "full" in s else f"{'-':>8}"
        speedup = f"{run['full_speedup']:>10.1f}" if run["full_speedup"] is not None else f"{'-':>10}"
        print(f"  {run['tokens']:>4}{s['single']:>8.1f}{s['ours']:>8.1f}{s['sequential']:>8.1f}{full}"
              f"{run['ours_vs_k_single']:>10.2f}{run['ours_vs_single']:>8.2f}{speedup}"
              f"{'yes' if run['tokens_identical'] else 'no':>6}")
    print(f"  peak RSS ensemble / single = {memory['ratio']:.2f}")
    print(f"tokens identical: {'yes' if identical else 'no'}")

    result = {"model": assets.DEFAULT_GENERATOR, "batch": B, "k": K, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "load_average": os.getloadavg()[0], "runs": runs, "memory": memory,
              "tokens_identical": identical, "targets": TARGETS}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
