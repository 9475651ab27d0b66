"""Tests of lora.py and rl.py: the math against hand computations, the trainer's behaviour on a tiny model."""
import json
import math

import numpy as np
import pytest
import torch

import rl
from conftest import STATEMENTS, random_adapters, tiny_llama
from lora import (add_lora, fresh_adapter, get_adapter, load_adapter, lora_disabled, lora_layers, save_adapter,
                  set_adapter)


def logits_of(model, tok):
    ids, mask = rl.encode(tok, STATEMENTS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- LoRA ----------------------------------------------------------------------------------------------

def test_fresh_adapter_changes_nothing(tok):
    model = tiny_llama(tok)
    before = logits_of(model, tok)
    targets = add_lora(model, r=4, alpha=8, dropout=0.0)
    model.double()
    assert model.get_output_embeddings().__class__ is torch.nn.Linear          # the LM head is not wrapped
    assert len(targets) == 2 * 7                                                # q k v o gate up down per layer
    assert torch.equal(before, logits_of(model, tok))
    set_adapter(model, fresh_adapter(model, seed=3))
    assert torch.equal(before, logits_of(model, tok))


def test_adapter_changes_logits_and_disable_restores_base(tiny, tok):
    base = logits_of(tiny, tok)
    set_adapter(tiny, random_adapters(tiny, 1)[0])
    assert not torch.allclose(base, logits_of(tiny, tok))
    with lora_disabled(tiny):
        assert torch.equal(base, logits_of(tiny, tok))


def test_lora_forward_matches_dense_update(tiny):
    """y = W x + (alpha/r) B A x, checked against a dense weight built by hand."""
    a = random_adapters(tiny, 1)[0]
    set_adapter(tiny, a)
    name, layer = next(iter(lora_layers(tiny).items()))
    x = torch.randn(5, layer.base.in_features, dtype=torch.float64)
    dense = layer.base.weight + (8 / 4) * a[name][1] @ a[name][0]
    assert torch.allclose(layer(x), x @ dense.T, atol=1e-10)


def test_save_load_roundtrip_and_peft_layout(tiny, tok, tmp_path):
    set_adapter(tiny, random_adapters(tiny, 1)[0])
    before = logits_of(tiny, tok)
    save_adapter(tmp_path, get_adapter(tiny), tiny.lora_config, "tiny-base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    set_adapter(tiny, fresh_adapter(tiny, 0))
    adapter, _ = load_adapter(tmp_path)
    set_adapter(tiny, adapter)
    assert torch.equal(before, logits_of(tiny, tok))


def test_adapter_from_another_base_is_refused(tiny, tok):
    other = tiny_llama(tok, hidden=32)
    add_lora(other, r=4, alpha=8)
    with pytest.raises(ValueError, match="another base model"):
        set_adapter(tiny, get_adapter(other))


# ---- the math ------------------------------------------------------------------------------------------

def test_group_advantages_sum_to_zero():
    r = torch.tensor([[1.0, 2.0, 6.0], [-1.0, -1.0, 5.0]])
    a = rl.group_advantages(r)
    assert torch.allclose(a, torch.tensor([[-2.0, -1.0, 3.0], [-2.0, -2.0, 4.0]]))
    assert torch.allclose(a.sum(1), torch.zeros(2))


def test_ppo_loss_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.4, 0.9]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # ratios: [2, 1], [0.5, 1]; clipped at 0.2: [1.2, 1], [0.8, 1]
    # sample 1 (A=1): min(2, 1.2) = 1.2, min(1, 1) = 1;  sample 2 (A=-2): min(-1, -1.6) = -1.6 (masked: second)
    expected = -(1.2 + 1.0 - 1.6) / 3
    assert math.isclose(rl.ppo_loss(logp, old, adv, mask, 0.2).item(), expected, rel_tol=1e-6)


def test_ppo_gradient_is_policy_gradient_at_ratio_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)           # (BN, T, V)
    actions = torch.randint(0, 5, (4, 3))
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([0.5, -1.0, 2.0, -0.3])
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    g_ppo, = torch.autograd.grad(rl.ppo_loss(logp, logp.detach(), adv, mask), logits, retain_graph=True)
    pg = -(adv[:, None] * logp * mask).sum() / mask.sum()          # REINFORCE: -mean A * log pi
    g_pg, = torch.autograd.grad(pg, logits)
    assert torch.allclose(g_ppo, g_pg, atol=1e-7)


