"""Does the search pay? Five ways to spend the same budget, on recorded curves.

    python tests/benchmarks/bench_search_policies.py [--seeds 20] [--out figure.html] [--jobs 2]

Every strategy gets the same total budget and the quickstart study's search space, on the
replay backend (`search/replay.py`) over the engine's recorded quickstart curves
(`tests/benchmarks/data/quickstart_curves.csv`, made by `python -m
budgetune.search.record_curves`). The driver, ledger, pruner and final run are the real ones.

- (a) default: the default configuration (Lit-GPT 2023 defaults, the study's `[train]`)
  trained on the whole budget (less the final run's tail kept for eval/merge/export);
- (b) random: random sampling, no pruning, then the final run;
- (c) tpe: Optuna TPE, no pruning, then the final run;
- (d) sha: random sampling with successive halving, then the final run;
- (e) budgetune: the default policy, i.e. what a study file without `[sampler]`, `[pruner]`
  and `budget.final_share` gets (`search/study.py` defaults);
- (e') the same search as (e) with (b)-(d)'s final share, to tell what the split does from
  what the search does.

(b)-(d) are frozen baselines (`strategy_study`; 30% of the budget reserved for the final run,
as the quickstart study does), so tuning the defaults in `search/study.py` moves only (e).
The reference budget is what the recording's full horizon costs the
default configuration; a trial's allowance is a fixed fraction of it (the user's choice in a
real study, kept equal across budgets). The final model's quality is the chosen
configuration's recorded val_loss at the step the final run reached, averaged over the
recorded seeds (`ReplayBackend.final_quality`). Printed: the rank correlation of short-
and full-horizon quality on the recording; per strategy the median, quartiles and range of
the final val_loss over seeds at the reference budget and its ratio to (a)'s median; and the
budget each strategy needs for its median to reach random search's median at the reference
budget (swept over budgets, interpolated in log budget). Goal: (e) has the best median and
reaches (b)'s median with <= 1/3 of the budget. The figure: median final val_loss (and its
quartiles) against budget for every strategy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
CURVES = ROOT / "tests" / "benchmarks" / "data" / "quickstart_curves.csv"
STUDY = ROOT / "studies" / "quickstart.toml"
STRATEGIES = ("default", "random", "tpe", "sha", "budgetune", "split30")
LABELS = {"default": "(a) default config, whole budget", "random": "(b) random search",
          "tpe": "(c) TPE, no pruning", "sha": "(d) successive halving (random)",
          "budgetune": "(e) budgetune default policy",
          "split30": "(e') (e)'s search, 30% final share"}  # fmt: skip
BUDGETS = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0)
"""Budgets swept, as fractions of the reference budget."""
TRIAL_FRACTION = 1 / 10
"""A trial's allowance as a fraction of the reference budget."""
BASELINE_FINAL_SHARE = 0.3
"""The final run's reserve in (b)-(d): the usual split of search then final run."""


class _NoLimit:
    """A reporter for a run outside any study: it never stops the run."""

    def phase(self, name: str) -> None:
        pass

    def report(self, event: Any) -> bool:
        return False

    def should_stop(self) -> bool:
        return False


def reference_budget(rec: Any, study: Any) -> float:
    """Seconds the default configuration's longest recorded run took (mean over seeds)."""
    cfg = study.run_config(Path("default"), {}, max_steps=10**9)
    cid = rec.match(rec.params_of(cfg))
    runs = [rec.pick_run(cid, s, cfg) for s in rec.seeds(cid)]
    return float(np.mean([r.elapsed_at(r.last_step) for r in runs]))


def base_study(rec: Any) -> Any:
    """The quickstart study, its eval interval set to the recording's checkpoint spacing."""
    from budgetune.search.study import load_study

    study = load_study(STUDY)
    steps = np.diff(next(iter(rec.runs.values())).steps[1:])
    interval = int(np.median(steps)) if len(steps) else 1
    return dataclasses.replace(study, train={**study.train, "eval_interval": interval},
                               max_trials=None, patience=None)  # fmt: skip


def strategy_study(study: Any, strategy: str, total_s: float, trial_s: float) -> Any:
    """The study each strategy runs at `total_s` (module docstring).

    The baselines are frozen here (TPE with 5 random startup trials and multivariate, as the
    driver sets it up: Optuna's own default of 10 startup trials is more than this budget
    holds, which makes it random search; successive halving with the driver's rung spacing;
    a 30% final share) so they stay put while `search/study.py`'s defaults, which (e) uses,
    are tuned.
    """
    from budgetune.search.study import BudgetSpec, PrunerSpec, SamplerSpec

    # The search share's slack: 1% for every strategy. The default's floor of 1 s covers a
    # real driver's database writes, which a replay does not have; on the recording's
    # seconds-long reference budget it would hold back an eighth of the budget.
    share = {} if strategy == "budgetune" else {"final_share": BASELINE_FINAL_SHARE}
    budget = BudgetSpec(total_s=total_s, trial_s=trial_s, margin_s=0.01 * total_s, **share)
    sampler, pruner = {
        "budgetune": (SamplerSpec(), PrunerSpec()),
        "split30": (SamplerSpec(), PrunerSpec()),
        "random": (SamplerSpec(kind="random"), PrunerSpec(kind="none")),
        "tpe": (SamplerSpec(kind="tpe", n_startup_trials=5, multivariate=True),
                PrunerSpec(kind="none")),
        "sha": (SamplerSpec(kind="random"),
                PrunerSpec(kind="successive-halving", reduction_factor=3)),
    }[strategy]  # fmt: skip
    return dataclasses.replace(study, budget=budget, sampler=sampler, pruner=pruner)


