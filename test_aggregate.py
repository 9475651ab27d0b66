"""Tier 1-2 tests of aggregate.py: the cached ensemble decoder against independent computations."""
import pytest
import torch

from aggregate import aggregate_hidden, ensemble_generate, generate_full_recompute, mix_probs, top_p_filter
from conftest import STATEMENTS, random_adapters, tiny_llama
from lora import add_lora, lora_stacked, merged_weights, lora_layers, set_adapter
from rl import encode


def hf_greedy(model, tok, statements, adapter, n):
    """The single fine-tuned model decoded by HF generate, one row at a time (no padding involved)."""
    set_adapter(model, adapter)
    out = []
    for s in statements:
        ids, mask = encode(tok, [s])
        g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        row = g[0, ids.shape[1]:].tolist()
        out.append(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_hidden_equals_single_model_generate(tiny, tok, k):
    adapters = random_adapters(tiny, 3)
    w = [0.0, 0.0, 0.0]
    w[k] = 1.0
    _, ours = ensemble_generate(tiny, tok, STATEMENTS, adapters, w, "hidden", max_new_tokens=12)
    assert ours == hf_greedy(tiny, tok, STATEMENTS, adapters[k], 12)


def test_cached_decoder_equals_full_recompute(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=1)
    w = [0.7, 0.2, 0.4]
    _, ours = ensemble_generate(tiny, tok, STATEMENTS, adapters, w, "hidden", max_new_tokens=10)
    _, ref = generate_full_recompute(tiny, tok, STATEMENTS, adapters, w, max_new_tokens=10)
    assert ours == ref


def test_hidden_aggregation_is_weighted_sum_of_logits(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=2)
    w = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    ids, mask = encode(tok, STATEMENTS)
    with lora_stacked(tiny, adapters):
        pos = (mask.repeat(3, 1).cumsum(1) - 1).clamp(min=0)
        h = tiny.base_model(input_ids=ids.repeat(3, 1), attention_mask=mask.repeat(3, 1),
                            position_ids=pos).last_hidden_state[:, -1].view(3, len(STATEMENTS), -1)
    head = tiny.get_output_embeddings()
    lhs = head(aggregate_hidden(h, w))
    rhs = sum(w[k] * head(h[k]) for k in range(3))
    assert torch.allclose(lhs, rhs, atol=1e-10)
    # and the stacked forward gives each model's own hidden state (second implementation: one adapter at a time)
    for k in range(3):
        set_adapter(tiny, adapters[k])
        hk = tiny.base_model(input_ids=ids, attention_mask=mask, position_ids=pos[:len(STATEMENTS)]).last_hidden_state[:, -1]
        assert torch.allclose(hk, h[k], atol=1e-10)


def test_scaling_weights_keeps_greedy_tokens(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=3)
    w = [0.3, 0.5, 0.9]
    _, a = ensemble_generate(tiny, tok, STATEMENTS, adapters, w, max_new_tokens=10)
    _, b = ensemble_generate(tiny, tok, STATEMENTS, adapters, [4 * x for x in w], max_new_tokens=10)
    _, c = ensemble_generate(tiny, tok, STATEMENTS, adapters, [0.9, 0.5, 0.3], max_new_tokens=10)
    assert a == b
    assert a != c  # the test can fail: another direction does change the output


@pytest.mark.parametrize("level", ["hidden", "logit", "parameter"])
def test_padded_batch_equals_rows_alone(tiny, tok, level):
    adapters = random_adapters(tiny, 2, seed=4)
    _, batch = ensemble_generate(tiny, tok, STATEMENTS, adapters, [0.6, 0.4], level, max_new_tokens=10)
    alone = [ensemble_generate(tiny, tok, [s], adapters, [0.6, 0.4], level, max_new_tokens=10)[1][0]
             for s in STATEMENTS]
    assert batch == alone


def test_logit_mixture_one_hot_equals_single_model(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=5)
    _, ours = ensemble_generate(tiny, tok, STATEMENTS, adapters, [0, 1, 0], "logit", max_new_tokens=12)
    assert ours == hf_greedy(tiny, tok, STATEMENTS, adapters[1], 12)


def test_mix_probs_hand_computed():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0986122886681098]]])   # (K=2, B=1, V=2); e^1.0986 = 3
    p = mix_probs(logits, torch.tensor([1.0, 3.0]))
    # model 1: (1/2, 1/2); model 2: (1/4, 3/4); mixture 1/4 * m1 + 3/4 * m2
    assert torch.allclose(p, torch.tensor([[0.25 * 0.5 + 0.75 * 0.25, 0.25 * 0.5 + 0.75 * 0.75]]), atol=1e-6)


