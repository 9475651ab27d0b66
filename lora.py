"""LoRA, written out by hand (Hu et al. 2021), as EMORL fine-tunes its ensemble members (paper Sec. 3.1).

A wrapped linear layer computes  y = W x + (alpha / r) * B A dropout(x),  A: (r, in), B: (out, r), with B = 0
at the start so that a fresh adapter changes nothing. Every linear layer but the LM head is wrapped (the
authors' setting: r = 8, alpha = 32, dropout 0.05).

One copy of the base weights serves every use:
  * training: the adapter's A, B are the only trainable tensors;
  * the frozen reference policy pi_ref of the KL penalty: the same weights with the adapter switched off
    (`lora_disabled`), so no second model is kept in memory;
  * the ensemble decoder (aggregate.py): K adapters at once, "stacked". The batch holds K slices of rows, the
    k-th slice goes through adapter k's low-rank update while the base matmul W x is shared by all rows.
    Parameter-level aggregation sum_k w_k dW_k is the same mechanism with one slice of rank K r.

Adapters are saved as `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module>.lora_A.weight`) and config fields, so PEFT users can load them.

Departures from the paper / authors' code:
  1. Hand-written instead of peft, for reading; numerically the same update.
"""
import functools
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))   # A: (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))  # B: (out, r), zero => no change at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))          # PEFT's initialisation of A
        self.enabled = True
        self.stack = None  # (A: (S, R, in), B: (S, out, R)) with scaling folded into B, for stacked decoding

    def forward(self, x):
        y = self.base(x)
        if self.stack is not None:
            A, B = self.stack
            S = A.shape[0]
            xs = x.reshape(S, -1, x.shape[-1])                              # (S, rows*T, in): slice s = adapter s
            d = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))  # (S, rows*T, out)
            return y + d.reshape(y.shape)
        if not self.enabled:
            return y
        return y + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 32, dropout: float = 0.05, seed: int = 0):
    """Freeze the model and wrap every nn.Linear except the LM head; returns the wrapped module names.
    The model keeps its train/eval mode: new modules start in train mode, which would switch LoRA dropout on
    in a model loaded for inference."""
    training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    gen = torch.random.fork_rng()  # the adapter's init must not move the caller's random stream
    with gen:
        torch.manual_seed(seed)
        for name in targets:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, LoRALinear(getattr(holder, child), r, alpha, dropout))
    model.train(training)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "targets": targets}
    return targets


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def get_adapter(model) -> dict:
    """The current adapter as {module name: (A, B)} (detached copies)."""
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_layers(model).items()}


def set_adapter(model, adapter: dict):
    layers = lora_layers(model)
    if set(adapter) != set(layers):
        raise ValueError("adapter does not fit this model: its modules differ (trained on another base model?)")
    with torch.no_grad():
        for n, (A, B) in adapter.items():
            m = layers[n]
            if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
                raise ValueError(f"adapter does not fit this model at {n}: A {tuple(A.shape)}, B {tuple(B.shape)} "
                                 f"vs {tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)} (trained on another base model?)")
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)


@contextmanager
def evaluating(model):
    """Eval mode (no LoRA dropout) inside the block, the caller's mode restored after: for decoding."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def for_inference(fn):
    """Decorator for a decoding function whose first argument is the model: no gradients, eval mode."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with torch.no_grad(), evaluating(model):
            return fn(model, *args, **kwargs)
    return wrapper


@contextmanager
def lora_disabled(model):
    """The frozen reference policy pi_ref: the base weights alone."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@contextmanager
def lora_stacked(model, adapters: list, weights=None):
    """Decode S = len(adapters) models as one batch: rows [s*B:(s+1)*B] use adapter s.
    With `weights`, instead one slice whose update is sum_k w_k dW_k (parameter-level aggregation), written
    exactly as a rank-K*r adapter: sum_k w_k s B_k A_k = [w_1 s B_1 ... w_K s B_K] @ [A_1; ...; A_K]."""
    layers = lora_layers(model)
    for a in adapters:
        if set(a) != set(layers):
            raise ValueError("adapter does not fit this model: its modules differ (trained on another base model?)")
    for n, m in layers.items():
        As = [a[n][0] for a in adapters]
        Bs = [a[n][1] * m.scaling for a in adapters]
        for A, B in zip(As, Bs):
            if A.shape[1] != m.base.in_features or B.shape != (m.base.out_features, A.shape[0]):
                raise ValueError(f"adapter does not fit this model at {n} (trained on another base model?)")
        if weights is None:
            m.stack = (torch.stack(As), torch.stack(Bs))                     # (K, r, in), (K, out, r)
        else:
            Bw = [float(w) * B for w, B in zip(weights, Bs)]
            m.stack = (torch.cat(As)[None], torch.cat(Bw, dim=1)[None])      # (1, K r, in), (1, out, K r)
    try:
        yield model
    finally:
        for m in layers.values():
            m.stack = None


def merged_weights(model, adapters: list, weights) -> dict:
    """Dense base weights W + sum_k w_k (alpha/r) B_k A_k for every wrapped layer (model soups, written out)."""
    out = {}
    for n, m in lora_layers(model).items():
        delta = sum(float(w) * m.scaling * (a[n][1] @ a[n][0]) for w, a in zip(weights, adapters))
        out[n] = m.base.weight.detach() + delta                              # (out, in)
    return out


# ----------------------------------------------------------------------------------------------------------
# PEFT-compatible files

def _peft_key(name, which):
    return f"base_model.model.{name}.lora_{which}.weight"


def save_adapter(folder, adapter: dict, lora_config: dict, base_model: str):
    """Atomically write adapter_config.json + adapter_model.safetensors (PEFT layout) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, (A, B) in adapter.items():
        tensors[_peft_key(n, "A")] = A.contiguous()
        tensors[_peft_key(n, "B")] = B.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora_config["r"], "lora_alpha": lora_config["lora_alpha"], "lora_dropout": lora_config["lora_dropout"],
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapter}), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False,
    }
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, folder / "adapter_model.safetensors")
    write_json(folder / "adapter_config.json", config)


def load_adapter(folder) -> tuple:
    """(adapter {module: (A, B)}, config) from a PEFT-layout folder."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").exists() or not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter in {folder} (adapter_config.json + adapter_model.safetensors); "
                                f"train it first (python emorl.py train ...)")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    adapter = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            adapter[name] = (tensors[key], tensors[_peft_key(name, "B")])
    return adapter, config


def write_json(path, obj):
    """Atomic JSON write: a temp file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fresh_adapter(model, seed: int) -> dict:
    """A new adapter as add_lora makes it: A ~ PEFT's Kaiming-uniform init (seeded), B = 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in lora_layers(model).items():
        bound = 1 / math.sqrt(m.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in))
        A = (torch.rand(m.lora_A.shape, generator=g, dtype=m.lora_A.dtype) * 2 - 1) * bound
        out[n] = (A, torch.zeros_like(m.lora_B))
    return out
