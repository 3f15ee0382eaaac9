"""What watches a running trial or final run on the driver's behalf.

A backend gets a Reporter (see `backends.py`): `TrialReporter` books the trial's time to
the ledger by phase, feeds validation losses to the pruner and stops the run when the trial
is pruned, its reservation is used up or Ctrl-C was pressed; `FinalReporter` does the same
for the final run against the budget's hard limit. `Heartbeat` keeps Optuna's heartbeat of
a running trial fresh, so a later multi-worker driver can tell a dead worker from a slow one.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

import optuna

from budgetune.engine.events import EvalEvent
from budgetune.search.ledger import Reservation

if TYPE_CHECKING:
    from budgetune.search.driver import Driver


class Heartbeat:
    """Records Optuna heartbeats for a running trial, so a later multi-worker resume can tell
    a dead worker's trial (stale heartbeat) from a live one."""

    def __init__(self, storage: Any, trial_id: int, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(storage, trial_id, interval_s), daemon=True
        )

    def _beat(self, storage: Any, trial_id: int, interval_s: float) -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # the next beat retries; a dead storage shows up elsewhere
                pass
            if self._stop.wait(interval_s):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class TrialReporter:
    """The Reporter a backend gets for one trial: ledger charges, pruning, stop checks."""

    def __init__(self, driver: Driver, trial: optuna.Trial, reservation: Reservation) -> None:
        self.d = driver
        self.trial = trial
        self.reservation = reservation
        self.current: str | None = None
        self.costs = {"setup": 0.0, "train": 0.0, "eval": 0.0}
        self.pruned = self.interrupted = self.out_of_time = False
        self.last: EvalEvent | None = None

    @property
    def charged(self) -> float:
        return sum(self.costs.values())

    def phase(self, name: str | None) -> None:
        if self.current is not None:
            s = self.d.meter.charge(self.current, self.trial.number, self.reservation)
            self.costs[self.current] += s
        self.current = name

    def report(self, event: EvalEvent) -> bool:
        self.phase(self.current or "train")
        self.last = event
        val = event.metrics.get("val_loss")
        if val is not None and math.isfinite(val):
            self.trial.report(float(val), event.step)
        self.d.progress.update(
            self.d.ledger_spent() + self.d.meter.pending(),
            f"trial {self.trial.number}: step {event.step}, val_loss {val:.4f}",
        )
        if self.trial.should_prune():
            self.pruned = True
            return True
        return False

    def should_stop(self) -> bool:
        if self.d.stop_requested:
            self.interrupted = True
            return True
        if self.charged + self.d.meter.pending() >= self.reservation.seconds:
            self.out_of_time = True
            return True
        return False


class FinalReporter:
    """The final run's Reporter: everything is `final`; stops at the budget's hard limit."""

    def __init__(self, driver: Driver, limit_s: float, spent_s: float) -> None:
        self.d = driver
        self.limit_s = limit_s
        self.spent_s = spent_s
        self.curve: list[EvalEvent] = []
        self.interrupted = self.out_of_time = False

    def phase(self, name: str | None) -> None:
        self.spent_s += self.d.meter.charge("final")

    def report(self, event: EvalEvent) -> bool:
        self.phase("final")
        self.curve.append(event)
        val = event.metrics.get("val_loss", float("nan"))
        self.d.progress.update(self.spent_s, f"final run: step {event.step}, val_loss {val:.4f}")
        return False

    def should_stop(self) -> bool:
        if self.d.stop_requested:
            self.interrupted = True
            return True
        if self.spent_s + self.d.meter.pending() >= self.limit_s:
            self.out_of_time = True
            return True
        return False
