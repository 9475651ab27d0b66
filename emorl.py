"""EMORL: Ensemble Multi-Objective Reinforcement Learning (Kong et al., arXiv 2505.02579, SIGDIAL 2025), the whole
method from one command, on a CPU, with the data and models embedded.

    python emorl.py --all                       # every stage, default preset (about 30 min on 2 CPU cores)
    python emorl.py --all --preset quick        # a few minutes
    python emorl.py train --method reflection   # one stage at a time: train | search | eval | generate | score | bench
    python emorl.py search --level hidden
    python emorl.py generate --prompt "I can't sleep since the layoffs." --weights 0.8,0.5,0.1
    python emorl.py score my_pairs.jsonl --json

Stages (paper Sec. 3-4), each writing into runs/NAME/ and skipped when its output is complete:
  1. train  (rl.py)        one LoRA adapter per objective (reflection, empathy, fluency) by PPO with a KL penalty,
                           and the single-policy baselines: uniform weights, DynaOpt (Exp3-weighted)
  2. search (search.py)    aggregation weights by the hierarchical grid search, for the hidden-state (EMORL),
                           logit and parameter levels, scored on the validation split
  3. eval   (eval.py)      every method on the test split and the long-message test set: results.md / .json

Departures from the paper are listed in each module's docstring; the CPU presets shrink everything (see PRESETS).
"""
import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import assets
from lora import write_json

METHODS = assets.OBJECTIVES + ("uniform", "dynaopt")
LEVELS = ("hidden", "logit", "parameter")
COMMANDS = ("train", "search", "eval", "generate", "score", "bench")


@dataclass
class Config:
    # --- run ---
    run: str = "default"             # run folder: runs/<run>/
    preset: str = "default"          # tiny | quick | default | paper (sets the fields below; flags override)
    model: str = assets.DEFAULT_GENERATOR   # base LM: default name, a local folder, or a hub name (paper: T5-base)
    encoder: str = assets.DEFAULT_ENCODER   # sentence encoder of the reward models
    data_dir: str = str(assets.DATA_DIR)    # train/valid/test.jsonl and longform_test.jsonl
    seed: int = 0                    # first seed; everything is deterministic given it
    seeds: int = 1                   # training repeats over seeds (seed, seed+1, ...), for the +/- figures
    threads: int = 0                 # torch CPU threads (0 = torch's default)
    # --- LoRA (authors: r=8, alpha=32, dropout 0.05, every linear layer but the LM head) ---
    lora_r: int = 8                  # r
    lora_alpha: float = 32.0         # alpha
    lora_dropout: float = 0.05
    # --- RL: PPO with a KL penalty (rl.py) ---
    steps: int = 10                  # step limit per run (runs stop earlier when validation converges)
    batch_size: int = 4              # B statements per step (authors: 16)
    n_samples: int = 3               # N samples per statement for the group baseline (authors: k = 3)
    ppo_epochs: int = 2              # PPO epochs per rollout
    lr: float = 5e-4                 # AdamW learning rate (authors: 1e-4; higher here for a few CPU steps)
    clip_eps: float = 0.2            # epsilon, PPO clip range
    kl_coef: float = 0.05            # beta, KL penalty to the reference policy
    max_new_tokens: int = 20         # T, new tokens per response in training (authors: 64)
    temperature: float = 1.0         # sampling temperature of rollouts (authors: 1.0)
    grad_clip: float = 2.0           # gradient-norm clip (authors: 2.0)
    val_every: int = 2               # validate every n steps (authors: 8)
    val_size: int = 16               # validation statements per validation (0 = all)
    conv_window: int = 4             # W, validation means in the convergence window (authors: 20)
    conv_threshold: float = 0.015    # convergence when std/mean of the last W < this (authors: 0.015)
    exp3_gamma: float = 0.1          # gamma, Exp3 exploration rate (DynaOpt)
    keep_best: bool = False          # keep the adapter of the best validation mean instead of the last (see README)
    # --- weight search (search.py) ---
    points_per_axis: int = 3         # grid points per axis (paper: 3)
    search_iterations: int = 1       # grid levels (paper: 5, final spacing 1/32; 1 is the grid {0, 0.5, 1})
    search_size: int = 12            # validation statements decoded per search evaluation (0 = all)
    # --- evaluation (eval.py) ---
    test_size: int = 0               # test statements (0 = all)
    longform_size: int = 12          # long-message test statements (0 = all)
    eval_tokens: int = 24            # new tokens per response at search and evaluation
    greedy: bool = True              # greedy decoding at search and evaluation (as the authors decode)


