"""Shared test fixtures: a tiny random Llama with the default tokenizer (fast), and K random adapters."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import assets
from lora import add_lora, lora_layers


@pytest.fixture(scope="session")
def tok():
    return assets.load_generator()[1]


def tiny_llama(tok, seed=0, hidden=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).double().eval()   # float64: greedy ties cannot flip on float noise
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def random_adapters(model, k, seed=0, scale=0.3):
    """K adapters with non-zero B (a fresh adapter has B = 0 and would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        a = {}
        for n, m in lora_layers(model).items():
            A = torch.randn(m.lora_A.shape, generator=g, dtype=m.lora_A.dtype) * scale
            B = torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * scale
            a[n] = (A, B)
        out.append(a)
    return out


@pytest.fixture
def tiny(tok):
    model = tiny_llama(tok)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    model.double()
    return model


STATEMENTS = ["I failed my exam again and my dad will be furious.",
              "My wife left me.",
              "Nobody at work talks to me any more and lunch breaks are the worst part of my day."]
