"""The report's plotly figures, each built from a `ReportData` snapshot.

Optuna's own plots are used where they say what we need (history, parallel coordinates,
slices, contour); the rest are ours because they need what only budgetune records: the
trial outcome (OOM, diverged), the budget ledger, throughput and memory, mixture weights and
holdout scores. A figure with nothing to draw yet (a study still early, an attribute the
driver did not record) is kept, empty, with a "no data" note saying what is missing, so the
page's layout is the same for every study.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

from budgetune.search.horizon import horizon_correlation
from budgetune.search.report_data import (
    MIX_PREFIX,
    OUTCOMES,
    PARAM_MICRO_BATCH,
    PARAM_RANK,
    ReportData,
    as_float,
    outcome_of,
)

MIN_TRIALS_FOR_IMPORTANCE = 10
"""Below this many completed trials, importances are mostly noise; the page says so."""

HORIZON_MIN_PAIRS = 5
"""Completed trials that must share a step before its rank correlation is drawn."""

HORIZON_TRUST = 0.5
"""Below this rank correlation, the horizon figure's note warns that pruning chooses blind."""

IMPORTANCE_SEED = 0
"""fANOVA's forest is random: a fixed seed makes the same study give the same report."""

COLOURS = {
    "complete": "#2a9d8f",
    "pruned": "#8d99ae",
    "oom": "#e63946",
    "diverged": "#f4a261",
    "failed": "#6d597a",
    "skipped": "#f1a7ad",
    "continued": "#a8dadc",
    "running": "#457b9d",
    "waiting": "#adb5bd",
    "setup": "#b5838d",
    "train": "#2a9d8f",
    "eval": "#e9c46a",
    "final": "#264653",
    "overhead": "#ced4da",
}


@dataclass
class Figure:
    """One figure of the page, with the note the reader needs to trust (or not) it."""

    key: str
    """Stable id: the page's div is `fig-<key>`, and tests look figures up by it."""
    title: str
    fig: go.Figure
    note: str = ""
    """Shown under the figure: caveats, or why it has no data."""

    @property
    def has_data(self) -> bool:
        return has_points(self.fig)


def has_points(fig: go.Figure) -> bool:
    """True when some trace has at least one point to draw."""
    for trace in fig.data:
        for axis in ("x", "y", "z", "values", "dimensions"):
            values = getattr(trace, axis, None)
            if values is not None and len(values) > 0:
                return True
    return False


def _empty(key: str, title: str, why: str) -> Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title, height=260, xaxis={"visible": False}, yaxis={"visible": False},
        annotations=[{"text": f"no data: {why}", "showarrow": False, "font": {"size": 16},
                      "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
    )  # fmt: skip
    return Figure(key, title, fig, f"No data: {why}.")


def _quiet(build: Callable[[], Any]) -> Any:
    """Run an optuna plot/evaluator without its warnings and log lines (notes say it better)."""
    logger = optuna.logging.get_logger("optuna")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    finally:
        logger.setLevel(level)


def _time_unit(max_s: float) -> tuple[float, str]:
    if max_s >= 3 * 3600:
        return 3600.0, "h"
    if max_s >= 180:
        return 60.0, "min"
    return 1.0, "s"


# --- search -------------------------------------------------------------------------------


def compute_importances(data: ReportData) -> dict[str, dict[str, float]]:
    """PED-ANOVA and fANOVA importances by parameter (empty when they cannot be computed)."""
    evaluators = {
        "PED-ANOVA": PedAnovaImportanceEvaluator(),
        "fANOVA": FanovaImportanceEvaluator(seed=IMPORTANCE_SEED),
    }
    out: dict[str, dict[str, float]] = {}
    for name, evaluator in evaluators.items():
        out[name] = {}
        if len(data.completed) < 2:
            continue
        try:
            out[name] = _quiet(lambda e=evaluator: optuna.importance.get_param_importances(
                data.study, evaluator=e))  # fmt: skip
        except (ValueError, RuntimeError, ZeroDivisionError):
            pass  # e.g. every completed trial has the same value: nothing to attribute
    return out


def importance_figure(data: ReportData, importances: dict[str, dict[str, float]]) -> Figure:
    title = "Parameter importances"
    n = len(data.completed)
    note = (f"Computed from {n} completed trials; fANOVA uses seed {IMPORTANCE_SEED}. "
            "PED-ANOVA asks which parameters set the best trials apart; fANOVA asks which "
            "explain the objective's variance overall.")  # fmt: skip
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        note = (f"Only {n} completed trials (fewer than {MIN_TRIALS_FOR_IMPORTANCE}): these "
                "importances mean little yet. " + note)  # fmt: skip
    if not any(importances.values()):
        empty = _empty("importance", title, "needs 2 completed trials with different values")
        empty.note = note
        return empty
    names = list(importances)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.2)
    for col, name in enumerate(names, start=1):
        ranked = sorted(importances[name].items(), key=lambda kv: kv[1])
        fig.add_trace(go.Bar(
            x=[v for _, v in ranked], y=[k for k, _ in ranked], orientation="h", name=name,
            marker_color="#457b9d" if col == 1 else "#2a9d8f",
            hovertemplate="%{y}: %{x:.3f}<extra>" + name + "</extra>"), row=1, col=col)
        fig.update_xaxes(title_text="importance (normalized)", row=1, col=col)
    fig.update_layout(title=title, showlegend=False, height=380)
    return Figure("importance", title, fig, note)