PRESETS = {
    # seconds on 2 cores; end-to-end test
    "tiny": dict(steps=2, batch_size=2, n_samples=2, ppo_epochs=1, max_new_tokens=8, val_every=1, val_size=3,
                 conv_window=2, points_per_axis=2, search_iterations=1, search_size=2, test_size=3,
                 longform_size=2, eval_tokens=8),
    # a first look, about 12 minutes on 2 cores: 8 small steps per run; beta 0.2 because with 0.05 the noisier
    # batch-2 updates took the fluency member below the base model (validation 0.789 -> 0.677)
    "quick": dict(steps=8, batch_size=2, kl_coef=0.2, max_new_tokens=16, val_every=2, val_size=8, conv_window=3,
                  search_iterations=1, search_size=4, test_size=8, longform_size=4, eval_tokens=16),
    # about half an hour on 2 cores
    "default": {},
    # the paper's / authors' settings, for a GPU (their base model was T5-base: pass --model)
    "paper": dict(steps=10000, batch_size=16, n_samples=3, ppo_epochs=2, lr=1e-4, max_new_tokens=64, val_every=8,
                  val_size=0, conv_window=20, conv_threshold=0.015, search_iterations=5, search_size=0,
                  test_size=0, longform_size=0, eval_tokens=64),
}
# fields a run folder's outputs do not depend on (evaluation is redone on every call); every other field must
# match the folder's config.json, so that no stage silently reuses outputs made with other settings
RUN_FREE = ("run", "seeds", "threads", "test_size", "longform_size")


def make_config(args) -> Config:
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[args.preset])
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    if getattr(args, "run", None) is None:
        cfg.run = cfg.preset                          # runs/quick for --preset quick, unless --run says otherwise
    return cfg


def run_dir(cfg, create=True) -> Path:
    """runs/<run>/ with config.json; refuses a folder made with other settings (another base model, data,
    preset or any flag its outputs depend on)."""
    path = Path("runs") / cfg.run
    saved = path / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        diff = [f.name for f in dataclasses.fields(Config)
                if f.name not in RUN_FREE and old.get(f.name, f.default) != getattr(cfg, f.name)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} there, {getattr(cfg, k)!r} now" for k in diff)
            raise SystemExit(f"error: run folder {path} was made with other settings ({changes}); its outputs "
                             f"would not match. Pass the same settings, use another folder with --run NEW_NAME, "
                             f"or delete {path} to start over")
    elif create:
        path.mkdir(parents=True, exist_ok=True)
        write_json(saved, dataclasses.asdict(cfg))
    return path


def subset(rows, n):
    return rows if not n else rows[:n]


# ----------------------------------------------------------------------------------------------------------
# shared set-up

def load_policy(cfg):
    """The base LM with LoRA layers added (adapters are swapped in and out of this one copy)."""
    from lora import add_lora
    model, tok = assets.load_generator(cfg.model)
    add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)
    return model, tok


def load_rewards(cfg):
    from rewards import load_reward_models
    return load_reward_models(data_dir=cfg.data_dir, encoder=cfg.encoder, generator=cfg.model, seed=cfg.seed)


def statements(cfg, split, n):
    return [r["prompt"] for r in subset(assets.load_split(split, cfg.data_dir), n)]


def adapter_dir(run, seed, method):
    return run / f"seed{seed}" / method


def load_members(cfg, run, seed):
    """The K single-objective adapters of one seed, in objective order."""
    from lora import load_adapter
    members = []
    for obj in assets.OBJECTIVES:
        d = adapter_dir(run, seed, obj)
        if not (d / "summary.json").exists():
            raise SystemExit(f"error: the {obj} model of seed {seed} is not trained in {run}; "
                             f"run: python emorl.py train --method {obj} --run {cfg.run} --preset {cfg.preset}")
        adapter, config = load_adapter(d)
        if config.get("base_model_name_or_path") != cfg.model:
            raise SystemExit(f"error: {d} was trained on {config.get('base_model_name_or_path')!r}, not {cfg.model!r}")
        members.append(adapter)
    return members


# ----------------------------------------------------------------------------------------------------------
# stage 1: training

