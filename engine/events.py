"""What a run tells its caller: eval events on the way, a result at the end.

The engine knows nothing of Optuna. The driver turns `EvalEvent`s into intermediate values
for its pruner through a plain callback; a callback returns True to ask the run to stop
(the run then checkpoints and returns with status "stopped").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalEvent:
    """One validation pass: where the run is and what it measured."""

    step: int
    """Optimizer steps done."""
    tokens_seen: int
    """Training tokens seen so far (non-padding)."""
    elapsed_s: float
    """Seconds this run has spent, carried over across resumes."""
    metrics: dict[str, float]
    """At least `val_loss`; also `train_loss`, `lr`, throughput figures."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Callback = Callable[[EvalEvent], "bool | None"]
"""Called after every validation pass; returning True asks the run to stop."""

StopCheck = Callable[[], bool]
"""Polled every optimizer step; True makes the run checkpoint and stop (Ctrl-C, a lost lease)."""


@dataclass
class RunResult:
    """What a finished (or stopped) run hands back."""

    status: str
    """`completed` (horizon reached) or `stopped` (a callback or stop check asked)."""
    step: int
    tokens_seen: int
    elapsed_s: float
    metrics: dict[str, float]
    """Final figures: val_loss, tokens_per_s, nonpad_tokens_per_s, padding_fraction,
    step_time_s, peak_memory_bytes, overhead_s, overhead_fraction, n_truncated, ..."""
    curve: list[EvalEvent] = field(default_factory=list)
    out_dir: Path | None = None
    adapter_dir: Path | None = None
    checkpoint_dir: Path | None = None
