"""Where a study stands: budget spent and left, trials by outcome, best so far, the final run.

`collect()` reads everything from the study's storage (Optuna trials, the ledger, `final.*`
study attributes), so it works on a running study, a stopped one and a finished one;
`format_status()` turns it into the text `budgetune status` prints and `launch` ends with.
Both say what the overfitting guard (`search/evaluation.py`) finds in the stored search and
holdout scores: a user who only ever reads the summary must still learn the search is
fitting its own tasks.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from budgetune.search.evaluation import GuardRow, overfitting_warnings
from budgetune.search.ledger import Ledger, Totals
from budgetune.search.progress import describe
from budgetune.search.study import Study
from budgetune.search.workers import WorkerInfo, describe_worker, list_workers

MAX_DEAD_SHOWN = 4
"""`status` lists every live worker and only the most recent dead ones."""
RUNNING_WINDOW_S = 120.0
"""A study whose last ledger row is younger than this (or has a RUNNING trial) is running."""


@dataclass
class StatusReport:
    study_name: str
    totals: Totals
    outcomes: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    n_trials: int = 0
    """Search trials that count (not frontier skips, not superseded by a continuation)."""
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    running: bool = False
    last_activity: float | None = None
    workers: list[WorkerInfo] = field(default_factory=list)
    """Every worker that joined the study (`workers.py`), oldest first."""
    guard_warnings: list[str] = field(default_factory=list)
    """The overfitting guard's warnings over the stored search and holdout scores."""

    @property
    def finished(self) -> bool:
        return self.totals.final is not None and self.totals.final.state == "done"

    def eta(self, now: float | None = None) -> float | None:
        """Unix time the study should finish, if a worker is running it now."""
        if self.finished or not self.running:
            return None
        return (now or time.time()) + max(0.0, self.totals.remaining_s)