def test_top_p_filter_keeps_nucleus():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(top_p_filter(p, 0.7) > 0, torch.tensor([[True, True, False, False]]))
    assert torch.equal(top_p_filter(p, 1.0), p)


def test_parameter_level_equals_dense_merge(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=6)
    for w in ([0.0, 1.0, 0.0], [0.2, 0.5, 0.3]):
        _, ours = ensemble_generate(tiny, tok, STATEMENTS, adapters, w, "parameter", max_new_tokens=10)
        # second implementation: write W + sum_k w_k dW_k into the base weights, adapter off
        merged = merged_weights(tiny, adapters, w)
        layers = lora_layers(tiny)
        saved = {n: m.base.weight.detach().clone() for n, m in layers.items()}
        zero = {n: (torch.zeros_like(m.lora_A), torch.zeros_like(m.lora_B)) for n, m in layers.items()}
        with torch.no_grad():
            for n, m in layers.items():
                m.base.weight.copy_(merged[n])
        try:
            _, ref = ensemble_generate(tiny, tok, STATEMENTS, [zero], [1.0], "hidden", max_new_tokens=10)
        finally:
            with torch.no_grad():
                for n, m in layers.items():
                    m.base.weight.copy_(saved[n])
        assert ours == ref


def test_sampling_is_seeded(tiny, tok):
    adapters = random_adapters(tiny, 2, seed=7)
    a = ensemble_generate(tiny, tok, STATEMENTS, adapters, [1, 1], greedy=False, top_p=0.9, seed=3, max_new_tokens=8)
    b = ensemble_generate(tiny, tok, STATEMENTS, adapters, [1, 1], greedy=False, top_p=0.9, seed=3, max_new_tokens=8)
    assert a == b


def test_bad_input(tiny, tok):
    adapters = random_adapters(tiny, 2, seed=8)
    with pytest.raises(ValueError, match="one weight per adapter"):
        ensemble_generate(tiny, tok, STATEMENTS, adapters, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble_generate(tiny, tok, STATEMENTS, adapters, [1.0, -0.5])
    with pytest.raises(ValueError, match="all weights are zero"):
        ensemble_generate(tiny, tok, STATEMENTS, adapters, [0.0, 0.0])
    with pytest.raises(ValueError, match="empty prompt list"):
        ensemble_generate(tiny, tok, [], adapters, [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown aggregation level"):
        ensemble_generate(tiny, tok, STATEMENTS, adapters, [1.0, 1.0], "token")
    wrong = {n: (A[:, :-1], B) for n, (A, B) in adapters[0].items()}   # another base's shapes
    with pytest.raises(ValueError, match="another base model"):
        ensemble_generate(tiny, tok, STATEMENTS, [wrong, adapters[1]], [1.0, 1.0])


def test_decoding_runs_without_dropout_whatever_the_mode(tok):
    """LoRA dropout must never act while decoding: add_lora keeps a loaded model in eval mode, and the decoders
    give the same tokens when the caller left the model in train mode (and give that mode back)."""
    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8, dropout=0.5)
    model.double()
    assert not any(m.training for m in model.modules())
    adapters = random_adapters(model, 2, seed=3)
    w = [0.6, 0.4]
    hidden = ensemble_generate(model, tok, STATEMENTS, adapters, w, "hidden", max_new_tokens=8)[1]
    full = generate_full_recompute(model, tok, STATEMENTS, adapters, w, max_new_tokens=8)[1]
    model.train()
    set_adapter(model, adapters[0])
    ids, mask = encode(tok, STATEMENTS[:1])
    with torch.no_grad():   # dropout does act in train mode, so the checks below can fail
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert ensemble_generate(model, tok, STATEMENTS, adapters, w, "hidden", max_new_tokens=8)[1] == hidden
    assert generate_full_recompute(model, tok, STATEMENTS, adapters, w, max_new_tokens=8)[1] == full
    assert all(m.training for m in model.modules())
