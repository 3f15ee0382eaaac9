"""Typed errors the engine raises.

`UserInputError` is a mistake in what the user gave us (a path, a field, a line): the CLI
prints its message as one line and exits non-zero. The run errors (`OutOfMemory`,
`Diverged`) are outcomes of a configuration, not bugs: the driver records them and moves on.
"""

from __future__ import annotations


class BudgetuneError(Exception):
    """Base class for every error budgetune raises on purpose."""


class UserInputError(BudgetuneError):
    """Bad input from the user: the message names the file, field or line."""


class RunFailed(BudgetuneError):
    """A run ended without a result; subclasses say why."""

    reason = "failed"


class OutOfMemory(RunFailed):
    """The configuration does not fit in memory (CUDA OOM, or the CPU memory cap)."""

    reason = "oom"

    def __init__(self, micro_batch: int, max_seq_length: int, peak_memory_bytes: int) -> None:
        self.micro_batch = micro_batch
        self.max_seq_length = max_seq_length
        self.peak_memory_bytes = peak_memory_bytes
        super().__init__(
            f"out of memory at micro_batch={micro_batch}, max_seq_length={max_seq_length} "
            f"(peak {peak_memory_bytes / 2**20:.1f} MiB)"
        )


class Diverged(RunFailed):
    """The loss became NaN/inf or exploded past the configured factor of its start."""

    reason = "diverged"

    def __init__(self, step: int, loss: float, why: str) -> None:
        self.step = step
        self.loss = loss
        super().__init__(f"diverged at step {step}: {why} (loss={loss})")
