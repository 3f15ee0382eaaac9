"""Does short-horizon quality predict full-horizon quality? Rank correlation by horizon.

The whole search rests on it: trials are short, the pruner judges them after a few evals,
and the final run trains the winner for far longer. If the ranking of configurations after
s optimizer steps is not the ranking at the end, both pruning and short trials mislead.

`horizon_correlation(data)` returns one row per horizon with the Spearman rank correlation
between quality at that horizon and quality at the end, over every pair it has:

- on recorded curves (a `curves.py` file, table or `Recording`): each configuration and seed
  recorded to its longest horizon is one pair per checkpoint (`source = checkpoint`: the
  prefix of the long run, what the pruner sees); each shorter recorded run of the same
  configuration and seed is a pair of its end value with the long run's end value
  (`source = short run`: what a short trial with its own decayed schedule sees);
- on a study (an `optuna.Study` or its trials): each complete trial pairs its intermediate
  value at step s with its final objective (`source = trial`), i.e. how well the pruner's
  early readings predicted where a trial ended. A user's own study shows this once
  `min_pairs` complete trials share a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budgetune.search.curves import Recording, load_curves, validate_curves

COLUMNS = ("source", "horizon_step", "fraction", "n", "spearman")


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman's rho: Pearson's correlation of average ranks (NaN if either is constant)."""
    ra = pd.Series(list(a), dtype=float).rank().to_numpy()
    rb = pd.Series(list(b), dtype=float).rank().to_numpy()
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def horizon_correlation(trials_or_curves: Any, min_pairs: int = 5) -> pd.DataFrame:
    """Spearman correlation of quality at each horizon with quality at the end.

    `trials_or_curves`: a curves file path, a curves DataFrame, a `Recording`, an
    `optuna.Study` or a sequence of its `FrozenTrial`s. Horizons with fewer than `min_pairs`
    pairs are left out, so a young study gives an empty table (same columns).
    Columns: source, horizon_step, fraction (of the full horizon), n (pairs), spearman.
    """
    data = trials_or_curves
    if isinstance(data, str | Path):
        data = load_curves(data)
    elif isinstance(data, pd.DataFrame):
        data = validate_curves(data)
    if isinstance(data, Recording):
        rows = _curve_rows(data, min_pairs)
    else:
        trials = data.get_trials(deepcopy=False) if hasattr(data, "get_trials") else list(data)
        rows = _trial_rows(trials, min_pairs)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _curve_rows(rec: Recording, min_pairs: int) -> list[dict[str, Any]]:
    longest: dict[tuple[int, int], Any] = {}
    shorter: list[Any] = []
    for run in rec.runs.values():
        if run.status != "completed":
            continue
        key = (run.config, run.seed)
        best = longest.get(key)
        if best is None or run.last_step > best.last_step:
            if best is not None:
                shorter.append(best)
            longest[key] = run
        else:
            shorter.append(run)
    if not longest:
        return []
    full_step = int(np.median([r.last_step for r in longest.values()]))
    rows: list[dict[str, Any]] = []
    by_step: dict[int, list[tuple[float, float]]] = {}
    for run in longest.values():
        end = float(run.val_loss[-1])
        for step, value in zip(run.steps[:-1], run.val_loss[:-1], strict=True):
            if step > 0:
                by_step.setdefault(int(step), []).append((float(value), end))
    rows += _rows("checkpoint", by_step, full_step, min_pairs)
    by_horizon: dict[int, list[tuple[float, float]]] = {}
    for run in shorter:
        full = longest[(run.config, run.seed)]
        by_horizon.setdefault(run.last_step, []).append(
            (float(run.val_loss[-1]), float(full.val_loss[-1]))
        )
    rows += _rows("short run", by_horizon, full_step, min_pairs)
    return rows


def _trial_rows(trials: list[Any], min_pairs: int) -> list[dict[str, Any]]:
    complete = [
        t for t in trials
        if getattr(t.state, "name", "") == "COMPLETE" and t.value is not None
        and t.intermediate_values
    ]  # fmt: skip
    if not complete:
        return []
    full_step = int(np.median([max(t.intermediate_values) for t in complete]))
    by_step: dict[int, list[tuple[float, float]]] = {}
    for t in complete:
        last = max(t.intermediate_values)
        for step, value in t.intermediate_values.items():
            if step < last and np.isfinite(value):
                by_step.setdefault(int(step), []).append((float(value), float(t.value)))
    return _rows("trial", by_step, full_step, min_pairs)


def _rows(
    source: str, pairs: dict[int, list[tuple[float, float]]], full_step: int, min_pairs: int
) -> list[dict[str, Any]]:
    out = []
    for step in sorted(pairs):
        ps = pairs[step]
        if len(ps) < min_pairs:
            continue
        rho = spearman([p[0] for p in ps], [p[1] for p in ps])
        out.append({"source": source, "horizon_step": step, "fraction": step / max(full_step, 1),
                    "n": len(ps), "spearman": rho})  # fmt: skip
    return out


def format_correlation(table: pd.DataFrame) -> str:
    """The table as aligned text, for the benchmark and the CLI."""
    if table.empty:
        return "(too few pairs for a rank correlation)"
    lines = [f"{'source':<11} {'step':>6} {'of full':>8} {'pairs':>6} {'spearman':>9}"]
    for r in table.itertuples(index=False):
        lines.append(f"{r.source:<11} {r.horizon_step:>6d} {r.fraction:>8.2f} {r.n:>6d} "
                     f"{r.spearman:>9.3f}")  # fmt: skip
    return "\n".join(lines)
