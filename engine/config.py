"""Typed configuration of one finetune run.

A `RunConfig` is everything the engine needs for one run; the search driver builds one per
trial from a study file and the sampled parameters. Defaults equal Lit-GPT's 2023
`finetune/lora.py`, so `budgetune train` with no overrides is the run our users know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from budgetune.engine.errors import UserInputError

Precision = Literal["bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true"]
PRECISIONS: tuple[str, ...] = ("bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true")
Schema = Literal["dolly", "alpaca", "oasst1", "flan", "lima"]
SCHEMAS: tuple[str, ...] = ("dolly", "alpaca", "oasst1", "flan", "lima")
TARGETS: tuple[str, ...] = ("attention", "all-linear")


@dataclass
class SourceSpec:
    """One instruction dataset: a local file (JSON, JSONL, Parquet) or a hub dataset id."""

    name: str
    """Short name, used for mixture weights and cache keys."""
    path: str
    """Local file/folder, or a hub dataset id such as `databricks/databricks-dolly-15k`."""
    schema: Schema
    """Which public schema the rows follow."""
    split: str = "train"
    """Hub split to read (ignored for local files)."""
    limit: int | None = None
    """Use at most this many examples (after filtering), for quick runs."""


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the adapter's update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: str = "attention"
    """`attention` (query+value, Lit-GPT's default) or `all-linear`."""


@dataclass
class RunConfig:
    """One finetune run. Horizon: exactly one of max_steps, max_tokens, max_seconds."""

    model: str
    """Local folder or hub id of the base model."""
    sources: list[SourceSpec]
    """Training sources; mixed by `weights`."""
    val: SourceSpec
    """The fixed validation set; it never changes with the mix."""
    out_dir: Path
    """Run directory: metrics.jsonl, checkpoints, adapter, export."""
    weights: dict[str, float] | None = None
    """Mixture weights by source name (normalized); None means proportional to size."""
    precision: str = "32-true"
    """Fabric precision: bf16-true, bf16-mixed, 16-true, 16-mixed, 32-true."""
    quantize: str | None = None
    """`nf4` loads the base weights in 4-bit (CUDA + bitsandbytes only)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    """Optimizer steps of linear warmup (capped at half the horizon)."""
    global_batch: int = 128
    """Examples per optimizer step; reached by gradient accumulation over micro-batches."""
    micro_batch: int = 4
    max_seq_length: int = 2048
    """Examples are truncated to this many tokens (counted and reported)."""
    mask_prompt: bool = False
    """Exclude prompt tokens from the loss."""
    grad_clip: float = 1.0
    max_steps: int | None = None
    """Horizon in optimizer steps."""
    max_tokens: int | None = None
    """Horizon in training tokens (non-padding)."""
    max_seconds: float | None = None
    """Horizon in seconds of wall time; the LR schedule is fitted after measuring throughput."""
    eval_interval: int = 100
    """Optimizer steps between validation passes (and callback calls)."""
    eval_batches: int | None = None
    """Validate on at most this many micro-batches of the fixed set (None: all of it)."""
    eval_examples: int | None = None
    """Validate on at most this many examples of the fixed set (the first in file order): the
    same examples whatever the micro_batch, so trials that differ in it compare fairly."""
    checkpoint_interval: int | None = None
    """Optimizer steps between checkpoints (None: at every eval)."""
    seed: int = 1337
    divergence_factor: float = 4.0
    """Stop as diverged when the loss exceeds this factor of its starting value."""
    memory_cap_bytes: int | None = None
    """CPU only: treat a run whose process exceeds this many bytes as out of memory."""
    cache_dir: Path | None = None
    """Where tokenized data is cached (default: ~/.cache/budgetune/data)."""
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        problems = self.problems()
        if problems:
            raise UserInputError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, so a user fixes them all in one pass."""
        p: list[str] = []
        if self.precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            p.append(f"precision {self.precision!r} is unknown (choose one of {choices})")
        if self.quantize not in (None, "nf4"):
            p.append(f"quantize {self.quantize!r} is unknown (only 'nf4')")
        if self.lora.r < 1:
            p.append("lora.r must be >= 1")
        if self.lora.alpha <= 0:
            p.append("lora.alpha must be > 0")
        if not 0 <= self.lora.dropout < 1:
            p.append("lora.dropout must be in [0, 1)")
        if self.lora.targets not in TARGETS:
            p.append(
                f"lora.targets {self.lora.targets!r} is unknown (choose attention or all-linear)"
            )
        if self.learning_rate <= 0:
            p.append("learning_rate must be > 0")
        if self.weight_decay < 0:
            p.append("weight_decay must be >= 0")
        if self.warmup_steps < 0:
            p.append("warmup_steps must be >= 0")
        if self.micro_batch < 1:
            p.append("micro_batch must be >= 1")
        if self.global_batch < self.micro_batch or self.global_batch % self.micro_batch:
            p.append(
                f"global_batch ({self.global_batch}) must be a multiple of "
                f"micro_batch ({self.micro_batch})"
            )
        if self.max_seq_length < 8:
            p.append("max_seq_length must be >= 8")
        horizons = [h for h in (self.max_steps, self.max_tokens, self.max_seconds) if h is not None]
        if len(horizons) != 1:
            p.append("set exactly one of max_steps, max_tokens, max_seconds")
        elif horizons[0] <= 0:
            p.append("the horizon (max_steps/max_tokens/max_seconds) must be > 0")
        if self.eval_interval < 1:
            p.append("eval_interval must be >= 1")
        if self.eval_examples is not None and self.eval_examples < 1:
            p.append("eval_examples must be >= 1")
        if not self.sources:
            p.append("sources must name at least one dataset")
        for s in [*self.sources, self.val]:
            if s.schema not in SCHEMAS:
                choices = ", ".join(SCHEMAS)
                p.append(f"source {s.name!r}: schema {s.schema!r} is unknown (choose {choices})")
        if self.weights is not None:
            names = {s.name for s in self.sources}
            unknown = set(self.weights) - names
            if unknown:
                p.append(f"weights name unknown sources: {', '.join(sorted(unknown))}")
            if any(w < 0 for w in self.weights.values()):
                p.append("weights must be >= 0")
            if sum(self.weights.get(n, 0.0) for n in names) <= 0:
                p.append("weights must give at least one source a positive weight")
        return p

    @property
    def grad_accum(self) -> int:
        return self.global_batch // self.micro_batch
