"""Everything a report reads from a study's storage, in one place.

The driver writes a study into Optuna's RDB storage (trials, their params, user attrs and
intermediate values; the study file snapshot and final-run results in study user attrs) and
the budget ledger into its own tables of the same database. This module is the only part of
the report that knows those names: it opens the storage read-only in spirit (it never creates
a study), flattens trials into one table and turns the ledger into time spans. The figures
and the HTML page only see `ReportData`.

A study may still be running while we read it: trials in RUNNING state end "now", and
anything not yet written (importances, final run, holdout scores) is simply absent.
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
from budgetune.engine.errors import UserInputError
from optuna.trial import FrozenTrial, TrialState

DEFAULT_DB = "study.db"
"""The driver's default storage file inside a run directory."""

OUTCOMES: tuple[str, ...] = ("complete", "pruned", "oom", "diverged", "failed", "running")
"""Trial outcomes in the order the report lists and colours them."""

_STATE_OUTCOME = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}

PARAM_RANK = "lora_rank"
PARAM_MICRO_BATCH = "micro_batch"
PARAM_LR = "lr"
MIX_PREFIX = "mix."
TASK_PREFIX = "task."


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
    """One row per trial: number, state, outcome, value, times, params_*, user_attrs_*."""
    ledger: pd.DataFrame
    """Time spans: start_s, end_s (seconds since the study began), seconds, category,
    trial (number or None), worker, outcome."""
    budget_s: float | None
    """Total GPU-seconds the study may spend (None when the snapshot does not say)."""
    final: dict[str, Any] = field(default_factory=dict)
    """The final run's results from study user attrs (empty until it has run)."""
    study_attrs: dict[str, Any] = field(default_factory=dict)
    started_at: datetime | None = None
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ledger_source: str = "trials"
    """`ledger` when spans come from the budget ledger, `trials` when estimated from trial times."""
    ledger_info: LedgerSnapshot | None = None
    """The ledger's budget row and final-run claim, when the storage has a ledger."""

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
        final_state = self.ledger_info.final_state if self.ledger_info is not None else None
        if final_state == "done" or (self.final and final_state is None):
            return "finished"
        if final_state == "claimed":
            return "final run in progress (or stopped: resume it)"
        if any(t.state == TrialState.RUNNING for t in self.trials):
            return "running"
        return "searched (no final run yet)"

    def best_trial(self) -> FrozenTrial | None:
        """The best completed trial, or None before the first one completes."""
        done = self.completed
        if not done:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(done, key=lambda t: t.value)

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


def resolve_storage(source: str) -> str:
    """Turn a run directory, a database file or a storage URL into a storage URL.

    A path must already exist: opening a missing SQLite file would silently create an empty
    database, and the report would then say "no study" about a typo.
    """
    if "://" in source:
        return source
    path = Path(source)
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
    if study_name is None:
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise UserInputError(f"{storage_url}: pass --study (studies found: {found})")
        study_name = names[0]
    elif study_name not in names:
        found = ", ".join(names) if names else "none"
        raise UserInputError(f"--study {study_name!r}: not in {storage_url} (found: {found})")
    return optuna.load_study(study_name=study_name, storage=storage)


def outcome_of(trial: FrozenTrial) -> str:
    """What happened to a trial: the driver's `outcome` attr, else its Optuna state."""
    outcome = trial.user_attrs.get("outcome")
    if trial.state == TrialState.RUNNING:
        return "running"
    if isinstance(outcome, str) and outcome:
        return outcome
    return _STATE_OUTCOME.get(trial.state, trial.state.name.lower())


