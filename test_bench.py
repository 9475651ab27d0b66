"""Tier 1 test of bench.py: its sequential K-cache loop (the benchmark's second implementation) gives the same
tokens as the stacked ensemble decoder and the authors' full-recompute loop."""
from aggregate import ensemble_generate, generate_full_recompute
from bench import sequential_generate
from conftest import STATEMENTS, random_adapters


def test_sequential_loop_equals_stacked_decoder(tiny, tok):
    adapters = random_adapters(tiny, 3, seed=7)
    w = [0.5, 0.3, 0.2]
    seq = sequential_generate(tiny, tok, STATEMENTS, adapters, w, max_new_tokens=10)
    _, ours = ensemble_generate(tiny, tok, STATEMENTS, adapters, w, "hidden", max_new_tokens=10, ignore_eos=True)
    _, full = generate_full_recompute(tiny, tok, STATEMENTS, adapters, w, max_new_tokens=10, ignore_eos=True)
    assert seq == ours == full
    assert all(len(row) == 10 for row in seq)