def stage_train(cfg, method, seed, model=None, tok=None, rm=None):
    from lora import fresh_adapter, set_adapter
    from rl import train
    if method not in METHODS:
        raise SystemExit(f"error: unknown method {method!r}; known: {', '.join(METHODS)}")
    run = run_dir(cfg)
    out = adapter_dir(run, seed, method)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    model, tok = (model, tok) if model is not None else load_policy(cfg)
    rm = rm or load_rewards(cfg)
    set_adapter(model, fresh_adapter(model, seed))
    if method in assets.OBJECTIVES:
        weights, strategy = {method: 1.0}, "fixed"                   # an ensemble member: its objective alone
    else:
        weights = {k: 1.0 / len(assets.OBJECTIVES) for k in assets.OBJECTIVES}
        strategy = "dynaopt" if method == "dynaopt" else "fixed"
    return train(model, tok, rm.score, statements(cfg, "train", 0), statements(cfg, "valid", cfg.val_size), out,
                 weights=weights, strategy=strategy, steps=cfg.steps, batch_size=cfg.batch_size,
                 n_samples=cfg.n_samples, ppo_epochs=cfg.ppo_epochs, lr=cfg.lr, clip_eps=cfg.clip_eps,
                 kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                 grad_clip=cfg.grad_clip, val_every=cfg.val_every, conv_window=cfg.conv_window,
                 conv_threshold=cfg.conv_threshold, exp3_gamma=cfg.exp3_gamma, keep_best=cfg.keep_best, seed=seed,
                 base_model=cfg.model)


# ----------------------------------------------------------------------------------------------------------
# stage 2: weight search

def stage_search(cfg, level, model=None, tok=None, rm=None):
    from aggregate import ensemble_generate
    from search import hierarchical_grid_search
    if level not in LEVELS:
        raise SystemExit(f"error: unknown level {level!r}; known: {', '.join(LEVELS)}")
    run = run_dir(cfg)
    result_path = run / f"search_{level}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    model, tok = (model, tok) if model is not None else load_policy(cfg)
    rm = rm or load_rewards(cfg)
    members = load_members(cfg, run, cfg.seed)
    prompts = statements(cfg, "valid", cfg.search_size)

    def objective(w):
        t0 = time.perf_counter()
        if sum(w) == 0:   # the grid's origin: no model at all; the lowest possible score instead of decoding
            return {"score": 0.0, **{k: 0.0 for k in assets.OBJECTIVES}, "seconds": 0.0}
        texts, _ = ensemble_generate(model, tok, prompts, members, w, level, max_new_tokens=cfg.eval_tokens,
                                     greedy=cfg.greedy, seed=cfg.seed)
        s = rm.score(prompts, texts, assets.OBJECTIVES)
        per = {k: float(np.mean(s[k])) for k in assets.OBJECTIVES}
        return {"score": float(np.mean(list(per.values()))), **per, "seconds": time.perf_counter() - t0}

    # w and c*w give the same output: always for the normalised logit mixture, for hidden states when greedy
    invariant = level == "logit" or (level == "hidden" and cfg.greedy)
    best, score, history = hierarchical_grid_search(
        objective, len(members), points_per_axis=cfg.points_per_axis, iterations=cfg.search_iterations,
        scale_invariant=invariant, history_path=run / f"search_{level}.jsonl")
    result = {"level": level, "weights": list(best), "score": score, "evaluations": len(history),
              "seconds": round(sum(h.get("seconds", 0.0) for h in history), 2), "scale_invariant": invariant,
              "objectives": list(assets.OBJECTIVES)}
    write_json(result_path, result)
    return result


# ----------------------------------------------------------------------------------------------------------
# stage 3: evaluation

