"""Stage 2 of EMORL (paper Sec. 3.2): generate with K fine-tuned models at once by aggregating their last hidden
states, and the two aggregation baselines the paper compares with (Sec. 4.3): logit level and parameter level.

Hidden-state aggregation, at every decoding step t:
    h_t = sum_k w_k h_{k,t}            (last hidden state of model k, after the final norm)      paper Eq. (2)
    y_t ~ softmax(lm_head(h_t) / tau)  (greedy: argmax), fed back to all K models
Each model keeps its own KV cache, so a step costs one token's forward per model, not a re-run over the prefix.
The K models are K LoRA adapters over ONE copy of the base weights (lora.lora_stacked): the batch holds K
slices of rows, slice k goes through adapter k's low-rank update, and the base matmuls are shared. On a CPU
at small batch, reading the base weights dominates, so K = 3 costs well under 3 single-model decodes.

An identity worth knowing (tested in test_aggregate.py): the LM head is linear without bias, so
    lm_head(sum_k w_k h_k) = sum_k w_k lm_head(h_k),
i.e. last-layer hidden-state aggregation IS a weighted sum of the K models' logits (a log-linear ensemble, the
rule of Multi-Objective Decoding, Shi et al. 2024), computed with one LM-head matmul instead of K. Two
consequences: with greedy decoding w and c*w (c > 0) give the same tokens, so the weight search may treat
points on one ray as one point; and the logit-level baseline, a mixture of probabilities, is a different rule.

Baselines:
  * logit level: p_t = sum_k w_k softmax(lm_head(h_k)) / sum_k w_k, decoded jointly (the chosen token is fed back
    to all K models);
  * parameter level (model soups / Rewarded Soups, Rame et al. 2023): one model with W + sum_k w_k dW_k, the
    ordinary single-model decode.

Legend: K models, S slices in the batch (K, or 1 for parameter level), B statements, P prompt tokens,
T new tokens, D hidden size, V vocabulary.

Departures from the authors' code (engineerkong/EMORL):
  1. KV caches instead of re-running every model on the whole prefix at every step (quadratic cost).
  2. Rows stop independently at EOS and nothing after a row's EOS is kept (theirs keeps going until all rows
     emit EOS at the same step, and keeps the tokens after EOS).
  3. The logit mode feeds the chosen token back (theirs does not), and the level is selectable (their
     `main()` always runs the logit mode).
  4. Weights are used as searched, not normalised (as in the paper); only the logit mixture normalises, since
     it must be a distribution.
"""

import torch
from transformers import DynamicCache

from lora import for_inference, lora_stacked, set_adapter
from rl import encode, eos_ids

LEVELS = ("hidden", "logit", "parameter")


# ----------------------------------------------------------------------------------------------------------
# the math

def aggregate_hidden(h, w):
    """h = sum_k w_k h_k.  h: (K, B, D), w: (K,) -> (B, D)"""
    return torch.einsum("k,kbd->bd", w.to(h.dtype), h)


def mix_probs(logits, w, temperature=1.0):
    """Logit-level mixture sum_k w_k softmax(logits_k / tau) / sum_k w_k.  logits: (K, B, V) -> (B, V)"""
    p = torch.softmax(logits.float() / temperature, -1)
    return torch.einsum("k,kbv->bv", (w / w.sum()).float(), p)


def top_p_filter(probs, top_p):
    """Keep the smallest set of tokens whose probability mass reaches top_p (nucleus sampling). (B, V) -> (B, V)"""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p                       # mass before this token already enough
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, idx, sorted_p)


def choose(probs, greedy, generator=None):
    """Next token from a distribution (B, V) -> (B,)"""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def check_weights(weights, k):
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
    if w.numel() != k:
        raise ValueError(f"got {w.numel()} weights for {k} models; give one weight per adapter")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError("all weights are zero: at least one model must have a positive weight")
    return w


# ----------------------------------------------------------------------------------------------------------
# the decoder