def test_kl_penalty_hand_computed_and_changes_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    q = math.log(0.5)                                              # log(ref/pi) at the first token
    expected = (math.exp(q) - q - 1 + 0.0) / 2
    assert math.isclose(rl.kl_penalty(logp, ref, mask).item(), expected, rel_tol=1e-6)
    assert rl.kl_penalty(ref, ref, mask).item() == 0.0
    # the KL term changes each sample's gradient even when advantages are zero
    logits = torch.randn(2, 3, 5, requires_grad=True)
    actions = torch.randint(0, 5, (2, 3))
    lp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    ref_lp = lp.detach() - 0.3
    m = torch.ones(2, 3)
    grads = []
    for beta in (0.0, 0.1):
        loss = rl.ppo_loss(lp, lp.detach(), torch.zeros(2), m) + beta * rl.kl_penalty(lp, ref_lp, m).mean()
        grads.append(torch.autograd.grad(loss, logits, retain_graph=True)[0])
    assert grads[0].abs().sum() == 0 and grads[1].abs().sum() > 0


def test_rewards_from_scores_log_clipped():
    r = rl.rewards_from_scores({"a": [0.5, 0.0], "b": [1.0, 0.25]}, {"a": 2.0, "b": 1.0})
    expected = [2 * math.log(0.5) + math.log(0.9999), 2 * math.log(1e-4) + math.log(0.25)]
    assert np.allclose(r.numpy(), expected, rtol=1e-5)


def test_exp3_hand_computed():
    b = rl.Exp3(3, gamma=0.3, seed=0)
    assert np.allclose(b.probs(), [1 / 3] * 3)
    b.update(1, 0.6)   # x_hat = 0.6 / (1/3) = 1.8; w_1 = exp(0.3 * 1.8 / 3) = exp(0.18)
    w = np.array([1.0, math.exp(0.18), 1.0])
    assert np.allclose(b.probs(), 0.7 * w / w.sum() + 0.1)
    s = b.state()
    arms = [b.pull() for _ in range(5)]
    b.load(s)
    assert arms == [b.pull() for _ in range(5)]                   # the bandit's state resumes exactly


def test_convergence_rule():
    assert not rl.converged([0.5, 0.5], window=3, threshold=0.015)
    assert rl.converged([0.1, 0.5, 0.5, 0.505], window=3, threshold=0.015)
    assert not rl.converged([0.1, 0.5, 0.6, 0.5], window=3, threshold=0.015)


