"""Stage 1 of EMORL (paper Sec. 3.1): RL fine-tuning of one LoRA adapter per objective, and the single-policy
baselines of Sec. 4 that train one adapter on all objectives (uniform weights; DynaOpt's Exp3 bandit).

Algorithm (one trainer for all three reward weightings):
    for step = 1, 2, ...
      1. sample: B statements, N responses each from pi_theta (temperature 1), keeping the sampled token ids
         and their log-probabilities (never re-tokenised text)
      2. score: reward R = sum_k w_k log(clip(s_k, 1e-4, 0.9999)) over the objectives' scores s_k in [0, 1]
      3. advantages: A = R - mean of the N rewards of the same statement (k-sample baseline, no value head)
      4. PPO epochs: minimise  -mean_t min(r_t A, clip(r_t, 1-eps, 1+eps) A) + beta KL(pi_theta || pi_ref)
      5. every `val_every` steps: greedy decode the validation statements, score, check convergence
         (coefficient of variation of the last W validation means < threshold), checkpoint
    at the end: the last adapter, or with keep_best the one of the best validation mean after a training step
Cost accounting: data points = statements consumed (the authors count one prompt as one data point), seconds.

Legend: B statements, N samples per statement, P prompt tokens, T new tokens, V vocabulary.

Departures from the paper and the authors' code (engineerkong/EMORL):
  1. PPO with a KL penalty instead of the authors' REINFORCE: clipped surrogate over several epochs per rollout.
     The advantage keeps their k-sample group baseline, so there is no value head (as in GRPO / RLOO).
  2. The KL penalty is per sample: the k3 estimator exp(q) - q - 1, q = log pi_ref - log pi_theta, averaged
     over each sample's tokens and added to the loss, so it acts on every sample's gradient. The authors
     multiply one batch-wide KL scalar by advantages that sum to zero, which cancels it.
  3. Training stops when validation converges (their code sets a flag and trains on). keep_best (off by
     default) keeps the adapter of the best validation mean instead of the last one.
  4. DynaOpt (Min et al. 2024) is written as: reward weights = the Exp3 probabilities; each validation round
     one arm (objective) is drawn and rewarded with its validation gain, mapped to [0, 1].
"""
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from assets import chat_prompt
from lora import (for_inference, get_adapter, load_adapter, lora_disabled, lora_parameters, save_adapter, set_adapter,
                  write_json)


# ----------------------------------------------------------------------------------------------------------
# the math: small pure functions

