"""`budgetune plan study.toml`: the budget plan, before a single GPU-second is spent.

The numbers follow the ledger's rules (`ledger.py`): the final run's reserve comes off the
top, trials reserve from the search share minus the margin, and whatever search leaves
flows to the final run. How many trials fit with pruning is an estimate: it assumes the
pruner decides at rungs placed at 1/eta^2 and 1/eta of a trial's horizon (successive halving
keeps 1/eta at each rung; Hyperband averages that over its brackets; median prunes about
half the trials at mid-horizon), so a pruned trial costs only the part it ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from budgetune.search.study import Study, load_study


@dataclass
class Plan:
    total_s: float
    final_reserve_s: float
    search_s: float
    margin_s: float
    trial_s: float
    min_trial_s: float
    trial_horizon_s: float
    trial_eval_s: float
    final_tail_s: float
    n_trials_no_pruning: int
    mean_trial_fraction: float
    """Expected cost of a trial, as a fraction of a full one, under the pruner."""
    n_trials_pruning: int
    eval_share: float
    """Share of the total budget the trials' short-horizon evals are expected to take."""


def _sh_fraction(eta: int, rungs: int) -> float:
    """Expected fraction of a horizon a trial runs under successive halving with `rungs`."""
    return eta**-rungs * (rungs * (1 - 1 / eta) + 1)


def pruned_fraction(kind: str, eta: int) -> float:
    if kind == "successive-halving":
        return _sh_fraction(eta, 2)
    if kind == "hyperband":
        return sum(_sh_fraction(eta, k) for k in range(3)) / 3
    if kind == "median":
        return 0.75
    return 1.0


def make_plan(study: Study) -> Plan:
    b = study.budget
    usable = b.search_s - b.margin
    n_plain = int(usable // b.trial_s) + (1 if usable % b.trial_s >= b.min_trial else 0)
    frac = pruned_fraction(study.pruner.kind, study.pruner.reduction_factor)
    train_s = b.trial_s - b.trial_eval_s - b.trial_setup_s
    # Pruned trials skip their eval; complete ones (the share that reaches the end) pay it.
    survive = (
        frac if study.pruner.kind == "none" else _sh_fraction(study.pruner.reduction_factor, 2)
    )
    mean_cost = b.trial_setup_s + frac * train_s + min(1.0, survive) * b.trial_eval_s
    n_pruned = int(usable // mean_cost) if mean_cost > 0 else n_plain
    evals = n_pruned * min(1.0, survive) * b.trial_eval_s
    return Plan(
        total_s=b.total_s,
        final_reserve_s=b.final_reserve_s,
        search_s=b.search_s,
        margin_s=b.margin,
        trial_s=b.trial_s,
        min_trial_s=b.min_trial,
        trial_horizon_s=train_s,
        trial_eval_s=b.trial_eval_s,
        final_tail_s=b.final_tail,
        n_trials_no_pruning=n_plain,
        mean_trial_fraction=mean_cost / b.trial_s,
        n_trials_pruning=max(n_plain, n_pruned),
        eval_share=evals / b.total_s,
    )


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def format_plan(study: Study, p: Plan) -> str:
    pr = study.pruner
    share = 100 * p.final_reserve_s / p.total_s
    frac = 100 * p.mean_trial_fraction
    lines = [
        f"study {study.name}: budget {_hms(p.total_s)} ({p.total_s:.0f} GPU-s)",
        f"  final reserve    {_hms(p.final_reserve_s)} ({share:.0f}%), "
        f"plus whatever search leaves; {_hms(p.final_tail_s)} of it kept for eval/merge/export",
        f"  search share     {_hms(p.search_s)} "
        f"(margin {_hms(p.margin_s)} for overhead and overruns)",
        f"  per trial        {_hms(p.trial_s)} allowance: {_hms(p.trial_horizon_s)} training, "
        f"{_hms(study.budget.trial_setup_s)} setup, {_hms(p.trial_eval_s)} eval; "
        f"started only if >= {_hms(p.min_trial_s)} is left",
        f"  trials that fit  {p.n_trials_no_pruning} without pruning; about {p.n_trials_pruning} "
        f"with {pr.kind} pruning (eta={pr.reduction_factor}: a trial costs ~{frac:.0f}% "
        "of its allowance on average)",
        f"  eval cost share  {100 * p.eval_share:.1f}% of the budget "
        "(short-horizon evals of trials)",
        f"  run directory    {study.run_dir}",
        f"  storage          {study.storage}",
    ]
    if study.max_trials:
        lines.append(f"  max trials       {study.max_trials}")
    return "\n".join(lines)


def show_plan(path: str) -> str:
    """`budgetune plan study.toml`."""
    study = load_study(path)
    return format_plan(study, make_plan(study))


def n_trials_upper_bound(study: Study) -> int:
    """Most trials the search share can hold if every one is cut at its minimum."""
    b = study.budget
    return max(1, math.floor((b.search_s - b.margin) / b.min_trial))