def _cell(value: Any) -> Any:
    """A value a CSV and a Parquet column can both hold: scalars as is, the rest as JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def trial_table(trials: list[FrozenTrial]) -> pd.DataFrame:
    """`Study.trials_dataframe`-style table with outcomes, seconds and per-task scores.

    Column names follow Optuna's (`params_<name>`, `user_attrs_<name>`) so people who know
    `trials_dataframe` find their way; nested attrs become JSON strings and a column whose
    values mix types becomes text, so the same columns survive CSV and Parquet.
    """
    params: dict[str, None] = {}
    attrs: dict[str, None] = {}
    for t in trials:
        params.update(dict.fromkeys(t.params))
        attrs.update(dict.fromkeys(t.user_attrs))
    rows = []
    for t in trials:
        curve = t.intermediate_values
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "outcome": outcome_of(t),
            "value": t.value,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_s": (t.duration.total_seconds() if t.duration is not None else None),
            "n_reports": len(curve),
            "last_step": max(curve) if curve else None,
            "last_intermediate": curve[max(curve)] if curve else None,
        }
        row.update({f"params_{p}": t.params.get(p) for p in params})
        row.update({f"user_attrs_{a}": _cell(t.user_attrs.get(a)) for a in attrs})
        rows.append(row)
    base = ["number", "state", "outcome", "value", "datetime_start", "datetime_complete",
            "duration_s", "n_reports", "last_step", "last_intermediate"]
    columns = base + [f"params_{p}" for p in params] + [f"user_attrs_{a}" for a in attrs]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("datetime_start", "datetime_complete"):
        table[col] = pd.to_datetime(table[col])
    for col in ("value", "duration_s", "last_intermediate"):
        table[col] = pd.to_numeric(table[col]).astype("float64")
    for col in ("n_reports",):
        table[col] = table[col].astype("int64")
    for col in table.columns[len(base):]:
        kinds = {type(v) for v in table[col] if v is not None and not _is_nan(v)}
        if kinds and not kinds <= {int, float, bool} and not kinds <= {str}:
            table[col] = table[col].map(lambda v: None if v is None else str(v))
    return table


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


SNAPSHOT_KEY = "budgetune.study_toml"
"""The study user attr holding the study file's TOML text (written by `search/storage.py`)."""


def study_budget_s(attrs: dict[str, Any]) -> float | None:
    """The study's total budget in GPU-seconds when the storage has no ledger budget row.

    From a `budget_s` attr, else the snapshot's `[budget] total_s`.
    """
    if _as_float(attrs.get("budget_s")) is not None:
        return _as_float(attrs["budget_s"])
    text = attrs.get(SNAPSHOT_KEY)
    if not isinstance(text, str):
        return None
    try:
        budget = tomllib.loads(text).get("budget")
    except tomllib.TOMLDecodeError:
        return None
    return _as_float(budget.get("total_s")) if isinstance(budget, dict) else None


def final_results(attrs: dict[str, Any]) -> dict[str, Any]:
    """The final run's results: a `final` dict attr, or the flat `final.*` / `final_*` attrs."""
    final = attrs.get("final")
    if isinstance(final, str):
        try:
            final = json.loads(final)
        except ValueError:
            final = None
    out: dict[str, Any] = dict(final) if isinstance(final, dict) else {}
    for key, value in attrs.items():
        for prefix in ("final.", "final_"):
            if key.startswith(prefix):
                out.setdefault(key[len(prefix):], value)
    return out


def _trial_spans(trials: list[FrozenTrial], t0: datetime, now: datetime) -> pd.DataFrame:
    """Ledger-shaped spans estimated from trial start/complete times (no ledger in storage)."""
    rows = []
    for t in trials:
        if t.datetime_start is None:
            continue
        end = t.datetime_complete or now
        cost = _as_float(t.user_attrs.get("cost_s"))
        seconds = cost if cost is not None else (end - t.datetime_start).total_seconds()
        rows.append({
            "start_s": (t.datetime_start - t0).total_seconds(),
            "end_s": (end - t0).total_seconds(),
            "seconds": seconds,
            "category": "trial",
            "trial": t.number,
            "worker": str(t.user_attrs.get("worker_id", "worker")),
            "outcome": outcome_of(t),
        })
    return pd.DataFrame(rows, columns=LEDGER_COLUMNS)


LEDGER_COLUMNS = ["start_s", "end_s", "seconds", "category", "trial", "worker", "outcome"]