def _optuna_plot(
    data: ReportData, key: str, title: str, build: Callable[[], go.Figure], note: str = ""
) -> Figure:
    if not data.completed:
        return _empty(key, title, "no completed trial yet")
    try:
        fig = _quiet(build)
    except (ValueError, RuntimeError) as e:
        return _empty(key, title, str(e))
    # Optuna fixes some widths (300 px per slice); the page is responsive instead.
    fig.update_layout(title=title, width=None, autosize=True)
    if not has_points(fig):
        return _empty(key, title, "not enough completed trials")
    return Figure(key, title, fig, note)


def history_figure(data: ReportData) -> Figure:
    name = data.objective_name()
    return _optuna_plot(
        data, "history", "Optimization history",
        lambda: optuna.visualization.plot_optimization_history(data.study, target_name=name),
        f"Completed trials only; the line is the best {name} so far ({data.direction}).")


def parallel_figure(data: ReportData) -> Figure:
    name = data.objective_name()
    return _optuna_plot(
        data, "parallel", "Parallel coordinates",
        lambda: optuna.visualization.plot_parallel_coordinate(data.study, target_name=name))


def slice_figure(data: ReportData) -> Figure:
    name = data.objective_name()
    return _optuna_plot(
        data, "slice", "Slices",
        lambda: optuna.visualization.plot_slice(data.study, target_name=name))


def contour_figure(data: ReportData, importances: dict[str, dict[str, float]]) -> Figure:
    title = "Contour of the two most important parameters"
    ranking = importances.get("fANOVA") or importances.get("PED-ANOVA") or {}
    top = [p for p, _ in sorted(ranking.items(), key=lambda kv: -kv[1])][:2]
    if len(top) < 2:
        return _empty("contour", title, "needs importances over two parameters")
    name = data.objective_name()
    return _optuna_plot(
        data, "contour", f"Contour: {top[0]} vs {top[1]}",
        lambda: optuna.visualization.plot_contour(data.study, params=top, target_name=name),
        "The two parameters fANOVA ranks highest.")


def learning_curves_figure(data: ReportData) -> Figure:
    """Intermediate values coloured by outcome (optuna's own plot cannot tell OOM from pruned)."""
    title = "Learning curves (validation loss at each report)"
    fig = go.Figure()
    shown: set[str] = set()
    for t in data.trials:
        curve = t.intermediate_values
        if not curve:
            continue
        outcome = outcome_of(t)
        steps = sorted(curve)
        fig.add_trace(go.Scatter(
            x=steps, y=[curve[s] for s in steps], mode="lines+markers", opacity=0.8,
            line={"color": COLOURS.get(outcome, "#333"), "width": 1.5}, marker={"size": 4},
            name=outcome, legendgroup=outcome, showlegend=outcome not in shown,
            hovertemplate=f"trial {t.number} ({outcome})<br>step %{{x}}<br>%{{y:.4f}}"
            "<extra></extra>"))  # fmt: skip
        shown.add(outcome)
    if not fig.data:
        return _empty("curves", title, "no trial has reported yet")
    # Log scale: a diverged curve shoots up by orders of magnitude and would flatten the rest.
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="validation loss",
                      yaxis_type="log", legend_title="outcome", height=420)
    return Figure("curves", title, fig, "Pruned trials stop early; OOM and diverged trials end "
                  "where the failure hit.")