def test_response_mask_stops_after_first_eos():
    t = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 3, 3, 3, 3]])
    assert rl.response_mask(t, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_sampled_logprobs_match_a_forward_pass(tiny, tok):
    set_adapter(tiny, random_adapters(tiny, 1, scale=0.1)[0])
    torch.manual_seed(0)
    roll = rl.sample(tiny, tok, STATEMENTS, 2, 6)
    assert roll["ids"].shape[0] == 6
    again = rl.token_logprobs(tiny, roll["ids"], roll["mask"], roll["P"]) * roll["resp_mask"]
    assert torch.allclose(roll["logp"], again, atol=1e-8)


# ---- the trainer ---------------------------------------------------------------------------------------

def fake_reward(prompts, texts, objectives):
    """A deterministic stand-in reward: share of vowels in the response."""
    s = np.array([sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts])
    return {k: s for k in objectives}


def run_train(model, tok, out, **kw):
    args = dict(weights={"reflection": 1.0}, steps=3, batch_size=2, n_samples=2, max_new_tokens=5, val_every=1,
                conv_window=50, seed=0, progress=False, lr=1e-2)
    args.update(kw)
    return rl.train(model, tok, fake_reward, STATEMENTS * 2, STATEMENTS[:2], out, **args)


def test_same_seed_same_adapter(tok, tmp_path):
    adapters = []
    for i in range(2):
        model = tiny_llama(tok)
        add_lora(model, r=4, alpha=8)
        model.double()
        s = run_train(model, tok, tmp_path / f"r{i}")
        adapters.append(get_adapter(model))
        assert s["steps"] == 3 and s["data_points"] == 6
    for n in adapters[0]:
        assert torch.equal(adapters[0][n][1], adapters[1][n][1])
    assert any(adapters[0][n][1].abs().sum() > 0 for n in adapters[0])   # it did train


def test_training_does_not_depend_on_the_models_prior_mode(tok, tmp_path):
    """The same seed gives the same adapter whether the model comes fresh from add_lora or was left in train mode
    by earlier work in the process (the step-0 validation must not draw dropout masks from the random stream)."""
    adapters = []
    for i, mode in enumerate([False, True]):
        model = tiny_llama(tok)
        add_lora(model, r=4, alpha=8, dropout=0.3)
        model.double().train(mode)
        run_train(model, tok, tmp_path / f"m{i}")
        adapters.append(get_adapter(model))
    for n in adapters[0]:
        assert torch.equal(adapters[0][n][1], adapters[1][n][1])


def test_keep_best_keeps_the_adapter_of_the_best_validation(tok, tmp_path):
    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8)
    model.double()
    s = run_train(model, tok, tmp_path / "best", steps=4, keep_best=True)
    log = [json.loads(l) for l in (tmp_path / "best" / "train_log.jsonl").read_text().splitlines()]
    i = int(np.argmax([r["val_mean"] for r in log]))                  # the first maximum, as the trainer keeps
    assert s["kept_step"] == log[i]["step"] and s["val_end"]["reflection"] == log[i]["val_reflection"]
    assert s["val_last"]["reflection"] == log[-1]["val_reflection"]
    kept, saved = get_adapter(model), load_adapter(tmp_path / "best")[0]
    assert not (tmp_path / "best" / "best").exists()                  # the temporary copy is gone
    ref = tiny_llama(tok)                                              # same seed, stopped at the kept step
    add_lora(ref, r=4, alpha=8)
    ref.double()
    run_train(ref, tok, tmp_path / "ref", steps=log[i]["step"], keep_best=False)
    for n, (A, B) in get_adapter(ref).items():
        assert torch.equal(B, kept[n][1]) and torch.equal(B, saved[n][1].to(B.dtype))


def test_convergence_window_counts_trained_validations_only(tok, tmp_path):
    """A constant reward is converged as soon as the window is full; the window must not count step 0 (the
    untrained policy), so with W = 2 and a validation every step the run stops at step 2, not 1."""
    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8)
    model.double()
    constant = lambda prompts, texts, objectives: {k: np.full(len(texts), 0.5) for k in objectives}
    s = rl.train(model, tok, constant, STATEMENTS * 2, STATEMENTS[:2], tmp_path, weights={"reflection": 1.0},
                 steps=5, batch_size=2, n_samples=2, max_new_tokens=4, val_every=1, conv_window=2, seed=0,
                 progress=False)
    assert s["converged_at"] == 2 and s["steps"] == 2 and s["data_points"] == 4


@pytest.mark.parametrize("strategy", ["fixed", "dynaopt"])
def test_interrupted_run_resumes_and_matches(tok, tmp_path, monkeypatch, strategy):
    weights = {"reflection": 0.5, "empathy": 0.5}
    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8)
    model.double()
    full = run_train(model, tok, tmp_path / "full", weights=weights, strategy=strategy, steps=4)
    full_adapter = get_adapter(model)

    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8)
    model.double()
    calls = {"n": 0}
    real_sample = rl.sample

    def dying_sample(*a, **k):   # killed during step 3 (checkpoints are written after every step here)
        calls["n"] += 1
        if calls["n"] == 3 + 3:  # 1 validation at step 0 + (1 rollout + 1 validation) per step
            raise KeyboardInterrupt
        return real_sample(*a, **k)

    monkeypatch.setattr(rl, "sample", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        run_train(model, tok, tmp_path / "cut", weights=weights, strategy=strategy, steps=4)
    monkeypatch.setattr(rl, "sample", real_sample)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    model = tiny_llama(tok)                                   # a fresh process would start from a fresh model
    add_lora(model, r=4, alpha=8)
    model.double()
    resumed = run_train(model, tok, tmp_path / "cut", weights=weights, strategy=strategy, steps=4)
    assert resumed["steps"] == 4 and resumed["data_points"] == full["data_points"]
    assert resumed["val_end"] == full["val_end"]
    for n, (A, B) in get_adapter(model).items():
        assert torch.allclose(B, full_adapter[n][1], atol=1e-12)
    log = [json.loads(l) for l in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
