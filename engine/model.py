"""Loading a base model and tokenizer, and putting a LoRA adapter on it.

A base model is named by a local folder or a Hugging Face hub id. Hub ids keep the real
`snapshot_download` path (into the usual HF cache), so a machine with network fetches the
model and one without it gets one line saying how to fetch it, never a traceback.

LoRA comes from peft: `attention` targets are Lit-GPT 2023's default (query and value
projections), resolved per architecture from `config.model_type`; `all-linear` targets every
linear layer of the transformer blocks (never the output head, whose vocabulary-sized
adapter would dwarf the rest).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from budgetune.engine.config import LoraSettings, RunConfig
from budgetune.engine.errors import UserInputError
from budgetune.engine.events import Callback, RunResult, StopCheck
from budgetune.engine.memory import release_memory

ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "RefinedWebModel": ("query_key_value",),
    "gpt2": ("c_attn",),
}
"""LoRA targets for `targets="attention"`, by `model_type`: the families the challenge permits.

Fused query/key/value projections (GPT-NeoX, Falcon, GPT-2) are adapted as a whole, as
Lit-GPT does for those models; split ones get query and value only.
"""

DTYPES: dict[str, torch.dtype] = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-mixed": torch.float32,
    "16-mixed": torch.float32,
    "32-true": torch.float32,
}
"""The dtype base weights are loaded in for each Fabric precision.

Loading straight into the training dtype means a 7B model in bf16-true never needs the
28 GB a float32 copy would take; mixed precisions keep float32 weights and autocast.
"""

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass
class LoadedModel:
    """A base model ready for adapters, with what it took to get it."""

    model: PreTrainedModel
    path: Path
    """The local folder it was read from (a hub snapshot for hub ids)."""
    load_s: float
    quantized: bool


def looks_like_path(name: str) -> bool:
    """A name the user meant as a folder, not a hub id (`./m`, `/x/m`, `~/m`, `runs/m`...)."""
    if name.startswith((".", "/", "~")):
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.exists()


def resolve_model_path(name: str, download: bool = True) -> Path:
    """The local folder holding model `name`, downloading a hub id into the HF cache.

    The cache is tried first without network, so an offline machine that ran
    `budgetune prepare` never touches the hub.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserInputError(f"{name}: not a model folder (no config.json)")
        return local
    if looks_like_path(name):
        raise UserInputError(f"{name}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except HFValidationError as e:
        raise UserInputError(f"model {name!r}: not a folder and not a valid hub id") from e
    except OSError:
        pass
    how = f"run `budgetune prepare <study>` or `huggingface-cli download {name}` with network"
    if not download:
        raise UserInputError(f"model {name!r} is not in the Hugging Face cache: {how}")
    try:
        path = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
        if not any(path.glob("*.safetensors")):
            # Older checkpoints (some Pythia, Falcon revisions) only ship pickled weights.
            path = Path(snapshot_download(name, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except OSError as e:
        raise UserInputError(
            f"model {name!r} is not cached and the hub is unreachable ({type(e).__name__}): {how}"
        ) from e
    return path


def load_tokenizer(path: Path):
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path}: cannot load a tokenizer ({e})") from e
    if tokenizer.pad_token_id is None:
        # Padding is masked out of the loss and attention, so any id works; EOS is what
        # Llama/NeoX/Falcon finetunes conventionally use.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    name: str, precision: str = "32-true", quantize: str | None = None
) -> LoadedModel:
    """The base model in the dtype its Fabric precision trains in, frozen, in eval mode.

    `quantize="nf4"` loads the frozen base weights in 4-bit NormalFloat (QLoRA) through
    bitsandbytes; it needs CUDA, so it is refused up front on any other machine.
    """
    if precision not in DTYPES:
        raise UserInputError(
            f"precision {precision!r} is unknown (choose one of {', '.join(DTYPES)})"
        )
    if quantize not in (None, "nf4"):
        raise UserInputError(f"quantize {quantize!r} is unknown (only 'nf4')")
    if quantize and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        raise UserInputError("quantize=nf4 needs a CUDA GPU and bitsandbytes")
    path = resolve_model_path(name)
    start = time.perf_counter()
    dtype = DTYPES[precision]
    kwargs: dict = {"dtype": dtype}
    if quantize:
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{name}: cannot load as a causal LM ({e})") from e
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model, path, time.perf_counter() - start, quantized=bool(quantize))


def output_module_names(model: torch.nn.Module) -> set[str]:
    """Qualified names of the output head (`lm_head`, `embed_out`), never a LoRA target."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def lora_targets(model: torch.nn.Module, targets: str) -> list[str]:
    """Module-name suffixes peft should adapt, for `attention` or `all-linear`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets == "attention":
        if model_type not in ATTENTION_TARGETS:
            raise UserInputError(
                f"model_type {model_type!r} has no known LoRA targets "
                f"(supported: {', '.join(sorted(ATTENTION_TARGETS))}; or use targets=all-linear)"
            )
        return list(ATTENTION_TARGETS[model_type])
    if targets != "all-linear":
        raise UserInputError(f"lora.targets {targets!r} is unknown (attention or all-linear)")
    head = output_module_names(model)
    leaves: list[str] = []
    for name, module in model.named_modules():
        if name in head or not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    if not leaves:
        raise UserInputError(f"model_type {model_type!r} has no linear layers to adapt")
    return leaves