def guard_rows(
    trials: Iterable[optuna.trial.FrozenTrial], final: Mapping[str, Any]
) -> list[GuardRow]:
    """The guard's rows from storage: completed trials that ran holdout tasks, in the order
    they ran (trial number), then the final model (`final`: `final.*` attrs, unprefixed)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            row = GuardRow.from_attrs(f"trial {t.number}", t.user_attrs, objective=t.value)
            if row is not None:
                rows.append(row)
    row = GuardRow.from_attrs("final", final, final=True)
    return [*rows, row] if row is not None else rows


def gap_tolerance(study: Study) -> float:
    """The study's `eval.gap_tolerance` (the guard's default without an `[eval]` section)."""
    tolerance = getattr(study.eval, "gap_tolerance", None)
    return 0.05 if tolerance is None else float(tolerance)


def collect(study: Study, ostudy: optuna.Study, ledger: Ledger) -> StatusReport:
    totals = ledger.totals()
    trials = ostudy.get_trials(deepcopy=False)
    outcomes: Counter[str] = Counter()
    states: Counter[str] = Counter()
    for t in trials:
        states[t.state.name.lower()] += 1
        if t.state.is_finished():
            outcomes[t.user_attrs.get("outcome", t.state.name.lower())] += 1
    r = StatusReport(study.name, totals, dict(outcomes), dict(states))
    r.n_trials = sum(n for o, n in outcomes.items() if o not in ("skipped", "continued"))
    try:
        best = ostudy.best_trial
        r.best_number, r.best_value = best.number, best.value
        r.best_params = dict(best.params)
        weights = {k[7:]: v for k, v in best.user_attrs.items() if k.startswith("weight.")}
        if weights:
            r.best_params = {k: v for k, v in r.best_params.items() if not k.startswith("mix.")}
            r.best_params["weights"] = weights
        if "lora_alpha" in best.user_attrs:
            r.best_params["lora_alpha"] = best.user_attrs["lora_alpha"]
    except ValueError:
        pass
    r.final = {k[6:]: v for k, v in ostudy.user_attrs.items() if k.startswith("final.")}
    rows = guard_rows(trials, r.final)
    if rows:
        r.guard_warnings = overfitting_warnings(rows, gap_tolerance=gap_tolerance(study))
    entries = ledger.entries()
    r.last_activity = entries[-1].created_at if entries else None
    recent = r.last_activity is not None and time.time() - r.last_activity < RUNNING_WINDOW_S
    r.workers = list_workers(study.storage, study.name)
    live = any(w.alive for w in r.workers)
    r.running = not r.finished and (recent or live or states.get("running", 0) > 0)
    return r


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_status(r: StatusReport, *, summary: bool = False) -> str:
    t = r.totals
    lines = [f"study {r.study_name}" + (" (finished)" if r.finished else "")]
    pct = 100 * t.spent_s / t.total_s if t.total_s else 0.0
    lines.append(
        f"  budget   {t.spent_s:.1f} s spent of {t.total_s:.0f} s ({pct:.0f}%), "
        f"{max(0.0, t.remaining_s):.1f} s left"
    )
    cats = ", ".join(f"{c} {s:.1f} s" for c, s in sorted(t.by_category.items()))
    if cats:
        lines.append(f"  spent on {cats}")
    if not r.finished and t.final is None:
        lines.append(
            f"  search   {t.search_left_s:.1f} s left for trials; "
            f"final reserve {t.final_reserve_s:.0f} s"
        )
    outs = ", ".join(f"{n} {o}" for o, n in sorted(r.outcomes.items()))
    lines.append(f"  trials   {r.n_trials}" + (f" ({outs})" if outs else ""))
    if r.states.get("running"):
        lines.append(f"  running  {r.states['running']} trial(s)")
    if r.best_number is not None:
        lines.append(
            f"  best     trial {r.best_number}: {r.best_value:.4f}  {describe(r.best_params)}"
        )
    else:
        lines.append("  best     none yet")
    f = r.final
    if f:
        status = f.get("status", "running" if t.final and t.final.state == "claimed" else "?")
        lines.append(
            f"  final    {status}"
            + (f", val_loss {f['val_loss']:.4f}" if f.get("val_loss") is not None else "")
            + _scored(f, "search")
            + _scored(f, "holdout")
        )
        if f.get("export_dir"):
            lines.append(f"  export   {f['export_dir']}")
        if f.get("reason"):
            lines.append(f"  reason   {f['reason']}")
        if f.get("eval_error"):
            lines.append(f"  eval     failed: {f['eval_error']}")
    elif t.final is not None:
        lines.append("  final    claimed, not finished (resume continues it)")
    for warning in r.guard_warnings:
        lines.append(f"  warning  overfitting guard: {warning}")
    if r.workers and not summary:
        alive = [w for w in r.workers if w.alive]
        dead = [w for w in r.workers if not w.alive]
        lines.append(f"  workers  {len(alive)} alive, {len(dead)} dead")
        shown = alive + dead[-MAX_DEAD_SHOWN:]
        lines.extend(f"    {describe_worker(w)}" for w in sorted(shown, key=lambda w: w.started_at))
        if len(dead) > MAX_DEAD_SHOWN:
            lines.append(f"    (+{len(dead) - MAX_DEAD_SHOWN} older dead workers)")
    if not summary:
        if r.finished:
            pass
        elif r.running:
            eta = r.eta()
            lines.append(
                f"  eta      {_when(eta)} (if it keeps running)" if eta else "  eta      unknown"
            )
        else:
            last = f", last activity {_when(r.last_activity)}" if r.last_activity else ""
            lines.append(f"  stopped  resume with `budgetune resume` to finish{last}")
    return "\n".join(lines)


def _scored(final: Mapping[str, Any], kind: str) -> str:
    """`, search score 0.412 ± 0.051` when the final model has that score, else ``."""
    value, stderr = final.get(f"{kind}_score"), final.get(f"{kind}_stderr")
    if not isinstance(value, int | float):
        return ""
    noise = f" ± {stderr:.3f}" if isinstance(stderr, int | float) else ""
    return f", {kind} score {value:.3f}{noise}"


def show_status(target: str, name: str | None = None) -> str:
    """`budgetune status <run dir | URL> [--study NAME]`."""
    from budgetune.search.storage import load_from_storage

    study, ostudy = load_from_storage(target, name)
    ledger = Ledger(study.storage, study.name, "status")
    try:
        return format_status(collect(study, ostudy, ledger))
    finally:
        ledger.close()
