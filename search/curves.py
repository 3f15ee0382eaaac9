"""Recorded learning curves: the file format, its validation, and the mapping rule.

The replay backend (`replay.py`) answers trials from curves the real engine recorded once
(`python -m budgetune.search.record_curves`); this module reads such a file, checks it and
says which recorded run a proposed configuration replays.

Format (CSV or Parquet; one row per recorded run and checkpoint)
----------------------------------------------------------------
- `run_id` (required): names one recorded run; all its rows share its parameters, seed,
  status and horizon.
- parameter columns (at least one), by Optuna name (`space.py`): `lora_rank`, `lora_alpha`,
  `lora_dropout`, `lr`, `micro_batch`, `global_batch`, `warmup_steps`, `weight_decay`
  (numbers), `lora_targets` (text), and `mix.<source>`: the run's normalized mixture
  (fractions summing to 1 on every row).
- `mix_default` (optional, 0/1): 1 when the run used the engine's default mixture
  (`weights = None`, proportional to source size); a configuration without weights is
  matched with that mixture.
- `seed` (optional, default 0); `horizon_steps` (optional: the optimizer steps the run's
  LR schedule was fitted to; default its last step); `status` (optional: `completed`;
  `diverged`: the last row is where it diverged; `oom`: one row at step 0 whose `elapsed_s`
  is the time lost before running out of memory).
- `step` (optimizer steps, strictly increasing within a run; a step-0 row may give the base
  model's loss), `tokens_seen` and `elapsed_s` (GPU-seconds the run had spent, setup and
  evals included; both never decrease within a run).
- `val_loss` (required; finite, except on a diverged run's last row); optional
  `train_loss`, `score` (an eval objective measured at that checkpoint, minimized) and
  `peak_memory_bytes`.

Mapping rule (a proposed configuration -> a recorded run)
---------------------------------------------------------
Nearest neighbour over the parameter columns the file has (parameters it lacks are
ignored): the distance is the sum over columns of |t(a) - t(b)| / (span of t over the
recorded values), with t = log for `lora_rank`, `lora_alpha`, `lr`, `micro_batch`,
`global_batch` and the identity otherwise; text columns add 0 or 1; the mixture adds its
total-variation distance (half the L1 distance of the fractions). On a full grid this snaps
each parameter to its nearest recorded value (in log space where it says log)
independently, and an exact match costs 0. Ties go to the configuration first in the file.
A run then uses one recorded seed of that configuration (the replay backend draws it) and,
of that seed's runs, the shortest recorded horizon that covers the requested one (else the
longest), so a short trial follows a schedule that decays within it when one is recorded.
Between checkpoints, time, tokens and metrics are linear in the step (step 0 at 0 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budgetune.engine.config import RunConfig
from budgetune.engine.errors import UserInputError
from budgetune.search.space import MIX_PREFIX, RULES

LOG_PARAMS = ("lora_rank", "lora_alpha", "lr", "micro_batch", "global_batch")
TEXT_PARAMS = ("lora_targets",)
REQUIRED = ("run_id", "step", "tokens_seen", "elapsed_s", "val_loss")
STATUSES = ("completed", "diverged", "oom")
RUN_COLUMNS = ("seed", "horizon_steps", "mix_default", "status")
"""Columns that describe a whole run (like the parameters): equal on all its rows."""
METRIC_COLUMNS = ("train_loss", "score", "peak_memory_bytes")


@dataclass
class RecordedRun:
    """One recorded run: its checkpoints, with per-step lookups of time, tokens and metrics."""

    run_id: str
    config: int
    """Index of its configuration in `Recording.configs`."""
    seed: int
    status: str
    horizon_steps: int
    steps: np.ndarray
    tokens: np.ndarray
    elapsed: np.ndarray
    val_loss: np.ndarray
    train_loss: np.ndarray | None = None
    score: np.ndarray | None = None
    peak_memory_bytes: float = 0.0

    def __post_init__(self) -> None:
        # Per-step tables, built once: a replayed run reads them at every optimizer step.
        grid = np.arange(self.last_step + 1)
        anchored = self.steps[0] == 0
        xs = self.steps if anchored else np.concatenate([[0], self.steps])

        def pad(v: np.ndarray) -> np.ndarray:
            return v if anchored else np.concatenate([[0.0], v])

        self._elapsed = np.interp(grid, xs, pad(self.elapsed.astype(float)))
        self._tokens = np.rint(np.interp(grid, xs, pad(self.tokens.astype(float)))).astype(int)
        self._values: dict[str, np.ndarray] = {}

    @property
    def last_step(self) -> int:
        return int(self.steps[-1])

    def elapsed_at(self, step: int) -> float:
        """Seconds spent when `step` optimizer steps are done."""
        return float(self._elapsed[min(step, self.last_step)])

    def tokens_at(self, step: int) -> int:
        return int(self._tokens[min(step, self.last_step)])

    def value_at(self, step: int, column: str = "val_loss") -> float:
        """The metric at `step`: linear between checkpoints, flat before and after them."""
        if column not in self._values:
            y = {"val_loss": self.val_loss, "train_loss": self.train_loss, "score": self.score}
            ys = y[column]
            if ys is None:
                raise KeyError(column)
            ok = np.isfinite(ys)
            grid = np.arange(self.last_step + 1)
            self._values[column] = (
                np.interp(grid, self.steps[ok], ys[ok]) if ok.any() else np.full(len(grid), np.nan)
            )
        return float(self._values[column][min(step, self.last_step)])

    def horizon_step(self, config: RunConfig) -> int:
        """The step a run of `config` ends at on this recording (at least 1, at most its last)."""
        last = self.last_step
        if config.max_steps is not None:
            end = config.max_steps
        elif config.max_tokens is not None:
            reached = np.nonzero(self._tokens >= config.max_tokens)[0]
            end = int(reached[0]) if len(reached) else last
        else:
            limit = float(config.max_seconds or 0.0)
            end = int(np.nonzero(self._elapsed <= limit + 1e-9)[0][-1])
        return max(1, min(end, last))

    def covers(self, config: RunConfig) -> bool:
        """Whether this recording reaches the horizon `config` asks for."""
        if config.max_steps is not None:
            return self.last_step >= config.max_steps
        if config.max_tokens is not None:
            return int(self.tokens[-1]) >= config.max_tokens
        return float(self.elapsed[-1]) >= float(config.max_seconds or 0.0)


@dataclass
class Recording:
    """A validated curves file: its configurations, their runs, and the mapping rule."""

    configs: pd.DataFrame
    """One row per recorded configuration (parameter columns only), indexed 0..n-1."""
    runs: dict[str, RecordedRun]
    source: str = "curves"
    default_mix: dict[str, float] | None = None
    """The mixture of the `mix_default` runs: what a configuration without weights trains on."""
    _by_config: dict[int, dict[int, list[str]]] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for rid, run in self.runs.items():
            self._by_config.setdefault(run.config, {}).setdefault(run.seed, []).append(rid)
        for seeds in self._by_config.values():
            for rids in seeds.values():
                rids.sort(key=lambda r: (self.runs[r].horizon_steps, self.runs[r].last_step))
        # The mapping rule's per-column transforms, computed once.
        self._numeric: list[tuple[str, np.ndarray, bool, float]] = []
        for col in self.param_columns:
            if col.startswith(MIX_PREFIX) or col in TEXT_PARAMS:
                continue
            log = col in LOG_PARAMS
            t = self.configs[col].to_numpy(dtype=float)
            t = np.log(t) if log else t
            self._numeric.append((col, t, log, float(t.max() - t.min())))
        self._mix_cols = [c for c in self.param_columns if c.startswith(MIX_PREFIX)]
        self._mix = self.configs[self._mix_cols].to_numpy(dtype=float) if self._mix_cols else None

    @property
    def param_columns(self) -> list[str]:
        return list(self.configs.columns)

    def seeds(self, config: int) -> list[int]:
        return sorted(self._by_config[config])

    def params_of(self, config: RunConfig) -> dict[str, Any]:
        """A RunConfig's values by Optuna name, its mixture as `mix.<source>` fractions."""
        out: dict[str, Any] = {
            "lora_rank": config.lora.r, "lora_alpha": config.lora.alpha,
            "lora_dropout": config.lora.dropout, "lora_targets": config.lora.targets,
            "lr": config.learning_rate, "micro_batch": config.micro_batch,
            "global_batch": config.global_batch, "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay,
        }  # fmt: skip
        weights = config.weights
        if weights is None:
            weights = self.default_mix or {s.name: 1.0 for s in config.sources}
        total = sum(weights.values()) or 1.0
        out.update({MIX_PREFIX + name: w / total for name, w in weights.items()})
        return out

    def match(self, params: dict[str, Any]) -> int:
        """The nearest recorded configuration (module docstring: mapping rule)."""
        key = tuple((k, params.get(k)) for k in self.param_columns)
        if key in self._cache:
            return self._cache[key]
        dist = np.zeros(len(self.configs))
        if self._mix is not None:
            want = np.array([float(params.get(c) or 0.0) for c in self._mix_cols])
            dist += 0.5 * np.abs(self._mix - want).sum(axis=1)
        for col, t, log, span in self._numeric:
            if params.get(col) is not None and span > 0:
                x = float(params[col])
                dist += np.abs(t - (np.log(x) if log else x)) / span
        for col in TEXT_PARAMS:
            if col in self.configs and params.get(col) is not None:
                dist += (self.configs[col].astype(str) != str(params[col])).to_numpy(dtype=float)
        best = int(np.argmin(dist))
        self._cache[key] = best
        return best

    def pick_run(self, config: int, seed: int, run_config: RunConfig) -> RecordedRun:
        """Of a configuration's runs with `seed`: the shortest that covers the horizon."""
        runs = [self.runs[r] for r in self._by_config[config][seed]]
        for run in runs:
            if run.covers(run_config):
                return run
        return runs[-1]

    def expected_value(self, config: int, run_config: RunConfig, step: int) -> float:
        """Mean over seeds of val_loss at `step` on the run each seed would replay (inf if
        a seed's run diverged or ran out of memory)."""
        values = []
        for seed in self.seeds(config):
            run = self.pick_run(config, seed, run_config)
            ok = run.status == "completed"
            values.append(run.value_at(min(step, run.last_step)) if ok else float("inf"))
        return float(np.mean(values))

    def describe(self, config: int) -> dict[str, Any]:
        """A recorded configuration's parameters as plain Python values."""
        out: dict[str, Any] = {}
        for k, v in self.configs.iloc[config].items():
            v = v.item() if hasattr(v, "item") else v
            integer = k in RULES and RULES[k].kind is int
            out[k] = int(v) if integer and isinstance(v, float) and v.is_integer() else v
        return out


