"""Everything a report reads from a study's storage, in one place.

The driver writes a study into Optuna's RDB storage (trials with their params, user attrs
and intermediate values; the study file snapshot and the final run's `final.*` results in
study user attrs) and the budget ledger into its own tables of the same database. This module
is the only part of the report that knows those names: it opens the storage without ever
creating a study, flattens trials into one table and lays the ledger out as time spans. The
figures and the HTML page only see `ReportData`.

A study may still be running while we read it: trials in RUNNING state end "now", and
anything not yet written (final run, holdout scores) is simply absent.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from budgetune.engine.errors import UserInputError
from budgetune.search.evaluation import GuardRow, guard_table
from budgetune.search.status import guard_rows

DEFAULT_DB = "study.db"
"""The driver's default storage file inside a run directory."""

SNAPSHOT_KEY = "budgetune.study_toml"
"""The study user attr holding the study file's TOML text (written by `search/storage.py`)."""

OUTCOMES: tuple[str, ...] = (
    "complete", "pruned", "oom", "diverged", "failed", "skipped", "continued", "running",
    "waiting",
)  # fmt: skip
"""Trial outcomes in the order the report lists them. `skipped`: not run, beyond the OOM
frontier; `continued`: left by a stopped worker and carried on by a later trial."""

_STATE_OUTCOME = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}

PARAM_RANK = "lora_rank"
PARAM_MICRO_BATCH = "micro_batch"
MIX_PREFIX = "mix."
TASK_PREFIX = "task."
_SETTING_ALIASES = {PARAM_RANK: ("rank",)}
"""User-attr names a trial may record a setting under (an OOM trial records `rank`)."""


@dataclass
class LedgerSnapshot:
    """What the budget ledger's tables say about one study, read without locking them."""

    entries: list[dict[str, Any]]
    """Spend rows in the order they were written: end (Unix time), seconds, category, trial,
    worker."""
    total_s: float | None = None
    final_reserve_s: float | None = None
    margin_s: float | None = None
    final_state: str | None = None
    """`claimed` or `done` once the final run is claimed, else None."""


@dataclass
class ReportData:
    """A snapshot of one study, flattened for figures and tables."""

    study: optuna.Study
    """The loaded study, for optuna's own plots and importance evaluators."""
    source: str
    """What the user pointed at (run dir or storage URL), shown on the page."""
    storage_url: str
    trials: list[FrozenTrial]
    table: pd.DataFrame
    """One row per trial: number, state, outcome, value, times, params_*, user_attrs_*,
    task.<task>.<metric>."""
    spans: pd.DataFrame
    """Where GPU time went: start_s, end_s, seconds, category, trial, worker, outcome."""
    budget_s: float | None
    """Total GPU-seconds the study may spend (None when neither ledger nor snapshot says)."""
    final: dict[str, Any] = field(default_factory=dict)
    """The final run's results (`final.*` study attrs without the prefix; empty before it)."""
    snapshot: dict[str, Any] = field(default_factory=dict)
    """The study file as parsed TOML (empty when the storage holds no snapshot)."""
    ledger: LedgerSnapshot | None = None
    """The ledger's rows, budget row and final-run claim (None: the storage has no ledger)."""
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def direction(self) -> str:
        maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        return "maximize" if maximize else "minimize"

    @property
    def completed(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None]

    @property
    def phase(self) -> str:
        """Where the study is: searching, final run claimed, or finished."""
        final_state = self.ledger.final_state if self.ledger is not None else None
        if final_state == "done" or (self.final and final_state is None):
            return "finished"
        if final_state == "claimed":
            return "final run in progress (or stopped: resume it)"
        if any(t.state == TrialState.RUNNING for t in self.trials):
            return "running (or stopped mid-trial: `budgetune resume` continues it)"
        return "searched (no final run yet)"

    def best_trial(self) -> FrozenTrial | None:
        """The best completed trial, or None before the first one completes."""
        top = self.top_trials(1)
        return top[0] if top else None

    def top_trials(self, n: int) -> list[FrozenTrial]:
        """The n best completed trials, best first."""
        best_first = self.direction == "maximize"
        return sorted(self.completed, key=lambda t: t.value, reverse=best_first)[:n]

    def param_names(self) -> list[str]:
        """Every parameter any trial sampled, in first-seen order."""
        names: dict[str, None] = {}
        for t in self.trials:
            names.update(dict.fromkeys(t.params))
        return list(names)

    def mix_sources(self) -> list[str]:
        return [p[len(MIX_PREFIX):] for p in self.param_names() if p.startswith(MIX_PREFIX)]

    def setting(self, trial: FrozenTrial, name: str) -> float | None:
        """A numeric setting of a trial: sampled (a param), recorded (a user attr), or fixed
        by the study file (`[search]` plain value, then `[train]`)."""
        for value in (trial.params.get(name), trial.user_attrs.get(name),
                      *(trial.user_attrs.get(a) for a in _SETTING_ALIASES.get(name, ()))):
            if as_float(value) is not None:
                return as_float(value)
        for section in ("search", "train"):
            table = self.snapshot.get(section)
            if isinstance(table, dict) and as_float(table.get(name)) is not None:
                return as_float(table[name])
        return None

    def guard_rows(self) -> list[GuardRow]:
        """Search vs holdout score of every trial that ran holdout tasks, then the final
        model, with their standard errors (what the overfitting guard judges)."""
        return guard_rows(self.trials, self.final)

    def guard_comparison(self) -> list[dict[str, Any]]:
        """The search-vs-holdout table (`evaluation.guard_table`): scores, standard errors,
        gap and holdout rank of each model in `guard_rows`."""
        return guard_table(self.guard_rows())

    def gap_tolerance(self) -> float:
        """The study file's `eval.gap_tolerance` (the guard's default when it sets none)."""
        ev = self.snapshot.get("eval")
        value = as_float(ev.get("gap_tolerance")) if isinstance(ev, dict) else None
        return 0.05 if value is None else value

    def objective_name(self) -> str:
        """What the study minimizes: the validation loss unless `[eval]` has search tasks."""
        ev = self.snapshot.get("eval")
        return "objective" if isinstance(ev, dict) and ev.get("search") else "val_loss"