def run_cell(args: tuple[str, str, float, list[int]]) -> list[dict[str, Any]]:
    """One strategy at one budget fraction over seeds -> one row per seed."""
    from budgetune.search.curves import load_curves
    from budgetune.search.replay import ReplayBackend, replay_study

    curves, strategy, fraction, seeds = args
    rec = load_curves(curves)
    study = base_study(rec)
    ref = reference_budget(rec, study)
    total, trial = ref * fraction, ref * TRIAL_FRACTION
    rows = []
    for seed in seeds:
        backend = ReplayBackend(rec, seed=seed)
        t = time.perf_counter()
        if strategy == "default":
            tail = dataclasses.replace(study.budget, total_s=total, final_tail_s=None).final_tail
            with tempfile.TemporaryDirectory() as tmp:
                cfg = study.run_config(Path(tmp), {}, max_seconds=total - tail)
                backend.run(cfg, _NoLimit())
            row = {"quality": backend.final_quality(), "n_trials": 0, "spent_s": total - tail}
        else:
            s = strategy_study(dataclasses.replace(study, seed=seed), strategy, total, trial)
            out = replay_study(s, backend)
            row = {"quality": out.final_quality, "n_trials": out.n_trials, "spent_s": out.spent_s,
                   "final_share": out.final_train_s / total}  # fmt: skip
        rows.append({"strategy": strategy, "fraction": fraction, "budget_s": total, "seed": seed,
                     "wall_s": time.perf_counter() - t, **row})  # fmt: skip
    return rows


def condensed(table: pd.DataFrame, fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)) -> pd.DataFrame:
    """The checkpoint rows nearest a few fractions of the full horizon, and every short run."""
    ck = table[table.source == "checkpoint"]
    keep = {int((ck.fraction - f).abs().idxmin()) for f in fractions} if len(ck) else set()
    return table[table.index.isin(keep) | (table.source != "checkpoint")]


def budget_to_reach(medians: pd.Series, target: float) -> float:
    """Smallest budget fraction whose median quality reaches `target` (log interpolation)."""
    xs, ys = list(medians.index), list(medians.to_numpy())
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            w = (y0 - target) / (y0 - y) if y0 != y else 1.0
            return float(math.exp(math.log(x0) + w * (math.log(x) - math.log(x0))))
    return float("inf")


def oracle_budget(rec: Any, study: Any, ref_s: float, target: float) -> tuple[float, dict]:
    """Least budget fraction at which a free, perfect search would reach `target`.

    The bound no policy beats: the best recorded configuration trained on the whole budget
    (less the final tail), as if searching cost nothing. Returns it and that configuration.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for f in np.linspace(0.02, 1.0, 50):
            total = f * ref_s
            tail = dataclasses.replace(study.budget, total_s=total, final_tail_s=None).final_tail
            cfg = study.run_config(Path(tmp), {}, max_seconds=total - tail)
            best = (float("inf"), 0)
            for cid in range(len(rec.configs)):
                run = rec.pick_run(cid, rec.seeds(cid)[0], cfg)
                best = min(best, (rec.expected_value(cid, cfg, run.horizon_step(cfg)), cid))
            if best[0] <= target:
                return float(f), rec.describe(best[1])
    return float("inf"), {}


def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per strategy at the reference budget: median, quartiles, range, budget to reach (b)."""
    ref = df[df.fraction == 1.0]
    target = float(ref[ref.strategy == "random"].quality.median())
    default_median = float(ref[ref.strategy == "default"].quality.median())
    medians = df.groupby(["strategy", "fraction"]).quality.median()
    rows = []
    for s in STRATEGIES:
        q = ref[ref.strategy == s].quality
        rows.append({
            "strategy": LABELS[s], "median": q.median(), "q25": q.quantile(0.25),
            "q75": q.quantile(0.75), "min": q.min(), "max": q.max(),
            "vs_default": q.median() / default_median,
            "trials": ref[ref.strategy == s].n_trials.mean(),
            "budget_to_random_median": budget_to_reach(medians[s].sort_index(), target),
        })  # fmt: skip
    return pd.DataFrame(rows), target