def rewards_from_scores(scores: dict, weights: dict) -> torch.Tensor:
    """R = sum_k w_k log(clip(s_k, 1e-4, 0.9999)), the authors' reward shaping (log keeps gradients alive near 0)."""
    total = 0.0
    for name, w in weights.items():
        s = torch.as_tensor(np.asarray(scores[name], dtype=np.float64)).float()
        total = total + w * torch.log(s.clamp(1e-4, 0.9999))
    return total


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_ij = R_ij - mean_j R_ij over the N samples of statement i.  rewards: (B, N) -> (B, N)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def ppo_loss(logp, old_logp, adv, mask, clip_eps=0.2):
    """Clipped surrogate, averaged over valid tokens. logp, old_logp, mask: (BN, T); adv: (BN,)."""
    ratio = (logp - old_logp).exp()                                     # r_t(theta)
    a = adv[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return -(surrogate * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(logp, ref_logp, mask):
    """Per-sample KL(pi_theta || pi_ref) by the k3 estimator (non-negative, unbiased). -> (BN,)"""
    q = ref_logp - logp
    k3 = q.exp() - q - 1
    return (k3 * mask).sum(1) / mask.sum(1).clamp(min=1)


def coefficient_of_variation(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.std() / max(abs(v.mean()), 1e-12))


def converged(history, window, threshold):
    """The authors' rule: std / mean of the last `window` validation means below `threshold`."""
    return len(history) >= window and coefficient_of_variation(history[-window:]) < threshold


class Exp3:
    """Exp3 bandit (Auer et al. 2002) over K arms = objectives, as DynaOpt uses it to move reward weights."""

    def __init__(self, k: int, gamma: float = 0.1, seed: int = 0):
        self.k, self.gamma = k, gamma
        self.log_w = np.zeros(k)                     # log weights (no overflow on long runs)
        self.rng = np.random.default_rng(seed)

    def probs(self) -> np.ndarray:
        w = np.exp(self.log_w - self.log_w.max())
        return (1 - self.gamma) * w / w.sum() + self.gamma / self.k      # p_i

    def pull(self) -> int:
        return int(self.rng.choice(self.k, p=self.probs()))

    def update(self, arm: int, reward: float):
        """w_arm <- w_arm * exp(gamma * x_hat / K), x_hat = reward / p_arm (importance-weighted), reward in [0, 1]."""
        x_hat = reward / self.probs()[arm]
        self.log_w[arm] += self.gamma * x_hat / self.k

    def state(self):
        return {"log_w": self.log_w.tolist(), "rng": self.rng.bit_generator.state}

    def load(self, state):
        self.log_w = np.array(state["log_w"])
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------------------------------------
# rollouts

def encode(tok, statements):
    """Chat-formatted, left-padded prompts. -> input_ids, attention_mask: (B, P)"""
    enc = tok([chat_prompt(tok, s) for s in statements], return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return sorted({i for i in ids + [tok.eos_token_id] if i is not None})


def response_mask(tokens, eos):
    """1 for the response tokens up to and including the first EOS, 0 after. tokens: (BN, T) -> (BN, T)"""
    is_eos = torch.isin(tokens, torch.tensor(eos))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0                     # strictly after the first EOS
    return (~after).float()


@torch.no_grad()
def sample(model, tok, statements, n, max_new_tokens, temperature=1.0, greedy=False):
    """N responses per statement from the current policy, with the log-probability of each sampled token under
    the distribution it was drawn from (read off generation's logits, not recomputed from decoded text).
    Returns ids (BN, P+T), mask (BN, P+T), P, resp_mask (BN, T), logp (BN, T), texts."""
    ids, mask = encode(tok, statements)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=not greedy, temperature=None if greedy else temperature, top_k=None, top_p=None,
                         num_return_sequences=1 if greedy else n, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos_ids(model, tok), return_dict_in_generate=True, output_logits=not greedy)
    P = ids.shape[1]
    resp = out.sequences[:, P:]                                          # (BN, T)
    rmask = response_mask(resp, eos_ids(model, tok))
    full_mask = torch.cat([mask.repeat_interleave(resp.shape[0] // ids.shape[0], 0), rmask.long()], 1)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(resp, rmask)]
    logp = None
    if not greedy:  # temperature T: the sampling distribution is softmax(logits / T)
        logits = torch.stack(out.logits, 1).float() / temperature        # (BN, T, V)
        logp = torch.log_softmax(logits, -1).gather(-1, resp[..., None]).squeeze(-1) * rmask
    return {"ids": out.sequences, "mask": full_mask, "P": P, "resp_mask": rmask, "logp": logp, "texts": texts}


def token_logprobs(model, ids, mask, P):
    """log pi(a_t | prefix) of the response tokens. ids, mask: (BN, P+T) -> (BN, T)"""
    pos = (mask.cumsum(1) - 1).clamp(min=0)                             # left padding: positions start at 0
    h = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    logits = model.get_output_embeddings()(h[:, P - 1:-1])               # (BN, T, V): only response positions
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)


@for_inference
def validate(model, tok, reward_fn, statements, objectives, max_new_tokens, batch_size=16):
    """Greedy responses to the validation statements; mean score per objective."""
    texts = []
    for i in range(0, len(statements), batch_size):
        texts += sample(model, tok, statements[i:i + batch_size], 1, max_new_tokens, greedy=True)["texts"]
    scores = reward_fn(statements, texts, objectives)
    return {k: float(np.mean(scores[k])) for k in objectives}


# ----------------------------------------------------------------------------------------------------------
# the training loop

def train(model, tok, reward_fn, train_statements, valid_statements, out_dir, *, weights: dict, strategy="fixed",
          steps=100, batch_size=8, n_samples=3, ppo_epochs=2, lr=1e-4, clip_eps=0.2, kl_coef=0.05,
          max_new_tokens=32, temperature=1.0, grad_clip=2.0, val_every=4, conv_window=20, conv_threshold=0.015,
          exp3_gamma=0.1, gain_scale=0.05, keep_best=False, seed=0, base_model="", progress=True):
    """Train the model's LoRA adapter (model must have add_lora applied) and save it in out_dir.

    weights: objective -> w_k (one objective for an ensemble member; all for the baselines).
    strategy: "fixed" (weights as given) or "dynaopt" (weights = Exp3 probabilities, moved each round).
    reward_fn(statements, responses, objectives) -> {objective: array of scores in [0, 1]}.
    keep_best: keep the adapter with the best validation mean over the trained steps (else the last one).
    Resumes from out_dir's checkpoint if there is one; returns the summary (also written to summary.json).
    """
    # ---- setup ------------------------------------------------------------------------------------------
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "summary.json").exists():
        return json.loads((out_dir / "summary.json").read_text())
    objectives = list(weights)
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    bandit = Exp3(len(objectives), exp3_gamma, seed) if strategy == "dynaopt" else None
    state = {"step": 0, "data_points": 0, "seconds": 0.0, "val_history": [], "converged_at": None, "best": None}
    log_path = out_dir / "train_log.jsonl"
    if (out_dir / "checkpoint.pt").exists():                              # resume after an interruption
        ckpt = torch.load(out_dir / "checkpoint.pt", weights_only=False)
        set_adapter(model, load_adapter(out_dir)[0])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {"best": None, **ckpt["state"]}
        if bandit:
            bandit.load(ckpt["bandit"])
        _truncate_log(log_path, state["step"])
        print(f"resuming {out_dir.name} at step {state['step']}")
    elif log_path.exists():
        log_path.unlink()
    order_rng = np.random.default_rng(seed)                             # statement order: reproducible by step
    orders = [order_rng.permutation(len(train_statements)) for _ in range(1 + steps * batch_size // len(train_statements))]
    flat_order = np.concatenate(orders)
    if not state["val_history"]:                                        # step 0: the base policy's score
        v = validate(model, tok, reward_fn, valid_statements, objectives, max_new_tokens)
        state["val_start"] = v
        state["val_history"].append(float(np.mean(list(v.values()))))
        state["last_val"] = v
    arm = bandit.pull() if bandit else None

    # ---- loop -------------------------------------------------------------------------------------------
    bar = tqdm(total=steps, initial=state["step"], desc=f"train {out_dir.name}", disable=not progress)
    while state["step"] < steps and state["converged_at"] is None:
        t0 = time.perf_counter()
        step = state["step"]
        idx = flat_order[step * batch_size:(step + 1) * batch_size]
        batch = [train_statements[i] for i in idx]
        w = dict(zip(objectives, bandit.probs())) if bandit else weights

        # 1. sample N responses per statement
        model.eval()
        roll = sample(model, tok, batch, n_samples, max_new_tokens, temperature)
        ids, mask, P, rmask = roll["ids"], roll["mask"], roll["P"], roll["resp_mask"]
        old_logp = roll["logp"]                                         # log pi_old, (BN, T)
        with torch.no_grad():
            with lora_disabled(model):
                ref_logp = token_logprobs(model, ids, mask, P)          # log pi_ref, (BN, T)
        # 2. score
        prompts = [s for s in batch for _ in range(n_samples)]
        scores = reward_fn(prompts, roll["texts"], objectives)
        R = rewards_from_scores(scores, w).view(len(batch), n_samples)  # (B, N)
        # 3. advantages
        adv = group_advantages(R).flatten()                             # (BN,)
        # 4. PPO epochs
        model.train()
        for _ in range(ppo_epochs):
            logp = token_logprobs(model, ids, mask, P)
            kl = kl_penalty(logp, ref_logp, rmask)                       # (BN,)
            loss = ppo_loss(logp, old_logp, adv, rmask, clip_eps) + kl_coef * kl.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        model.eval()
        state["step"] += 1
        state["data_points"] += len(batch)
        state["seconds"] += time.perf_counter() - t0
        state["kl_last"] = float(kl.mean().detach())
        row = {"step": state["step"], "data_points": state["data_points"], "seconds": round(state["seconds"], 3),
               "reward": float(R.mean()), "kl": state["kl_last"], "loss": float(loss.detach()),
               "weights": {k: round(float(x), 4) for k, x in w.items()},
               **{f"train_{k}": float(np.mean(scores[k])) for k in objectives}}

        # 5. validate, check convergence, checkpoint
        if state["step"] % val_every == 0 or state["step"] == steps:
            t1 = time.perf_counter()
            v = validate(model, tok, reward_fn, valid_statements, objectives, max_new_tokens)
            state["val_history"].append(float(np.mean(list(v.values()))))
            if bandit:   # DynaOpt: reward the drawn arm with its objective's validation gain, mapped to [0, 1]
                gain = v[objectives[arm]] - state["last_val"][objectives[arm]]
                bandit.update(arm, min(1.0, max(0.0, 0.5 + gain / (2 * gain_scale))))
                arm = bandit.pull()
            state["last_val"] = v
            state["seconds"] += time.perf_counter() - t1
            # the window holds trained policies only: the base policy's score (step 0) is where training
            # started, not part of a plateau (with it, a flat objective such as fluency "converged" at step 6
            # of the default preset before its first gain, which came at step 8)
            if converged(state["val_history"][1:], conv_window, conv_threshold):
                state["converged_at"] = state["step"]
            row.update({f"val_{k}": x for k, x in v.items()}, val_mean=state["val_history"][-1])
            _append_log(log_path, row)
            save_adapter(out_dir, get_adapter(model), model.lora_config, base_model)
            if keep_best and (state["best"] is None or state["val_history"][-1] > state["best"]["val_mean"]):
                save_adapter(out_dir / "best", get_adapter(model), model.lora_config, base_model)
                state["best"] = {"step": state["step"], "val_mean": state["val_history"][-1], "val": v}
            _save_checkpoint(out_dir, opt, state, bandit)
        else:
            _append_log(log_path, row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}", val=f"{state['val_history'][-1]:.3f}")
    bar.close()

    # ---- summary ----------------------------------------------------------------------------------------
    best = state.get("best")
    if best is not None:                                                # early stopping: the best adapter
        set_adapter(model, load_adapter(out_dir / "best")[0])
    summary = {"objectives": objectives, "strategy": strategy, "weights": weights, "steps": state["step"],
               "data_points": state["data_points"], "seconds": round(state["seconds"], 2),
               "converged_at": state["converged_at"], "val_start": state["val_start"],
               "val_end": best["val"] if best else state["last_val"],     # the validation of the adapter kept
               "kept_step": best["step"] if best else state["step"], "val_last": state["last_val"],
               "kl_last": state.get("kl_last", 0.0)}
    if bandit:
        summary["final_weights"] = dict(zip(objectives, bandit.probs().round(4).tolist()))
    save_adapter(out_dir, get_adapter(model), model.lora_config, base_model)
    write_json(out_dir / "summary.json", summary)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "best", ignore_errors=True)
    return summary


def _save_checkpoint(out_dir, opt, state, bandit):
    tmp = out_dir / "checkpoint.pt.tmp"
    torch.save({"opt": opt.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                "bandit": bandit.state() if bandit else None}, tmp)
    tmp.replace(out_dir / "checkpoint.pt")


def _append_log(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(path, step):
    """Drop log lines written after the checkpoint we resume from."""
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