# --- opening the storage -----------------------------------------------------------------


def resolve_storage(source: str) -> str:
    """Turn a run directory, a database file or a storage URL into a storage URL.

    A path must already exist: opening a missing SQLite file would silently create an empty
    database, and the report would then say "no study" about a typo.
    """
    if "://" in source:
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        db = path / DEFAULT_DB
        if not db.is_file():
            raise UserInputError(f"{source}: no {DEFAULT_DB} in this run directory")
        return f"sqlite:///{db.resolve()}"
    if path.is_file():
        return f"sqlite:///{path.resolve()}"
    raise UserInputError(f"{source}: no such run directory or storage file")


def open_study(storage_url: str, study_name: str | None) -> optuna.Study:
    """Load the named study, or the only one in the storage."""
    try:
        storage = optuna.storages.RDBStorage(storage_url, skip_table_creation=True)
        names = optuna.study.get_all_study_names(storage)
    except Exception as e:  # any driver or URL problem here is in what the user gave us
        raise UserInputError(f"{storage_url}: cannot open storage ({type(e).__name__}: {e})") from e
    found = ", ".join(names) if names else "none"
    if study_name is None:
        if len(names) != 1:
            raise UserInputError(f"{storage_url}: pass --study (studies found: {found})")
        study_name = names[0]
    elif study_name not in names:
        raise UserInputError(f"--study {study_name!r}: not in {storage_url} (found: {found})")
    return optuna.load_study(study_name=study_name, storage=storage)


# --- trials --------------------------------------------------------------------------------


def as_float(value: Any) -> float | None:
    """A finite-or-infinite number, or None for anything else (None, text, NaN, bools)."""
    if isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def outcome_of(trial: FrozenTrial) -> str:
    """What happened to a trial: the driver's `outcome` attr, else its Optuna state."""
    if trial.state == TrialState.RUNNING:
        return "running"
    outcome = trial.user_attrs.get("outcome")
    if isinstance(outcome, str) and outcome:
        return outcome
    return _STATE_OUTCOME.get(trial.state, trial.state.name.lower())


def task_scores(results: Any) -> dict[str, float]:
    """Per-task scores as `<task>.<metric>` from the shapes evaluations are stored in.

    Accepts lm-eval-style result lists (`[{task, metric, value, ...}]`, what
    `TaskResult.to_dict` gives), `{task: value}` and `{task: {metric: value}}`.
    """
    out: dict[str, float] = {}
    if isinstance(results, list):
        for r in results:
            if isinstance(r, dict) and "task" in r and as_float(r.get("value")) is not None:
                metric = str(r.get("metric") or "score").split(",")[0]
                out[f"{r['task']}.{metric}"] = float(r["value"])
    elif isinstance(results, dict):
        for task, value in results.items():
            if as_float(value) is not None:
                out[f"{task}.score"] = float(value)
            elif isinstance(value, dict):
                if as_float(value.get("value")) is not None:  # one TaskResult dict
                    metric = str(value.get("metric") or "score").split(",")[0]
                    out[f"{task}.{metric}"] = float(value["value"])
                    continue
                for metric, v in value.items():
                    if as_float(v) is not None:
                        out[f"{task}.{str(metric).split(',')[0]}"] = float(v)
    return out