# --- reading and validation ---------------------------------------------------------------


def read_curves(path: str | Path) -> pd.DataFrame:
    """The raw table of a curves file (CSV or Parquet)."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise UserInputError(f"{path}: curves must be a .csv or .parquet file")
    if not path.exists():
        raise UserInputError(f"{path}: no such curves file")
    try:
        return pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as e:  # a corrupt or unreadable file is the user's to fix
        raise UserInputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def load_curves(path: str | Path) -> Recording:
    """Read and validate a curves file; a mistake is one line naming file, column and row."""
    return validate_curves(read_curves(path), str(path))


class _Checker:
    """Raises the first problem of a curves table as one line: file, row, column."""

    def __init__(self, df: pd.DataFrame, source: str) -> None:
        self.df = df
        self.source = source

    def fail(self, message: str, row: int | None = None) -> UserInputError:
        if row is None:
            return UserInputError(f"{self.source}: {message}")
        # CSV rows by file line (the header is line 1); Parquet rows counted from 1.
        csv = self.source.lower().endswith(".csv")
        where = f"line {row + 2}" if csv else f"row {row + 1}"
        return UserInputError(f"{self.source} {where}: {message}")

    def check(self, bad: np.ndarray | pd.Series, message: str) -> None:
        idx = np.nonzero(np.asarray(bad))[0]
        if len(idx):
            raise self.fail(message.format(row=int(idx[0])), int(idx[0]))

    def numeric(self, col: str) -> np.ndarray:
        raw = self.df[col]
        values = pd.to_numeric(raw, errors="coerce")
        idx = np.nonzero((values.isna() & raw.notna()).to_numpy())[0]
        if len(idx):
            raise self.fail(f"{col} is not a number ({raw.iloc[idx[0]]!r})", int(idx[0]))
        return values.to_numpy(dtype=float)


def validate_curves(df: pd.DataFrame, source: str = "curves") -> Recording:
    """Check a curves table against the format (module docstring) and index it."""
    c = _Checker(df.reset_index(drop=True), source)
    df = c.df
    missing = [col for col in REQUIRED if col not in df.columns]
    if missing:
        raise c.fail(f"missing column {missing[0]} (required: {', '.join(REQUIRED)})")
    params = [col for col in df.columns if col in RULES or col.startswith(MIX_PREFIX)]
    known = {*REQUIRED, *RUN_COLUMNS, *METRIC_COLUMNS, *params}
    unknown = [col for col in df.columns if col not in known]
    if unknown:
        raise c.fail(
            f"unknown column {unknown[0]} (parameters go by Optuna name: lr, mix.<source>)"
        )
    if not params:
        raise c.fail("no parameter column (lora_rank, lr, micro_batch, mix.<source>, ...)")
    if len(df) == 0:
        raise c.fail("no rows")
    cols = {
        col: c.numeric(col) for col in df.columns if col not in ("run_id", "status", *TEXT_PARAMS)
    }
    for col in params:
        if col not in TEXT_PARAMS:
            c.check(np.isnan(cols[col]), f"{col} is empty")
    for col in ("step", "tokens_seen", "elapsed_s"):
        c.check(~np.isfinite(cols[col]) | (cols[col] < 0), f"{col} must be a number >= 0")
    status = (
        (df["status"] if "status" in df else pd.Series(["completed"] * len(df)))
        .fillna("completed")
        .astype(str)
    )
    c.check(~status.isin(STATUSES), f"status is not one of {', '.join(STATUSES)}")
    mix_cols = [col for col in params if col.startswith(MIX_PREFIX)]
    if mix_cols:
        sums = np.sum([cols[col] for col in mix_cols], axis=0)
        c.check(np.abs(sums - 1.0) > 1e-3, "the mix.* fractions do not sum to 1")
    run_ids = df["run_id"].astype(str)
    groups = run_ids.groupby(run_ids, sort=False)
    first = groups.cumcount().to_numpy() == 0
    # What describes a run must be equal on all its rows; steps increase, time never drops.
    for col in [*params, *[k for k in RUN_COLUMNS if k in df]]:
        text = (status if col == "status" else df[col]).astype(str)
        c.check(text != text.groupby(run_ids, sort=False).transform("first"),
                f"{col} differs from the first row of its run")  # fmt: skip
    for col, op in (("step", "le"), ("tokens_seen", "lt"), ("elapsed_s", "lt")):
        diff = pd.Series(cols[col]).groupby(run_ids.to_numpy(), sort=False).diff().to_numpy()
        bad = (diff <= 0) if op == "le" else (diff < 0)
        word = "does not increase" if op == "le" else "decreases"
        c.check(bad & ~first, f"{col} {word} within its run")
    last = np.r_[run_ids.to_numpy()[1:] != run_ids.to_numpy()[:-1], True]
    allowed = (status == "oom").to_numpy() | ((status == "diverged").to_numpy() & last)
    c.check(~np.isfinite(cols["val_loss"]) & ~allowed, "val_loss must be a finite number")
    return _index(df, cols, params, status, groups, c)


def _index(df: pd.DataFrame, cols: dict[str, np.ndarray], params: list[str], status: pd.Series,
           groups: Any, c: _Checker) -> Recording:  # fmt: skip
    """Build the Recording from a table that passed the row checks."""
    configs: dict[tuple, int] = {}
    runs: dict[str, RecordedRun] = {}
    default_mix: dict[str, float] | None = None
    mix_cols = [col for col in params if col.startswith(MIX_PREFIX)]
    for rid, idx in groups.indices.items():
        rows = np.asarray(idx)
        i = int(rows[0])
        st = str(status.iloc[i])
        steps = cols["step"][rows]
        if st == "oom" and len(rows) != 1:
            raise c.fail(f"run {rid}: an oom run has exactly one row", i)
        if st != "oom" and steps[-1] < 1:
            raise c.fail(f"run {rid}: needs a checkpoint at step >= 1", i)
        key = tuple(df[col].iloc[i] if col in TEXT_PARAMS else cols[col][i] for col in params)
        cid = configs.setdefault(key, len(configs))

        def run_value(col: str, default: float) -> float:
            v = cols[col][i] if col in cols else np.nan
            return float(v) if np.isfinite(v) else default

        peak = cols.get("peak_memory_bytes")
        runs[str(rid)] = RecordedRun(
            run_id=str(rid), config=cid, seed=int(run_value("seed", 0)), status=st,
            horizon_steps=int(run_value("horizon_steps", steps[-1])), steps=steps.astype(int),
            tokens=cols["tokens_seen"][rows], elapsed=cols["elapsed_s"][rows],
            val_loss=cols["val_loss"][rows],
            train_loss=cols["train_loss"][rows] if "train_loss" in cols else None,
            score=cols["score"][rows] if "score" in cols else None,
            peak_memory_bytes=float(np.nanmax(peak[rows])) if peak is not None else 0.0,
        )  # fmt: skip
        if mix_cols and run_value("mix_default", 0) == 1:
            default_mix = {col[len(MIX_PREFIX) :]: float(cols[col][i]) for col in mix_cols}
    table = pd.DataFrame(list(configs), columns=params)
    return Recording(table, runs, c.source, default_mix)