def stage_eval(cfg, model=None, tok=None, rm=None):
    from eval import evaluate, over_seeds, results_table, samples_section
    from lora import fresh_adapter, load_adapter
    run = run_dir(cfg)
    model, tok = (model, tok) if model is not None else load_policy(cfg)
    rm = rm or load_rewards(cfg)
    test_sets = {"test": statements(cfg, "test", cfg.test_size),
                 "longform": [r["prompt"] for r in subset(assets.load_longform(Path(cfg.data_dir) / "longform_test.jsonl"),
                                                          cfg.longform_size)]}
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    zero = {n: (A, torch.zeros_like(B)) for n, (A, B) in fresh_adapter(model, 0).items()}   # B = 0: the base model

    def summary(method, seed):
        d = adapter_dir(run, seed, method)
        if not (d / "summary.json").exists():
            raise SystemExit(f"error: {d} is missing; run: python emorl.py train --method {method} --run {cfg.run}")
        return json.loads((d / "summary.json").read_text())

    for s in seeds:   # say what to run first: training before the searches
        for m in METHODS:
            summary(m, s)

    def cost(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    methods = [("base", lambda s: ([zero], [1.0], "hidden"), None, None)]
    for m in ("uniform", "dynaopt") + assets.OBJECTIVES:
        methods.append((m if m in ("uniform", "dynaopt") else f"{m} only",
                        lambda s, m=m: ([load_adapter(adapter_dir(run, s, m))[0]], [1.0], "hidden"), [m], None))
    for level in ("parameter", "logit", "hidden"):
        path = run / f"search_{level}.json"
        if not path.exists():
            raise SystemExit(f"error: {path} is missing; run: python emorl.py search --level {level} --run {cfg.run}")
        found = json.loads(path.read_text())
        name = "EMORL (hidden-state)" if level == "hidden" else f"{level}-level aggregation"
        methods.append((name, lambda s, w=found["weights"], lv=level: (load_members(cfg, run, s), w, lv),
                        list(assets.OBJECTIVES), found))

    rows = []
    for name, spec, trained, found in methods:
        row = {"method": name, "scores": {}, "samples": None}
        for ts, prompts in test_sets.items():
            per_seed = []
            for s in seeds:
                adapters, w, level = spec(s)
                summ, texts, _ = evaluate(model, tok, rm, prompts, adapters, w, level, cfg.eval_tokens,
                                          greedy=cfg.greedy, seed=s)
                per_seed.append(summ)
                if ts == "test" and s == cfg.seed:
                    row["samples"] = texts[:3]
            row["scores"][ts] = over_seeds(per_seed)
        if trained:  # training cost: for EMORL the K member runs added up, and their max (parallel wall time)
            sums = [[summary(m, s) for m in trained] for s in seeds]
            row["data_points"] = cost([sum(x["data_points"] for x in ss) for ss in sums])
            row["seconds"] = cost([sum(x["seconds"] for x in ss) for ss in sums])
            if len(trained) > 1:
                row["seconds_parallel"] = cost([max(x["seconds"] for x in ss) for ss in sums])
        if found:
            row.update(weights=found["weights"], search_evals=found["evaluations"], search_seconds=found["seconds"])
        rows.append(row)
        print(f"  {name:28s} test mean reward {row['scores']['test']['mean']['mean']:.3f}")

    write_json(run / "results.json", {"config": dataclasses.asdict(cfg), "rows": rows})
    md = [f"# EMORL results: run `{cfg.run}` (preset {cfg.preset}, {cfg.seeds} seed(s), base model {cfg.model})", ""]
    for ts, title in (("test", "Test split (our counselling data)"), ("longform", "Long-message test set (Psych8k stand-in)")):
        md += [f"## {title}", "", results_table(rows, ts), ""]
    md += ["Training cost of EMORL is the sum over its K member runs; run in parallel, its wall time is their maximum: "
           + ", ".join(f"{r['method']}: {r['seconds_parallel']['mean']:.0f} s" for r in rows if "seconds_parallel" in r), ""]
    md += ["## Sample generations (test split)", "", samples_section(rows, test_sets["test"])]
    text = "\n".join(md)
    tmp = run / "results.md.tmp"
    tmp.write_text(text)
    tmp.replace(run / "results.md")
    return text


# ----------------------------------------------------------------------------------------------------------
# the small commands

def parse_weights(text, k):
    """'0.8,0.5,0.1' or a JSON file holding a list or {"weights": [...]}."""
    p = Path(text)
    if p.exists():
        data = json.loads(p.read_text())
        w = data["weights"] if isinstance(data, dict) else data
    else:
        try:
            w = [float(x) for x in text.split(",")]
        except ValueError:
            raise SystemExit(f"error: --weights {text!r} is neither a comma-separated list of numbers nor a file")
    if len(w) != k:
        raise SystemExit(f"error: {len(w)} weights given for {k} objectives ({', '.join(assets.OBJECTIVES)}); "
                         f"give one weight per objective")
    return [float(x) for x in w]


def cmd_generate(cfg, args):
    from aggregate import ensemble_generate
    run = run_dir(cfg, create=False)
    prompts = [args.prompt] if args.prompt else []
    if args.file:
        prompts += [l.strip() for l in Path(args.file).read_text().splitlines() if l.strip()]
    if not prompts:
        raise SystemExit("error: nothing to generate for; pass --prompt TEXT or --file FILE (one statement per line)")
    level = args.level or "hidden"
    if args.weights:
        w = parse_weights(args.weights, len(assets.OBJECTIVES))
    else:
        path = run / f"search_{level}.json"
        if not path.exists():
            raise SystemExit(f"error: no weights given and {path} is missing; pass --weights 0.8,0.5,0.1 or run: "
                             f"python emorl.py search --level {level} --run {cfg.run}")
        w = json.loads(path.read_text())["weights"]
    model, tok = load_policy(cfg)
    texts, _ = ensemble_generate(model, tok, prompts, load_members(cfg, run, cfg.seed), w, level,
                                 max_new_tokens=cfg.eval_tokens, greedy=cfg.greedy, seed=cfg.seed)
    for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "response": t, "weights": w, "level": level}, ensure_ascii=False))