@dataclass
class LedgerSnapshot:
    """What the budget ledger's tables say about one study, read without locking them."""

    entries: list[dict[str, Any]]
    """Spend rows, oldest first: start, end (naive local datetimes like Optuna's), seconds,
    category, trial, worker."""
    total_s: float | None = None
    final_reserve_s: float | None = None
    margin_s: float | None = None
    final_state: str | None = None
    """`claimed` or `done` once the final run is claimed, else None."""
    final_allotment_s: float | None = None


def read_ledger(storage_url: str, study_name: str) -> LedgerSnapshot | None:
    """The driver's ledger tables for this study, or None when the storage has none.

    Read with a plain engine, not the ledger's own: that one opens every transaction with
    `BEGIN IMMEDIATE`, and a report must never take the write lock from running workers. A
    spend row is written when its slice ends (`created_at`), so it started `seconds` earlier.
    """
    import sqlalchemy as sa
    from budgetune.search import ledger as ledger_tables

    engine = sa.create_engine(storage_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(ledger_tables.LEDGER.name):
                return None
            L, B, C = ledger_tables.LEDGER, ledger_tables.BUDGET, ledger_tables.CLAIMS
            rows = conn.execute(
                sa.select(L).where(L.c.study_name == study_name).order_by(L.c.id)).all()
            budget = conn.execute(sa.select(B).where(B.c.study_name == study_name)).first()
            claim = None
            if sa.inspect(conn).has_table(C.name):
                claim = conn.execute(sa.select(C).where(
                    C.c.study_name == study_name, C.c.what == "final")).first()
    finally:
        engine.dispose()
    entries = [{
        "start": datetime.fromtimestamp(r.created_at - r.seconds),
        "end": datetime.fromtimestamp(r.created_at),
        "seconds": float(r.seconds),
        "category": r.category,
        "trial": r.trial_number,
        "worker": r.worker_id,
    } for r in rows]
    return LedgerSnapshot(
        entries=entries,
        total_s=None if budget is None else float(budget.total_s),
        final_reserve_s=None if budget is None else float(budget.final_reserve_s),
        margin_s=None if budget is None else float(budget.margin_s),
        final_state=None if claim is None else claim.state,
        final_allotment_s=None if claim is None else float(claim.allotment_s),
    )


def ledger_frame(
    entries: list[dict[str, Any]] | None, trials: list[FrozenTrial], t0: datetime, now: datetime
) -> tuple[pd.DataFrame, str]:
    """Spans relative to the study start, from the ledger if there is one, else from trials."""
    if not entries:
        return _trial_spans(trials, t0, now), "trials"
    outcome = {t.number: outcome_of(t) for t in trials}
    rows = [{
        "start_s": (e["start"] - t0).total_seconds(),
        "end_s": (e["end"] - t0).total_seconds(),
        "seconds": e["seconds"],
        "category": e["category"],
        "trial": e["trial"],
        "worker": e["worker"],
        "outcome": outcome.get(e["trial"], "") if e["trial"] is not None else "",
    } for e in entries]
    return pd.DataFrame(rows, columns=LEDGER_COLUMNS), "ledger"


def collect(source: str, study_name: str | None = None) -> ReportData:
    """Read one study (finished or running) into a `ReportData`."""
    storage_url = resolve_storage(source)
    study = open_study(storage_url, study_name)
    trials = study.get_trials(deepcopy=False)
    attrs = dict(study.user_attrs)
    now = datetime.now()
    ledger = read_ledger(storage_url, study.study_name)
    entries = ledger.entries if ledger is not None else []
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    starts += [e["start"] for e in entries]
    t0 = min(starts) if starts else None
    spans, spans_source = ledger_frame(entries, trials, t0 or now, now)
    budget_s = ledger.total_s if ledger is not None and ledger.total_s else None
    return ReportData(
        study=study,
        source=source,
        storage_url=storage_url,
        trials=trials,
        table=trial_table(trials),
        ledger=spans,
        budget_s=budget_s if budget_s is not None else study_budget_s(attrs),
        final=final_results(attrs),
        study_attrs=attrs,
        started_at=t0,
        ledger_source=spans_source,
        ledger_info=ledger,
    )