@for_inference
def ensemble_generate(model, tok, statements, adapters, weights, level="hidden", max_new_tokens=32, greedy=True,
                      temperature=1.0, top_p=1.0, seed=0, ignore_eos=False, batch_size=32):
    """Decode the statements with K adapters combined at `level`. Returns (texts, token lists without EOS)."""
    if level not in LEVELS:
        raise ValueError(f"unknown aggregation level {level!r}; known: {', '.join(LEVELS)}")
    if not statements:
        raise ValueError("no statements to generate for (empty prompt list)")
    if not adapters:
        raise ValueError("no adapters given: aggregation needs at least one fine-tuned model")
    w = check_weights(weights, len(adapters))
    generator = torch.Generator().manual_seed(seed)
    texts, tokens = [], []
    for i in range(0, len(statements), batch_size):
        t, ids = _decode_batch(model, tok, statements[i:i + batch_size], adapters, w, level, max_new_tokens, greedy,
                               temperature, top_p, generator, ignore_eos)
        texts += t
        tokens += ids
    return texts, tokens


def _decode_batch(model, tok, statements, adapters, w, level, max_new_tokens, greedy, temperature, top_p,
                  generator, ignore_eos):
    lm_head = model.get_output_embeddings()
    eos = torch.tensor(eos_ids(model, tok))
    ids, mask = encode(tok, statements)                                   # (B, P)
    B = ids.shape[0]
    S = 1 if level == "parameter" else len(adapters)
    stack = lora_stacked(model, adapters, weights=w.tolist() if level == "parameter" else None)
    with stack:
        mask = mask.repeat(S, 1)                                          # (S B, P): slice s = model s
        pos = (mask.cumsum(1) - 1).clamp(min=0)                           # left padding: positions from 0
        cache = DynamicCache(config=model.config)
        out = model.base_model(input_ids=ids.repeat(S, 1), attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True)
        last_pos = pos[:, -1]
        h = out.last_hidden_state[:, -1]                                  # (S B, D)
        new = torch.full((B, max_new_tokens), tok.pad_token_id)
        done = torch.zeros(B, dtype=torch.bool)
        for t in range(max_new_tokens):
            h = h.view(S, B, -1)                                          # (S, B, D)
            if level == "hidden":
                probs = torch.softmax(lm_head(aggregate_hidden(h, w)).float() / temperature, -1)  # (B, V)
            elif level == "logit":
                probs = mix_probs(lm_head(h), w, temperature)             # (B, V)
            else:
                probs = torch.softmax(lm_head(h[0]).float() / temperature, -1)
            y = choose(top_p_filter(probs, top_p), greedy, generator)     # (B,)
            y = torch.where(done, torch.tensor(tok.pad_token_id), y)      # finished rows only pad
            new[:, t] = y
            if not ignore_eos:
                done |= torch.isin(y, eos)
                if done.all():
                    break
            if t == max_new_tokens - 1:
                break                                                     # no forward for a token never used
            mask = torch.cat([mask, torch.ones(S * B, 1, dtype=mask.dtype)], 1)
            last_pos = last_pos + 1
            out = model.base_model(input_ids=y.repeat(S)[:, None], attention_mask=mask,
                                   position_ids=last_pos[:, None], cache=cache, use_cache=True)
            h = out.last_hidden_state[:, -1]
    token_lists = []
    for row in new.tolist():
        cut = next((j for j, x in enumerate(row) if x in eos.tolist()), None) if not ignore_eos else None
        token_lists.append(row[:cut] if cut is not None else row[:t + 1])
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in token_lists]
    return texts, token_lists


# ----------------------------------------------------------------------------------------------------------
# the authors' loop, kept as the reference for tests and the benchmark

@for_inference
def generate_full_recompute(model, tok, statements, adapters, weights, max_new_tokens=32, ignore_eos=False):
    """Greedy hidden-state aggregation the way the authors' code does it: at every step, every model re-runs
    the whole prefix (no cache). Quadratic in length; only for checking and timing the cached decoder."""
    w = check_weights(weights, len(adapters))
    eos = eos_ids(model, tok)
    ids, mask = encode(tok, statements)                                   # (B, P)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    rows = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        hs = []
        for a in adapters:
            set_adapter(model, a)
            hs.append(model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1])
        logits = model.get_output_embeddings()(aggregate_hidden(torch.stack(hs), w))     # (B, V)
        y = torch.where(done, torch.tensor(tok.pad_token_id), logits.argmax(-1))
        for b in range(B):
            if not done[b] and (ignore_eos or y[b].item() not in eos):
                rows[b].append(y[b].item())
        if not ignore_eos:
            done |= torch.isin(y, torch.tensor(eos))
            if done.all():
                break
        ids = torch.cat([ids, y[:, None]], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows], rows