def trial_task_scores(trial: FrozenTrial) -> dict[str, float]:
    """A trial's per-task scores: flat `task.<name>.<metric>` attrs, its `eval_tasks` and
    `holdout_tasks` (search and holdout tasks never share a name)."""
    out = task_scores(trial.user_attrs.get("eval_tasks"))
    out.update(task_scores(trial.user_attrs.get("holdout_tasks")))
    for key, value in trial.user_attrs.items():
        if key.startswith(TASK_PREFIX) and as_float(value) is not None:
            out[key[len(TASK_PREFIX):]] = float(value)
    return out


def _cell(value: Any) -> Any:
    """A value a CSV and a Parquet column can both hold: scalars as is, the rest as JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


_BASE_COLUMNS = ["number", "state", "outcome", "value", "datetime_start", "datetime_complete",
                 "duration_s", "n_reports", "last_step", "last_intermediate"]  # fmt: skip


def trial_table(trials: list[FrozenTrial]) -> pd.DataFrame:
    """`Study.trials_dataframe`-style table with outcomes, seconds and per-task scores.

    Column names follow Optuna's (`params_<name>`, `user_attrs_<name>`) so people who know
    `trials_dataframe` find their way, then one `task.<task>.<metric>` column per score.
    Nested attrs become JSON text and a column whose values mix numbers and text becomes
    text, so the same columns survive CSV and Parquet.
    """
    params: dict[str, None] = {}
    attrs: dict[str, None] = {}
    tasks: dict[str, None] = {}
    scores = {t.number: trial_task_scores(t) for t in trials}
    for t in trials:
        params.update(dict.fromkeys(t.params))
        attrs.update(dict.fromkeys(t.user_attrs))
        tasks.update(dict.fromkeys(scores[t.number]))
    rows = []
    for t in trials:
        curve = t.intermediate_values
        last = max(curve) if curve else None
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "outcome": outcome_of(t),
            "value": t.value,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            "n_reports": len(curve),
            "last_step": last,
            "last_intermediate": curve[last] if last is not None else None,
        }
        row.update({f"params_{p}": t.params.get(p) for p in params})
        row.update({f"user_attrs_{a}": _cell(t.user_attrs.get(a)) for a in attrs})
        row.update({f"{TASK_PREFIX}{k}": scores[t.number].get(k) for k in tasks})
        rows.append(row)
    columns = (_BASE_COLUMNS + [f"params_{p}" for p in params]
               + [f"user_attrs_{a}" for a in attrs] + [f"{TASK_PREFIX}{k}" for k in tasks])
    table = pd.DataFrame(rows, columns=columns)
    for col in ("datetime_start", "datetime_complete"):
        table[col] = pd.to_datetime(table[col])
    for col in ("value", "duration_s", "last_step", "last_intermediate"):
        table[col] = pd.to_numeric(table[col]).astype("float64")
    for col in table.columns[len(_BASE_COLUMNS):]:
        kinds = {type(v) for v in table[col] if v is not None and not pd.isna(v)}
        if kinds and kinds <= {int, float}:
            table[col] = pd.to_numeric(table[col]).astype("float64")
        elif kinds and not (kinds <= {str} or kinds <= {bool}):
            table[col] = table[col].map(lambda v: None if v is None or pd.isna(v) else str(v))
    return table


# --- study attributes ---------------------------------------------------------------------


def parse_snapshot(attrs: dict[str, Any]) -> dict[str, Any]:
    """The study file snapshotted at launch, parsed (empty if absent or unreadable)."""
    text = attrs.get(SNAPSHOT_KEY)
    if not isinstance(text, str):
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}


def snapshot_budget_s(attrs: dict[str, Any], snapshot: dict[str, Any]) -> float | None:
    """The total budget when the storage has no ledger row: `budget_s`, else `[budget]`."""
    if as_float(attrs.get("budget_s")) is not None:
        return as_float(attrs["budget_s"])
    budget = snapshot.get("budget")
    return as_float(budget.get("total_s")) if isinstance(budget, dict) else None


def final_results(attrs: dict[str, Any]) -> dict[str, Any]:
    """The final run's results: the `final.*` study attrs without their prefix."""
    return {k[len("final."):]: v for k, v in attrs.items() if k.startswith("final.")}


# --- where the time went ------------------------------------------------------------------

SPAN_COLUMNS = ["start_s", "end_s", "seconds", "category", "trial", "worker", "outcome"]