def horizon_figure(data: ReportData) -> Figure:
    """How well a trial's early validation loss ranked it where it ended (Spearman by step).

    The search rests on this: the pruner judges trials after a few evals and the final run
    trains the winner far longer. Correlations near 1 say early readings can be trusted;
    near 0 or below, pruning and short trials are choosing blind, and longer trials (or a
    later `pruner.min_resource`) are worth their cost.
    """
    title = "Do early readings predict the end? (rank correlation by step)"
    table = horizon_correlation(data.trials, min_pairs=HORIZON_MIN_PAIRS)
    if table.empty:
        return _empty("horizon", title, f"needs {HORIZON_MIN_PAIRS} completed trials that "
                      "reported at the same step before their last")  # fmt: skip
    fig = go.Figure(go.Scatter(
        x=table.horizon_step.tolist(), y=table.spearman.tolist(), mode="lines+markers",
        name="Spearman", customdata=table[["n", "fraction"]].to_numpy().tolist(),
        line={"color": COLOURS["complete"]},
        hovertemplate="step %{x} (%{customdata[1]:.0%} of a trial)<br>rho %{y:.3f} "
        "over %{customdata[0]} trials<extra></extra>",
    ))  # fmt: skip
    fig.add_hline(y=0, line_dash="dot", line_color="#888")
    fig.update_layout(title=title, xaxis_title="optimizer step of the early reading",
                      yaxis_title="Spearman rho with the trial's objective",
                      yaxis_range=[-1.05, 1.05], height=360)  # fmt: skip
    weakest = table.loc[table.spearman.idxmin()] if table.spearman.notna().any() else None
    note = (f"Each point pairs completed trials' validation loss at a step with their final "
            f"objective ({int(table.n.max())} trials at most). Pruned trials are not in it "
            f"(they have no end to compare with), so the early readings compared are all "
            f"survivors' good ones: rho reads lower than the pruner's real accuracy.")  # fmt: skip
    if weakest is not None and weakest.spearman < HORIZON_TRUST:
        note += (f" At step {int(weakest.horizon_step)} rho is {weakest.spearman:.2f}: early "
                 "readings there rank trials poorly; consider a later pruner.min_resource or "
                 "longer trials.")  # fmt: skip
    return Figure("horizon", title, fig, note)


# --- budget -------------------------------------------------------------------------------


def _span_label(category: str, outcome: str) -> str:
    """Training time is coloured by how its trial ended; the rest by what it was."""
    return outcome if category in ("train", "trial") and outcome else category


def merge_adjacent(spans: pd.DataFrame) -> pd.DataFrame:
    """One bar per stretch of the same work: a run charges the ledger at every eval, and a
    final run of a thousand slices would otherwise draw a thousand bars."""
    rows: list[dict[str, Any]] = []
    last: dict[str, dict[str, Any]] = {}
    for row in spans.sort_values(["worker", "start_s"], kind="stable").to_dict("records"):
        prev = last.get(row["worker"])
        # Rows without a trial hold NaN there, and NaN != NaN: compare as numbers or "none".
        same = (prev is not None and prev["category"] == row["category"]
                and as_float(prev["trial"]) == as_float(row["trial"])
                and abs(prev["end_s"] - row["start_s"]) < 1e-6)  # fmt: skip
        if same:
            prev["end_s"] = row["end_s"]
            prev["seconds"] += row["seconds"]
        else:
            rows.append(row)
            last[row["worker"]] = row
    return pd.DataFrame(rows, columns=spans.columns)


