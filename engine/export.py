"""What a run leaves behind: the adapter, a merged Hugging Face model, and generated text.

Merging always starts from a fresh copy of the base read from disk, never from the worker's
live base: `merge_and_unload` rewrites the weights it touches, and a worker that goes on to
run more trials must keep its base bit-for-bit as loaded (merging and unmerging in place
leaves rounding residue). For a 4-bit worker this is also the only correct merge: the adapter
goes into the full-precision base, not into its quantized copy.

The exported folder is plain Hugging Face (safetensors weights, tokenizer,
`generation_config.json`) plus a small `budgetune.json` saying where it came from, so
`AutoModelForCausalLM.from_pretrained`, lm-eval's `HFLM` and serving stacks load it as is.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from budgetune.engine.config import RunConfig
from budgetune.engine.errors import UserInputError
from budgetune.engine.model import load_tokenizer, peft_quietly, resolve_model_path
from budgetune.engine.template import Example, format_prompt

ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "budgetune.json"


def find_adapter(path: Path) -> Path:
    """The adapter folder itself, or the `adapter/` folder of a run directory."""
    path = Path(path).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if not path.exists():
        raise UserInputError(f"{path}: no such adapter or run folder")
    raise UserInputError(f"{path}: no {ADAPTER_CONFIG} here or in {path / 'adapter'}")


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as its `adapter_config.json` records it."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({e})") from e
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserInputError(
            f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base"
        )
    return str(base)


def load_with_adapter(
    base: str, adapter_dir: Path | None = None, dtype: str | torch.dtype = "auto"
) -> tuple[Any, Any]:
    """A fresh (model, tokenizer) from disk: the base, with the adapter applied if given."""
    from peft import PeftModel

    path = resolve_model_path(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{base}: cannot load as a causal LM ({e})") from e
    if adapter_dir is not None:
        with peft_quietly():
            model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, load_tokenizer(path)


def merge_adapter(
    adapter: Path, out_dir: Path, base: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Merge a saved adapter into its base and write a Hugging Face folder to `out_dir`.

    `adapter` may be the adapter folder or a run directory holding `adapter/`. The base is
    the one the adapter records unless `base` is given.
    """
    adapter_dir = find_adapter(adapter)
    base_name = base or adapter_base(adapter_dir)
    model, tokenizer = load_with_adapter(base_name, adapter_dir)
    merged = model.merge_and_unload()
    run_config = adapter_dir.parent / "config.json"
    info = {
        "base_model": base_name,
        "adapter": str(adapter_dir.resolve()),
        "lora": json.loads((adapter_dir / ADAPTER_CONFIG).read_text()),
        **(provenance or {}),
    }
    if "run_config" not in info and run_config.is_file():
        info["run_config"] = json.loads(run_config.read_text())
    return save_merged(merged, tokenizer, Path(out_dir), info)


def save_merged(model: Any, tokenizer: Any, out_dir: Path, info: dict[str, Any]) -> Path:
    """Write a merged model as a plain Hugging Face folder, with `budgetune.json` provenance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # An adapter left in the folder by an earlier export would make loaders (transformers,
    # lm-eval) treat the merged model as base + adapter.
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
        (out_dir / name).unlink(missing_ok=True)
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file():
        gen.save_pretrained(out_dir)
    try:
        ours = version("budgetune")
    except PackageNotFoundError:
        ours = "unknown"
    record = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budgetune_version": ours,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **info,
    }
    (out_dir / PROVENANCE).write_text(json.dumps(record, indent=2, default=str))
    return out_dir


def export_merged(
    peft_model: Any, tokenizer: Any, base_path: Path, out_dir: Path,
    config: RunConfig | None = None,
) -> Path:  # fmt: skip
    """Merge a live adapter into a fresh copy of its base read from `base_path`."""
    with tempfile.TemporaryDirectory(prefix="budgetune-adapter-") as tmp:
        adapter_dir = Path(tmp) / "adapter"
        peft_model.save_pretrained(adapter_dir)
        provenance: dict[str, Any] = {"base_path": str(base_path)}
        if config is not None:
            provenance["base_model"] = config.model
            provenance["run_config"] = json.loads(json.dumps(asdict(config), default=str))
            provenance["run_dir"] = str(config.out_dir)
        return merge_adapter(adapter_dir, out_dir, base=str(base_path), provenance=provenance)


@torch.no_grad()
def generate_text(
    model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 50,
    temperature: float = 0.0, top_k: int | None = None, template: bool = True,
) -> str:  # fmt: skip
    """The model's answer to `prompt`: greedy at temperature 0, else sampled.

    With `template`, the prompt is wrapped in the Alpaca template the engine trains with, so
    a finetuned model sees the format it learned.
    """
    if max_new_tokens < 1:
        raise UserInputError("max_new_tokens must be >= 1")
    if temperature < 0:
        raise UserInputError("temperature must be >= 0")
    text = format_prompt(Example(instruction=prompt, input="", response="")) if template else prompt
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt").to(device)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        # top_k=0 turns top-k filtering off (transformers' default would be 50).
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **sampling,
        )  # fmt: skip
    finally:
        model.train(was_training)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