def format_table(table: pd.DataFrame, n_seeds: int) -> str:
    head = (f"{'strategy':<36} {'median':>7} {'q25':>7} {'q75':>7} {'min':>7} {'max':>7} "
            f"{'/(a)':>6} {'trials':>6} {'budget to (b) median':>21}")  # fmt: skip
    lines = [f"final val_loss over {n_seeds} seeds at the reference budget (lower is better)",
             head]  # fmt: skip
    for r in table.itertuples(index=False):
        need = r.budget_to_random_median
        need_s = f"{need:.2f}x" if math.isfinite(need) else f"> {max(BUDGETS):g}x"
        lines.append(f"{r.strategy:<36} {r.median:>7.4f} {r.q25:>7.4f} {r.q75:>7.4f} "
                     f"{r.min:>7.4f} {r.max:>7.4f} {r.vs_default:>6.3f} {r.trials:>6.1f} "
                     f"{need_s:>21}")  # fmt: skip
    return "\n".join(lines)


def write_figure(df: pd.DataFrame, target: float, ref_s: float, path: Path) -> Path:
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in STRATEGIES:
        g = df[df.strategy == s].groupby("fraction").quality
        x = [f * ref_s for f in g.median().index]
        fig.add_trace(go.Scatter(
            x=x, y=g.median().to_numpy(), name=LABELS[s], mode="lines+markers",
            error_y={"type": "data", "symmetric": False,
                     "array": (g.quantile(0.75) - g.median()).to_numpy(),
                     "arrayminus": (g.median() - g.quantile(0.25)).to_numpy()},
        ))  # fmt: skip
    fig.add_hline(y=target, line_dash="dot", annotation_text="(b) random search median at 1x")
    fig.update_layout(title="Final model quality against budget (replayed quickstart curves)",
                      xaxis_title="total budget (recorded GPU-seconds)", xaxis_type="log",
                      yaxis_title="final val_loss (median, quartiles)")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True)
    return path


def main(argv: list[str] | None = None) -> None:
    from budgetune.search.curves import load_curves
    from budgetune.search.horizon import format_correlation, horizon_correlation

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", type=Path, default=CURVES)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="figure HTML (default: a temp dir)")
    p.add_argument("--jobs", type=int, default=1, help="processes (the replays are CPU-bound)")
    p.add_argument("--budgets", default=",".join(f"{b:.6g}" for b in BUDGETS))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rec = load_curves(a.curves)
    study = base_study(rec)
    ref_s = reference_budget(rec, study)
    fractions = sorted({float(x) for x in a.budgets.split(",")} | {1.0})
    print(f"recording {a.curves.name}: {len(rec.configs)} configurations, {len(rec.runs)} runs; "
          f"reference budget {ref_s:.1f} s, trial allowance {ref_s * TRIAL_FRACTION:.1f} s, "
          f"eval every {study.train['eval_interval']} steps")  # fmt: skip
    print("\nshort- vs full-horizon quality on the recording (Spearman over runs):")
    print(format_correlation(condensed(horizon_correlation(rec))))
    seeds = list(range(a.seeds))
    cells = [(str(a.curves), s, f, seeds) for s in STRATEGIES for f in fractions]
    if a.jobs > 1:
        with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(run_cell, cells, chunksize=1)
    else:
        results = [run_cell(c) for c in cells]
    df = pd.DataFrame([r for rows in results for r in rows])
    table, target = summarize(df)
    print()
    print(format_table(table, a.seeds))
    by_budget = df.pivot_table(index="strategy", columns="fraction", values="quality",
                               aggfunc="median").reindex(list(STRATEGIES))  # fmt: skip
    by_budget.columns = [f"{f:.3g}x" for f in by_budget.columns]
    print(f"\nmedian final val_loss by budget (x the reference {ref_s:.1f} s):")
    print(by_budget.round(3).to_string())
    e = table.iloc[STRATEGIES.index("budgetune")]
    best = table["median"].min()
    print(
        f"\ngoal: (e) best median: {'yes' if e['median'] <= best + 1e-12 else 'no'}; "
        f"(e) reaches (b)'s median with {e.budget_to_random_median:.2f}x the budget "
        f"(<= 0.33x: {'yes' if e.budget_to_random_median <= 1 / 3 + 1e-9 else 'no'})"
    )
    f, cfg = oracle_budget(rec, study, ref_s, target)
    print(f"bound: a free, perfect search (the best recorded configuration {cfg} trained on "
          f"the whole budget) reaches (b)'s median with {f:.2f}x the budget")  # fmt: skip
    out = a.out or Path(tempfile.mkdtemp(prefix="budgetune-bench-")) / "search_policies.html"
    write_figure(df, target, ref_s, out)
    print(f"figure: {out}")
    print(f"{len(df)} replays ({(df.n_trials).sum():.0f} trials) in "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