def timeline_figure(data: ReportData) -> Figure:
    """A Gantt of who held which GPU when: trials by outcome, evals, the final run, overhead."""
    title = "Timeline of GPU time"
    if data.spans.empty:
        return _empty("timeline", title, "no GPU time spent yet")
    spans = merge_adjacent(data.spans)
    scale, unit = _time_unit(float(spans.end_s.max()))
    labels = [_span_label(c, o) for c, o in zip(spans.category, spans.outcome, strict=True)]
    spans = spans.assign(label=labels)
    known = (*OUTCOMES, "setup", "eval", "final", "overhead")
    order = [x for x in known if x in set(labels)] + sorted(set(labels) - set(known))
    fig = go.Figure()
    for label in order:
        part = spans[spans.label == label]
        what = [f"trial {int(t)} {c}" if as_float(t) is not None else c
                for t, c in zip(part.trial, part.category, strict=True)]
        fig.add_trace(go.Bar(
            y=part.worker, base=part.start_s / scale, x=part.seconds / scale, orientation="h",
            name=label, marker={"color": COLOURS.get(label, "#999"), "line": {"width": 0}},
            customdata=list(zip(what, part.seconds, strict=True)),
            hovertemplate="%{customdata[0]}<br>%{customdata[1]:.1f} GPU-s<extra>" + label
            + "</extra>"))  # fmt: skip
    from_ledger = data.ledger is not None and bool(data.ledger.entries)
    axis = "GPU time" if from_ledger else "wall time since the first trial"
    fig.update_layout(title=title, barmode="overlay", xaxis_title=f"{axis} ({unit})",
                      yaxis_title="worker", height=max(380, 200 + 40 * spans.worker.nunique()),
                      legend_title="what ran")  # fmt: skip
    note = ("From the budget ledger: each worker's slices laid end to end (time no worker "
            "ran is not spent, so not shown)." if from_ledger else
            "From trial start/end times: this storage has no budget ledger.")  # fmt: skip
    return Figure("timeline", title, fig, note)