def read_ledger(storage_url: str, study_name: str) -> LedgerSnapshot | None:
    """The driver's ledger tables for this study, or None when the storage has none.

    Read with a plain engine, not the ledger's own: that one opens every transaction with
    `BEGIN IMMEDIATE`, and a report must never take the write lock from running workers.
    """
    import sqlalchemy as sa

    from budgetune.search import ledger as tables

    engine = sa.create_engine(storage_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(tables.LEDGER.name):
                return None
            led, bud, claims = tables.LEDGER, tables.BUDGET, tables.CLAIMS
            rows = conn.execute(
                sa.select(led).where(led.c.study_name == study_name).order_by(led.c.id)
            ).all()
            budget = conn.execute(sa.select(bud).where(bud.c.study_name == study_name)).first()
            claim = None
            if sa.inspect(conn).has_table(claims.name):
                claim = conn.execute(sa.select(claims).where(
                    claims.c.study_name == study_name, claims.c.what == "final")).first()
    finally:
        engine.dispose()
    return LedgerSnapshot(
        entries=[{"end": float(r.created_at), "seconds": float(r.seconds),
                  "category": r.category, "trial": r.trial_number, "worker": r.worker_id}
                 for r in rows],  # fmt: skip
        total_s=None if budget is None else float(budget.total_s),
        final_reserve_s=None if budget is None else float(budget.final_reserve_s),
        margin_s=None if budget is None else float(budget.margin_s),
        final_state=None if claim is None else claim.state,
    )


def ledger_spans(entries: list[dict[str, Any]], trials: list[FrozenTrial]) -> pd.DataFrame:
    """Ledger rows laid out on each worker's GPU time.

    A worker's meter partitions its own clock into consecutive slices, so its rows, in the
    order written, tile its GPU time end to end; that layout needs no wall clock (the fake
    backend's clock is virtual) and drops the time no worker ran (a crash, a weekend). A
    worker's lane starts where its first slice began in wall time, so several workers (or a
    resumed study's new worker) line up.
    """
    if not entries:
        return pd.DataFrame(columns=SPAN_COLUMNS)
    first_start: dict[str, float] = {}
    for e in entries:
        first_start.setdefault(e["worker"], e["end"] - e["seconds"])
    t0 = min(first_start.values())
    outcome = {t.number: outcome_of(t) for t in trials}
    clock = {w: max(0.0, s - t0) for w, s in first_start.items()}
    rows = []
    for e in entries:
        start = clock[e["worker"]]
        clock[e["worker"]] = start + e["seconds"]
        rows.append({
            "start_s": start, "end_s": start + e["seconds"], "seconds": e["seconds"],
            "category": e["category"], "trial": e["trial"], "worker": e["worker"],
            "outcome": outcome.get(e["trial"], "") if e["trial"] is not None else "",
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SPAN_COLUMNS)


def trial_spans(trials: list[FrozenTrial], now: datetime) -> pd.DataFrame:
    """Spans from trial start/complete times, for a storage with no ledger (wall time)."""
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not starts:
        return pd.DataFrame(columns=SPAN_COLUMNS)
    t0 = min(starts)
    rows = []
    for t in trials:
        if t.datetime_start is None:
            continue
        end = t.datetime_complete or now
        cost = as_float(t.user_attrs.get("cost_s"))
        rows.append({
            "start_s": (t.datetime_start - t0).total_seconds(),
            "end_s": (end - t0).total_seconds(),
            "seconds": cost if cost is not None else (end - t.datetime_start).total_seconds(),
            "category": "trial", "trial": t.number,
            "worker": str(t.user_attrs.get("worker_id", "worker")), "outcome": outcome_of(t),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SPAN_COLUMNS)


def collect(source: str, study_name: str | None = None) -> ReportData:
    """Read one study (finished or running) into a `ReportData`."""
    storage_url = resolve_storage(source)
    study = open_study(storage_url, study_name)
    trials = study.get_trials(deepcopy=False)
    attrs = dict(study.user_attrs)
    snapshot = parse_snapshot(attrs)
    ledger = read_ledger(storage_url, study.study_name)
    if ledger is not None and ledger.entries:
        spans = ledger_spans(ledger.entries, trials)
    else:
        spans = trial_spans(trials, datetime.now())
    budget_s = ledger.total_s if ledger is not None else None
    return ReportData(
        study=study,
        source=source,
        storage_url=storage_url,
        trials=trials,
        table=trial_table(trials),
        spans=spans,
        budget_s=budget_s if budget_s is not None else snapshot_budget_s(attrs, snapshot),
        final=final_results(attrs),
        snapshot=snapshot,
        ledger=ledger,
    )