def add_lora(model: PreTrainedModel, settings: LoraSettings):
    """Wrap `model` in a fresh peft LoRA adapter; only the adapter's weights train.

    The adapter's update is `(alpha / r) * B @ A`, with B initialised to zero, so the wrapped
    model computes exactly the base model until the first optimizer step.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings.targets),
        exclude_modules=sorted(output_module_names(model)) or None,
        fan_in_fan_out=model.config.model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype=False: the adapter lives in the base dtype, as Lit-GPT's does,
    # so bf16-true trains a bf16 adapter instead of silently mixing precisions.
    with peft_quietly():
        return get_peft_model(model, config, autocast_adapter_dtype=False)


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap an adapter's creation or loading: peft asks transformers' deprecated
    `is_gradient_checkpointing` every time, a note for peft's maintainers that would
    otherwise print once per trial and once per export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def remove_lora(peft_model) -> PreTrainedModel:
    """The base model with the adapter's layers taken out (not merged): as it was loaded."""
    base = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameters the optimizer will update."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_cpu_threads() -> int:
    """Use one intra-op thread when the CPUs are already busy; leave torch's choice otherwise.

    OpenMP threads spin-wait on each other: on a machine whose load average already fills its
    cores, two threads run a tiny model's step several times slower than one (measured 10x on
    2 busy cores). An explicit OMP_NUM_THREADS is always respected.
    """
    if os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    return torch.get_num_threads()


# --- one base model, many adapters -------------------------------------------------------------


class Worker:
    """One base model loaded once, finetuned by many runs, each with its own fresh adapter.

    The search driver keeps one Worker per process: loading a 7B base costs a minute, a
    trial's adapter a second. After `run()` the last run's adapter stays on the model (for
    in-memory evaluation, export, generation) until the next `run()` replaces it.
    """

    def __init__(
        self, model: str, *, precision: str = "32-true", quantize: str | None = None,
        quiet: bool = False,
    ) -> None:  # fmt: skip
        from lightning.fabric import Fabric

        self.name = model
        set_cpu_threads()
        self.precision = precision
        self.quantize = quantize
        self.quiet = quiet
        loaded = load_base_model(model, precision, quantize)
        self.path = loaded.path
        self.fabric = Fabric(accelerator="auto", devices=1, precision=precision)
        self._base = loaded.model if loaded.quantized else self.fabric.to_device(loaded.model)
        self.tokenizer = load_tokenizer(loaded.path)
        self.model_load_s = loaded.load_s
        self._peft: Any = None
        self.last_peak_bytes = 0
        """Peak memory of the last run (also of one that failed)."""
        self.last_config: RunConfig | None = None
        # Everything alive now (libraries, the base model) lives as long as the worker: moving
        # it out of the collector's sight makes the gc.collect() each run starts with (to give
        # back the previous adapter at once) take microseconds instead of ~0.6 s.
        gc.freeze()

    @property
    def model(self) -> torch.nn.Module:
        """The base model with the last run's adapter active (the bare base before any run)."""
        return self._peft if self._peft is not None else self._base

    def run(
        self, config: RunConfig, callbacks: Sequence[Callback] = (),
        stop_check: StopCheck | None = None, resume: bool = True,
    ) -> RunResult:  # fmt: skip
        """Train a fresh adapter per `config`; resume from `out_dir/checkpoints` when allowed.

        Raises `OutOfMemory` or `Diverged` after giving back everything the run allocated,
        so the same worker runs the next configuration as a fresh process would.
        """
        from budgetune.engine.train import run_on

        return run_on(self, config, callbacks, stop_check, resume)

    def attach_adapter(self, settings: LoraSettings) -> Any:
        """Put a fresh LoRA adapter on the base (the previous one must be dropped first)."""
        if self._peft is not None:
            raise RuntimeError("attach_adapter: drop the previous adapter first")
        self._peft = add_lora(self._base, settings)
        return self._peft

    def check_compatible(self, config: RunConfig) -> None:
        """Refuse a config this worker's base cannot run (another model or precision)."""
        if config.precision != self.precision or config.quantize != self.quantize:
            raise UserInputError(
                f"run config asks precision={config.precision}, quantize={config.quantize} but "
                f"the worker loaded {self.name} with precision={self.precision}, "
                f"quantize={self.quantize} (the base model is loaded once per worker)"
            )
        if config.model != self.name and resolve_model_path(config.model, False) != self.path:
            raise UserInputError(
                f"run config model {config.model!r} is not the worker's {self.name!r}"
            )

    def drop_adapter(self) -> None:
        """Take the current adapter off the base and free its weights, optimizer and caches."""
        if self._peft is not None:
            self._base = remove_lora(self._peft)
            self._peft = None
        self._base.eval()
        release_memory()

    def export_merged(self, out_dir: Path) -> Path:
        """Merge the current adapter into a copy of the base and save a Hugging Face folder."""
        from budgetune.engine.export import export_merged

        if self._peft is None:
            raise UserInputError("export_merged: no adapter yet (call run() first)")
        return export_merged(self._peft, self.tokenizer, self.path, Path(out_dir), self.last_config)

    def generate(
        self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
        top_k: int | None = None, template: bool = True,
    ) -> str:  # fmt: skip
        """Answer `prompt` with the current model (greedy at temperature 0)."""
        from budgetune.engine.export import generate_text

        return generate_text(
            self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, template=template,
        )  # fmt: skip