def _ramps(spans: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Cumulative spend that rises during each span and stays flat between them (the ledger
    books a slice when it ends, but the GPU was busy all along)."""
    x, y, total = [0.0], [0.0], 0.0
    for start, end, seconds in zip(spans.start_s, spans.end_s, spans.seconds, strict=True):
        x += [float(start), float(end)]
        y += [total, total + float(seconds)]
        total += float(seconds)
    return x, y


def spend_figure(data: ReportData) -> Figure:
    """Cumulative GPU-seconds spent, in total and by category, against the budget."""
    title = "Cumulative spend against the budget"
    spans = data.spans.sort_values("end_s", kind="stable")
    if spans.empty:
        return _empty("spend", title, "nothing spent yet")
    top = max(float(spans.seconds.sum()), data.budget_s or 0.0)
    scale, unit = _time_unit(max(float(spans.end_s.max()), top))
    fig = go.Figure()
    series = [("total", spans)] + [(c, spans[spans.category == c])
                                   for c in sorted(set(spans.category))]  # fmt: skip
    for name, part in series:
        x, y = _ramps(part)
        fig.add_trace(go.Scatter(
            x=[v / scale for v in x], y=[v / scale for v in y], mode="lines", name=name,
            line={"width": 3, "color": "#1d3557"} if name == "total"
            else {"color": COLOURS.get(name)}))  # fmt: skip
    note = "Seconds as the ledger attributed them." if data.ledger is not None else (
        "Estimated from trial costs: this storage has no budget ledger.")
    if data.budget_s is not None:
        fig.add_hline(y=data.budget_s / scale, line_dash="dash", line_color=COLOURS["oom"],
                      annotation_text=f"budget {data.budget_s / scale:.3g} {unit}")
        reserve = data.ledger.final_reserve_s if data.ledger is not None else None
        if reserve:
            fig.add_hline(y=(data.budget_s - reserve) / scale, line_dash="dot",
                          line_color="#6c757d", annotation_text="search share")
    else:
        note += " The study gives no budget, so there is no budget line."
    fig.update_layout(title=title, xaxis_title=f"GPU time ({unit})",
                      yaxis_title=f"spent ({unit})", height=400)
    return Figure("spend", title, fig, note)


def oom_frontier(data: ReportData) -> dict[float, float]:
    """For each LoRA rank, the smallest micro-batch that ran out of memory."""
    frontier: dict[float, float] = {}
    for t in data.trials:
        mb, rank = data.setting(t, PARAM_MICRO_BATCH), data.setting(t, PARAM_RANK)
        if outcome_of(t) == "oom" and mb is not None and rank is not None:
            frontier[rank] = min(frontier.get(rank, mb), mb)
    return frontier


def _settings(data: ReportData, t: FrozenTrial) -> tuple[float | None, float | None]:
    return data.setting(t, PARAM_MICRO_BATCH), data.setting(t, PARAM_RANK)


def hardware_figure(data: ReportData) -> Figure:
    """Throughput and peak memory against micro-batch and rank, with the OOM frontier."""
    title = "Throughput and peak memory vs micro-batch and LoRA rank"
    ran = [(t, *_settings(data, t)) for t in data.trials]
    ran = [r for r in ran if r[1] is not None and r[2] is not None]
    panels = {1: "tokens_per_s", 2: "peak_memory_bytes"}
    measured = [r for r in ran if any(as_float(r[0].user_attrs.get(a)) is not None
                                      for a in panels.values())]
    frontier = oom_frontier(data)
    if not measured and not frontier:
        return _empty("hardware", title, f"no trial recorded {PARAM_MICRO_BATCH} and "
                      f"{PARAM_RANK} with tokens_per_s or peak_memory_bytes")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "tokens/s", "peak memory (GiB)", "what fits (× = out of memory)"))
    palette = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#457b9d", "#6d597a"]
    for i, rank in enumerate(sorted({r[2] for r in measured})):
        for col, attr in panels.items():
            pts = [(t, mb, as_float(t.user_attrs.get(attr))) for t, mb, rk in measured
                   if rk == rank and as_float(t.user_attrs.get(attr)) is not None
                   and not (attr == "tokens_per_s" and outcome_of(t) == "oom")]
            if not pts:
                continue
            scale = 1.0 if col == 1 else 2.0**-30
            fig.add_trace(go.Scatter(
                x=[p[1] for p in pts], y=[p[2] * scale for p in pts], mode="markers",
                name=f"rank {rank:g}", legendgroup=f"rank {rank:g}", showlegend=col == 1,
                marker={"color": palette[i % len(palette)], "size": 9, "symbol": [
                    "x" if outcome_of(p[0]) == "oom" else "circle" for p in pts]},
                text=[f"trial {p[0].number} ({outcome_of(p[0])})" for p in pts],
                hovertemplate="%{text}<br>micro-batch %{x}<br>%{y:.3g}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
    for kind, symbol, colour in (("fits", "circle", COLOURS["complete"]),
                                 ("skipped", "diamond-open", COLOURS["oom"]),
                                 ("oom", "x", COLOURS["oom"])):  # fmt: skip
        pts = [r for r in ran if (outcome_of(r[0]) if outcome_of(r[0]) in ("oom", "skipped")
                                  else "fits") == kind]
        if pts:
            fig.add_trace(go.Scatter(
                x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers",
                name={"fits": "fits", "oom": "out of memory",
                      "skipped": "skipped (beyond the frontier)"}[kind],
                showlegend=kind != "fits", marker={"symbol": symbol, "size": 10, "color": colour},
                text=[f"trial {p[0].number}" for p in pts],
                hovertemplate="%{text}<br>micro-batch %{x}, rank %{y}<extra></extra>",
            ), row=1, col=3)  # fmt: skip
    if frontier:
        ranks = sorted(frontier)
        fig.add_trace(go.Scatter(
            x=[frontier[r] for r in ranks], y=ranks, mode="lines+markers", name="OOM frontier",
            line={"dash": "dash", "color": COLOURS["oom"]},
            hovertemplate="rank %{y}: OOM from micro-batch %{x}<extra></extra>"), row=1, col=3)
    # Micro-batches and ranks are powers of two: log axes ticked at the values tried.
    batches = sorted({r[1] for r in ran})
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="micro-batch", type="log", tickvals=batches, row=1, col=col)
    fig.update_yaxes(title_text="LoRA rank", type="log", tickvals=sorted({r[2] for r in ran}),
                     row=1, col=3)
    fig.update_layout(title=title, height=420)
    note = ("The dashed line is the OOM frontier: for each rank, the smallest micro-batch that "
            "ran out of memory." if frontier else "No trial ran out of memory.")
    return Figure("hardware", title, fig, note)


def _mix_shares(t: FrozenTrial) -> dict[str, float]:
    """A trial's normalized mixture: the driver's `weight.<source>`, else its mix params."""
    shares = {k[len("weight."):]: as_float(v) for k, v in t.user_attrs.items()
              if k.startswith("weight.") and as_float(v) is not None}
    if shares:
        return shares  # type: ignore[return-value]
    raw = {k[len(MIX_PREFIX):]: as_float(v) or 0.0 for k, v in t.params.items()
           if k.startswith(MIX_PREFIX)}  # fmt: skip
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()} if total > 0 else {}


def mix_figure(data: ReportData) -> Figure:
    """Each source's share of the mixture against the objective, one marker per trial."""
    title = "Dataset-mix weights vs objective"
    sources = data.mix_sources()
    if not sources:
        return _empty("mix", title, f"the study does not search the mixture ({MIX_PREFIX}*)")
    if not data.completed:
        return _empty("mix", title, "no completed trial yet")
    fig = make_subplots(rows=1, cols=len(sources), shared_yaxes=True, subplot_titles=sources,
                        horizontal_spacing=0.04)
    for col, source in enumerate(sources, start=1):
        pts = [(_mix_shares(t).get(source), t) for t in data.completed]
        pts = [(share, t) for share, t in pts if share is not None]
        fig.add_trace(go.Scatter(
            x=[s for s, _ in pts], y=[t.value for _, t in pts], mode="markers", name=source,
            text=[f"trial {t.number}" for _, t in pts],
            marker={"size": 8, "color": COLOURS["complete"]},
            hovertemplate="%{text}<br>share %{x:.2f}<br>%{y:.4f}<extra></extra>"),
            row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="share", range=[0, 1], row=1, col=col)
    fig.update_yaxes(title_text=data.objective_name(), row=1, col=1)
    fig.update_layout(title=title, showlegend=False, height=380)
    return Figure("mix", title, fig, "Share: the source's weight over the sum of the trial's "
                  "weights (the mixture is normalized).")


def guard_rows(data: ReportData, n_best: int = 10) -> list[dict[str, Any]]:
    """The search-vs-holdout comparison (`ReportData.guard_comparison`) of the best `n_best`
    trials with a holdout run, in the order they ran, then the final model."""
    top = {f"trial {t.number}" for t in data.top_trials(n_best)}
    return [r for r in data.guard_comparison() if r["final"] or r["label"] in top]


def holdout_figure(data: ReportData) -> Figure:
    """Search-task vs holdout-task scores: does the search overfit its own tasks?"""
    title = "Search vs holdout scores of the best trials"
    rows = guard_rows(data)
    if not rows:
        return _empty("holdout", title, "no trial ran holdout tasks (the study's [eval] has "
                      "no holdout section, or no trial ranked high enough yet)")
    fig = go.Figure()
    for key, name, colour in (("search", "search tasks", "#457b9d"),
                              ("holdout", "holdout tasks", "#e76f51")):  # fmt: skip
        errors = [r[f"{key}_stderr"] for r in rows]
        error_y = ({"type": "data", "array": [2 * (e or 0.0) for e in errors], "visible": True}
                   if any(e is not None for e in errors) else None)  # fmt: skip
        fig.add_trace(go.Bar(x=[r["label"] for r in rows], y=[r[f"{key}_score"] for r in rows],
                             name=name, marker_color=colour, error_y=error_y))
    fig.update_layout(title=title, barmode="group", yaxis_title="normalized score", height=380)
    return Figure("holdout", title, fig, "The search picks trials by the search tasks; a holdout "
                  "score that lags further behind in later trials means the search is fitting "
                  "its own tasks. Error bars: 2 standard errors (the guard ignores differences "
                  "within them).")


# --- final run ----------------------------------------------------------------------------


def _curve_points(curve: Any) -> dict[str, list[tuple[float, float]]]:
    """Series by metric from a stored curve: `[[step, val_loss], ...]` or event dicts."""
    series: dict[str, list[tuple[float, float]]] = {}
    for point in curve if isinstance(curve, list) else []:
        if isinstance(point, list | tuple) and len(point) == 2:
            point = {"step": point[0], "val_loss": point[1]}
        if not isinstance(point, dict) or as_float(point.get("step")) is None:
            continue
        metrics = {**(point.get("metrics") or {}), **point}
        for metric in ("val_loss", "train_loss"):
            if as_float(metrics.get(metric)) is not None:
                series.setdefault(metric, []).append((float(point["step"]),
                                                      float(metrics[metric])))
    return series


def final_curve_figure(data: ReportData) -> Figure:
    title = "Final run: learning curve"
    series = _curve_points(data.final.get("curve"))
    if not series:
        why = "the final run has not run yet" if not data.final else "the final run saved no curve"
        return _empty("final", title, why)
    fig = go.Figure()
    for metric, points in series.items():
        points.sort()
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                 mode="lines+markers", name=metric.replace("_", " ")))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss", height=380)
    return Figure("final", title, fig)
