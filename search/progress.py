"""What a person watching a study sees: a live budget bar on a terminal, plain lines in logs.

The driver calls the same few methods whatever is attached: `RichProgress` (a live display:
budget bar, current trial, best value) when stderr is a terminal, `LineProgress` (one line
per finished trial, for logs and CI) otherwise, `NullProgress` in tests.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def begin(self, study_name: str, total_s: float) -> None: ...
    def update(self, spent_s: float, line: str) -> None: ...
    def trial(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_done(
        self, number: int, outcome: str, value: float | None, best: float | None
    ) -> None: ...
    def log(self, message: str) -> None: ...
    def end(self) -> None: ...


class NullProgress:
    """Shows nothing."""

    def begin(self, study_name: str, total_s: float) -> None:
        pass

    def update(self, spent_s: float, line: str) -> None:
        pass

    def trial(self, number: int, params: dict[str, Any]) -> None:
        pass

    def trial_done(
        self, number: int, outcome: str, value: float | None, best: float | None
    ) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def end(self) -> None:
        pass


def describe(params: dict[str, Any]) -> str:
    """Short `name=value` text of sampled parameters (mixture weights summarized)."""
    parts = []
    for k, v in params.items():
        if k == "weights" or k.startswith("mix."):
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    if params.get("weights"):
        mix = "/".join(f"{n}:{w:.2f}" for n, w in params["weights"].items())
        parts.append(f"mix={mix}")
    return " ".join(parts)


class LineProgress(NullProgress):
    """One line per event worth keeping in a log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, study_name: str, total_s: float) -> None:
        self._print(f"study {study_name}: budget {total_s:.0f} s")

    def trial(self, number: int, params: dict[str, Any]) -> None:
        self._print(f"trial {number}: {describe(params)}")

    def trial_done(
        self, number: int, outcome: str, value: float | None, best: float | None
    ) -> None:
        v = "" if value is None else f" value {value:.4f}"
        b = "" if best is None else f" (best {best:.4f})"
        self._print(f"trial {number}: {outcome}{v}{b}")

    def log(self, message: str) -> None:
        self._print(message)


class RichProgress(LineProgress):
    """A live display on a terminal: budget bar, current trial, best value so far."""

    def __init__(self) -> None:
        from rich.console import Console

        super().__init__()
        self.console = Console(stderr=True)
        self._live: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._line = ""
        self._best = ""

    def begin(self, study_name: str, total_s: float) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[line]}"),
            console=self.console,
        )
        self._task = self._bar.add_task(f"{study_name} budget", total=total_s, line="")
        self._live = Live(self._bar, console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, line=f"{self._line}  {self._best}".strip())

    def update(self, spent_s: float, line: str) -> None:
        self._line = line
        if self._bar is not None:
            self._bar.update(self._task, completed=spent_s)
        self._refresh()

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def trial_done(
        self, number: int, outcome: str, value: float | None, best: float | None
    ) -> None:
        if best is not None:
            self._best = f"best {best:.4f}"
        super().trial_done(number, outcome, value, best)
        self._refresh()

    def end(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def make_progress(stream: TextIO | None = None) -> Progress:
    """Live display on a terminal, plain lines otherwise."""
    s = stream or sys.stderr
    return RichProgress() if s.isatty() else LineProgress(s)