def cmd_score(cfg, args):
    from rewards import format_table, score_file
    if not args.file:
        raise SystemExit("error: usage: python emorl.py score FILE.jsonl [--json]  (lines of {\"prompt\", \"response\"})")
    rows = score_file(args.file, load_rewards(cfg))
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    else:
        print(format_table(rows))


def run_all(cfg):
    t0 = time.time()
    model, tok = load_policy(cfg)
    rm = load_rewards(cfg)
    print(f"== EMORL --all: run folder runs/{cfg.run}, preset {cfg.preset}")
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for method in METHODS:
            s = stage_train(cfg, method, seed, model, tok, rm)
            print(f"  trained {method:10s} seed {seed}: val {s['val_start']} -> {s['val_end']} (kept step "
                  f"{s.get('kept_step', s['steps'])}), steps {s['steps']}, "
                  f"data points {s['data_points']}, {s['seconds']:.0f} s")
    for level in LEVELS:
        r = stage_search(cfg, level, model, tok, rm)
        print(f"  searched {level:9s}: weights {r['weights']}, val score {r['score']:.3f}, "
              f"{r['evaluations']} evaluations, {r['seconds']:.0f} s")
    print(stage_eval(cfg, model, tok, rm))
    print(f"== done in {time.time() - t0:.0f} s; results in runs/{cfg.run}/results.md")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", help=f"one of: {', '.join(COMMANDS)} (or --all)")
    p.add_argument("file", nargs="?", help="score: the JSONL file to score")
    p.add_argument("--all", action="store_true", help="run every stage in order (resumes where it stopped)")
    p.add_argument("--method", help=f"train: one of {', '.join(METHODS)} (default: all)")
    p.add_argument("--level", help=f"search/generate: one of {', '.join(LEVELS)} (search default: all)")
    p.add_argument("--weights", help="generate: comma-separated weights or a JSON file (default: the searched ones)")
    p.add_argument("--prompt", help="generate: a client statement")
    p.add_argument("--json", action="store_true", help="score: one JSON object per line")
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           action=argparse.BooleanOptionalAction)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=type(f.default))
    p.set_defaults(preset="default")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        import bench
        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None and not args.all:
        build_parser().print_help()
        raise SystemExit("error: give a command or --all")
    if args.command is not None and args.command not in COMMANDS:
        raise SystemExit(f"error: unknown command {args.command!r}; known: {', '.join(COMMANDS)}, or --all")
    if args.method and args.method not in METHODS:
        raise SystemExit(f"error: unknown method {args.method!r}; known: {', '.join(METHODS)}")
    if args.level and args.level not in LEVELS:
        raise SystemExit(f"error: unknown level {args.level!r}; known: {', '.join(LEVELS)}")
    cfg = make_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if args.command in ("train", "search", "eval") or args.all:
        run_dir(cfg)                         # refuse a run folder of another base model before loading anything
    if args.all:
        return run_all(cfg)
    if args.command == "train":
        model, tok = load_policy(cfg)
        rm = load_rewards(cfg)
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            for method in ([args.method] if args.method else METHODS):
                print(method, json.dumps(stage_train(cfg, method, seed, model, tok, rm)))
    elif args.command == "search":
        model, tok = load_policy(cfg)
        rm = load_rewards(cfg)
        for level in ([args.level] if args.level else LEVELS):
            print(json.dumps(stage_search(cfg, level, model, tok, rm)))
    elif args.command == "eval":
        print(stage_eval(cfg))
    elif args.command == "generate":
        cmd_generate(cfg, args)
    elif args.command == "score":
        cmd_score(cfg, args)


if __name__ == "__main__":
    main()
