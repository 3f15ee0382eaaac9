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
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import plotly.graph_objects as go
from budgetune.search.report_data import (
    MIX_PREFIX,
    OUTCOMES,
    PARAM_MICRO_BATCH,
    PARAM_RANK,
    ReportData,
    outcome_of,
)
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

MIN_TRIALS_FOR_IMPORTANCE = 10
"""Below this many completed trials, importances are mostly noise; the page says so."""

IMPORTANCE_SEED = 0
"""fANOVA's forest is random: a fixed seed makes the same study give the same report."""

COLOURS = {
    "complete": "#2a9d8f",
    "pruned": "#8d99ae",
    "oom": "#e63946",
    "diverged": "#f4a261",
    "failed": "#6d597a",
    "running": "#457b9d",
    "waiting": "#adb5bd",
    "eval": "#e9c46a",
    "setup": "#b5838d",
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
        for axis in ("x", "y", "values", "dimensions", "z"):
            values = getattr(trace, axis, None)
            if values is not None and len(values) > 0:
                return True
    return False


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[{"text": f"no data: {why}", "showarrow": False, "font": {"size": 16},
                      "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
        height=260,
    )
    return fig


def _quiet(build: Callable[[], Any]) -> Any:
    """Run an optuna plot/evaluator without its warnings and log lines (they go to the note)."""
    logger = optuna.logging.get_logger("optuna")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    finally:
        logger.setLevel(level)


def objective_name(data: ReportData) -> str:
    """What the study optimizes, as the driver named it (for axis titles)."""
    for key in ("objective", "objective_name", "metric"):
        name = data.study_attrs.get(key)
        if isinstance(name, str) and name:
            return name
    return "objective"


def _time_unit(max_s: float) -> tuple[float, str]:
    if max_s >= 3 * 3600:
        return 3600.0, "h"
    if max_s >= 180:
        return 60.0, "min"
    return 1.0, "s"


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


# --- search -------------------------------------------------------------------------------


def compute_importances(data: ReportData) -> dict[str, dict[str, float]]:
    """PED-ANOVA and fANOVA importances (empty dicts when they cannot be computed)."""
    out: dict[str, dict[str, float]] = {}
    evaluators = {
        "PED-ANOVA": PedAnovaImportanceEvaluator(),
        "fANOVA": FanovaImportanceEvaluator(seed=IMPORTANCE_SEED),
    }
    for name, evaluator in evaluators.items():
        if len(data.completed) < 2:
            out[name] = {}
            continue
        try:
            out[name] = _quiet(lambda e=evaluator: optuna.importance.get_param_importances(
                data.study, evaluator=e))
        except (ValueError, RuntimeError, ZeroDivisionError):
            out[name] = {}
    return out


def importance_figure(data: ReportData, importances: dict[str, dict[str, float]]) -> Figure:
    n = len(data.completed)
    note = (f"Computed from {n} completed trials; fANOVA uses seed {IMPORTANCE_SEED}. "
            "PED-ANOVA asks which parameters set the best trials apart; fANOVA asks which "
            "explain the objective's variance overall.")
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        note = (f"Only {n} completed trials (fewer than {MIN_TRIALS_FOR_IMPORTANCE}): these "
                "importances mean little yet. " + note)
    if not any(importances.values()):
        return Figure("importance", "Parameter importances",
                      _empty("Parameter importances", "fewer than 2 completed trials"), note)
    names = list(importances)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.2)
    for col, name in enumerate(names, start=1):
        ranked = sorted(importances[name].items(), key=lambda kv: kv[1])
        fig.add_trace(go.Bar(x=[v for _, v in ranked], y=[k for k, _ in ranked], orientation="h",
                             name=name, marker_color="#457b9d" if col == 1 else "#2a9d8f",
                             hovertemplate="%{y}: %{x:.3f}<extra>" + name + "</extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="importance (normalized)", row=1, col=col)
    fig.update_layout(title="Parameter importances", showlegend=False, height=380)
    return Figure("importance", "Parameter importances", fig, note)


def _optuna_plot(
    data: ReportData, key: str, title: str, build: Callable[[], go.Figure], note: str = ""
) -> Figure:
    if not data.completed:
        return Figure(key, title, _empty(title, "no completed trial yet"), note)
    try:
        fig = _quiet(build)
    except (ValueError, RuntimeError) as e:
        return Figure(key, title, _empty(title, str(e)), note)
    # Optuna fixes some widths (300 px per slice); the page is responsive instead.
    fig.update_layout(title=title, width=None, autosize=True)
    if not has_points(fig):
        return Figure(key, title, _empty(title, "not enough completed trials"), note)
    return Figure(key, title, fig, note)


def history_figure(data: ReportData) -> Figure:
    name = objective_name(data)
    return _optuna_plot(
        data, "history", "Optimization history",
        lambda: optuna.visualization.plot_optimization_history(data.study, target_name=name),
        f"Completed trials only; the line is the best {name} so far ({data.direction}).")


def parallel_figure(data: ReportData) -> Figure:
    name = objective_name(data)
    return _optuna_plot(
        data, "parallel", "Parallel coordinates",
        lambda: optuna.visualization.plot_parallel_coordinate(data.study, target_name=name))


def slice_figure(data: ReportData) -> Figure:
    name = objective_name(data)
    return _optuna_plot(
        data, "slice", "Slices",
        lambda: optuna.visualization.plot_slice(data.study, target_name=name))


def contour_figure(data: ReportData, importances: dict[str, dict[str, float]]) -> Figure:
    title = "Contour of the two most important parameters"
    ranking = importances.get("fANOVA") or importances.get("PED-ANOVA") or {}
    top = [p for p, _ in sorted(ranking.items(), key=lambda kv: -kv[1])][:2]
    if len(top) < 2:
        return Figure("contour", title, _empty(title, "needs importances over two parameters"))
    name = objective_name(data)
    return _optuna_plot(
        data, "contour", f"Contour: {top[0]} vs {top[1]}",
        lambda: optuna.visualization.plot_contour(data.study, params=top, target_name=name),
        "Parameters ranked by fANOVA importance.")


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
            x=steps, y=[curve[s] for s in steps], mode="lines+markers",
            line={"color": COLOURS.get(outcome, "#333"), "width": 1.5},
            marker={"size": 4}, opacity=0.8, name=outcome, legendgroup=outcome,
            showlegend=outcome not in shown,
            hovertemplate=f"trial {t.number} ({outcome})<br>step %{{x}}<br>%{{y:.4f}}"
            "<extra></extra>",
        ))
        shown.add(outcome)
    if not fig.data:
        return Figure("curves", title, _empty(title, "no trial has reported yet"))
    # Log scale: a diverged curve shoots up by orders of magnitude and would flatten the rest.
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="validation loss",
                      yaxis_type="log", legend_title="outcome", height=420)
    return Figure("curves", title, fig, "Pruned trials stop early; OOM and diverged trials end "
                  "where the failure hit.")


# --- budget -------------------------------------------------------------------------------


def _span_label(row: Any) -> str:
    if row.category in ("trial", "train") and isinstance(row.outcome, str) and row.outcome:
        return row.outcome
    return str(row.category)


def timeline_figure(data: ReportData) -> Figure:
    """A Gantt of who held which GPU when: trials by outcome, evals, the final run, overhead."""
    title = "Timeline of GPU time"
    spans = data.ledger
    if spans.empty:
        return Figure("timeline", title, _empty(title, "no trial has started yet"))
    scale, unit = _time_unit(float(spans["end_s"].max()))
    fig = go.Figure()
    spans = spans.assign(label=[_span_label(r) for r in spans.itertuples()])
    order = [o for o in (*OUTCOMES, "eval", "setup", "final", "overhead") if o in set(spans.label)]
    order += sorted(set(spans.label) - set(order))
    for label in order:
        part = spans[spans.label == label]
        text = [f"trial {int(t)}" if _num(t) is not None else c
                for t, c in zip(part.trial, part.category, strict=True)]
        fig.add_trace(go.Bar(
            y=part.worker, base=part.start_s / scale, x=(part.end_s - part.start_s) / scale,
            orientation="h", name=label, marker_color=COLOURS.get(label, "#999"),
            customdata=list(zip(text, part.seconds, strict=True)),
            hovertemplate="%{customdata[0]}<br>%{customdata[1]:.0f} GPU-s<extra>" + label
            + "</extra>",
        ))
    fig.update_layout(title=title, barmode="overlay", xaxis_title=f"time since start ({unit})",
                      yaxis_title="worker", height=260 + 40 * spans.worker.nunique(),
                      legend_title="what ran")
    src = ("budget ledger" if data.ledger_source == "ledger"
           else "trial start/end times (no ledger in this storage)")
    return Figure("timeline", title, fig, f"From the {src}.")


def spend_figure(data: ReportData) -> Figure:
    """Cumulative GPU-seconds spent, by category and in total, against the budget."""
    title = "Cumulative spend against the budget"
    spans = data.ledger.sort_values("end_s")
    if spans.empty:
        return Figure("spend", title, _empty(title, "nothing spent yet"))
    top = max(float(spans.seconds.sum()), data.budget_s or 0.0)
    scale, unit = _time_unit(max(float(spans.end_s.max()), top))
    fig = go.Figure()
    x = [0.0, *(spans.end_s / scale)]
    fig.add_trace(go.Scatter(x=x, y=[0.0, *(spans.seconds.cumsum() / scale)], mode="lines",
                             line={"shape": "hv", "width": 3, "color": "#1d3557"}, name="total"))
    for category in sorted(set(spans.category)):
        part = spans[spans.category == category]
        fig.add_trace(go.Scatter(
            x=[0.0, *(part.end_s / scale)], y=[0.0, *(part.seconds.cumsum() / scale)],
            mode="lines", line={"shape": "hv", "color": COLOURS.get(category)}, name=category))
    note = "GPU time attributed by the ledger." if data.ledger_source == "ledger" else (
        "Estimated from trial costs (no ledger in this storage).")
    if data.budget_s is not None:
        fig.add_hline(y=data.budget_s / scale, line_dash="dash", line_color="#e63946",
                      annotation_text=f"budget {data.budget_s / scale:.3g} {unit}")
    else:
        note += " The study snapshot gives no budget, so no budget line."
    fig.update_layout(title=title, xaxis_title=f"time since start ({unit})",
                      yaxis_title=f"GPU time spent ({unit})", height=400)
    return Figure("spend", title, fig, note)


def trial_setting(t: FrozenTrial, name: str) -> float | None:
    """A numeric setting of a trial: searched (a param) or fixed (recorded as a user attr)."""
    return _num(t.params.get(name, t.user_attrs.get(name)))


def _attr_points(data: ReportData, attr: str) -> list[tuple[FrozenTrial, float, float, float]]:
    """(trial, micro_batch, rank, attr value) for trials that recorded all three."""
    out = []
    for t in data.trials:
        mb, rank = trial_setting(t, PARAM_MICRO_BATCH), trial_setting(t, PARAM_RANK)
        value = _num(t.user_attrs.get(attr))
        if mb is not None and rank is not None and value is not None:
            out.append((t, mb, rank, value))
    return out


def oom_frontier(data: ReportData) -> dict[float, float]:
    """For each LoRA rank, the smallest micro-batch that ran out of memory."""
    frontier: dict[float, float] = {}
    for t in data.trials:
        mb, rank = trial_setting(t, PARAM_MICRO_BATCH), trial_setting(t, PARAM_RANK)
        if outcome_of(t) == "oom" and mb is not None and rank is not None:
            frontier[rank] = min(frontier.get(rank, mb), mb)
    return frontier


def hardware_figure(data: ReportData) -> Figure:
    """Throughput and peak memory against micro-batch and rank, with the OOM frontier."""
    title = "Throughput and peak memory vs micro-batch and LoRA rank"
    speed = [p for p in _attr_points(data, "tokens_per_s") if outcome_of(p[0]) != "oom"]
    memory = _attr_points(data, "peak_memory_bytes")
    frontier = oom_frontier(data)
    if not speed and not memory and not frontier:
        return Figure("hardware", title, _empty(
            title, f"no trial recorded {PARAM_MICRO_BATCH}/{PARAM_RANK} with tokens_per_s or "
            "peak_memory_bytes"))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "tokens/s", "peak memory (GiB)", "what fits (× = OOM)"))
    ranks = sorted({p[2] for p in speed + memory} | set(frontier))
    palette = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#457b9d", "#6d597a"]
    for i, rank in enumerate(ranks):
        colour = palette[i % len(palette)]
        for col, points in ((1, speed), (2, memory)):
            pts = [p for p in points if p[2] == rank]
            if not pts:
                continue
            scale = 1.0 if col == 1 else 2**-30
            fig.add_trace(go.Scatter(
                x=[p[1] for p in pts], y=[p[3] * scale for p in pts], mode="markers",
                name=f"rank {rank:g}", legendgroup=f"rank {rank:g}", showlegend=col == 1,
                marker={"color": colour, "size": 9,
                        "symbol": ["x" if outcome_of(p[0]) == "oom" else "circle" for p in pts]},
                text=[f"trial {p[0].number} ({outcome_of(p[0])})" for p in pts],
                hovertemplate="%{text}<br>micro-batch %{x}<br>%{y:.3g}<extra></extra>",
            ), row=1, col=col)
    tried = [(t, trial_setting(t, PARAM_MICRO_BATCH), trial_setting(t, PARAM_RANK))
             for t in data.trials]
    tried = [x for x in tried if x[1] is not None and x[2] is not None]
    for oom in (False, True):
        pts = [x for x in tried if (outcome_of(x[0]) == "oom") == oom]
        if pts:
            fig.add_trace(go.Scatter(
                x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers",
                name="out of memory" if oom else "fits", showlegend=oom,
                marker={"symbol": "x" if oom else "circle", "size": 10 if oom else 7,
                        "color": COLOURS["oom"] if oom else COLOURS["complete"]},
                text=[f"trial {p[0].number}" for p in pts],
                hovertemplate="%{text}<br>micro-batch %{x}, rank %{y}<extra></extra>",
            ), row=1, col=3)
    if frontier:
        ranks_f = sorted(frontier)
        fig.add_trace(go.Scatter(
            x=[frontier[r] for r in ranks_f], y=ranks_f, mode="lines+markers",
            line={"dash": "dash", "color": COLOURS["oom"]}, name="OOM frontier",
            hovertemplate="rank %{y}: OOM from micro-batch %{x}<extra></extra>"), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="micro-batch", type="log", row=1, col=col)
    fig.update_yaxes(title_text="LoRA rank", type="log", row=1, col=3)
    fig.update_layout(title=title, height=420, legend_title="LoRA rank")
    note = ("The dashed line is the OOM frontier: for each rank, the smallest micro-batch that "
            "ran out of memory." if frontier else "No trial ran out of memory.")
    return Figure("hardware", title, fig, note)


def mix_figure(data: ReportData) -> Figure:
    """Each source's share of the mixture against the objective, one marker per trial."""
    title = "Dataset-mix weights vs objective"
    name = objective_name(data)
    sources = data.mix_sources()
    if not sources:
        return Figure("mix", title, _empty(title, f"no {MIX_PREFIX}<source> parameter"))
    if not data.completed:
        return Figure("mix", title, _empty(title, "no completed trial yet"))
    fig = make_subplots(rows=1, cols=len(sources), shared_yaxes=True, subplot_titles=sources,
                        horizontal_spacing=0.04)
    for col, source in enumerate(sources, start=1):
        xs, ys, text = [], [], []
        for t in data.completed:
            weights = {k: _num(v) or 0.0 for k, v in t.params.items() if k.startswith(MIX_PREFIX)}
            total = sum(weights.values())
            if total > 0 and f"{MIX_PREFIX}{source}" in weights:
                xs.append(weights[f"{MIX_PREFIX}{source}"] / total)
                ys.append(t.value)
                text.append(f"trial {t.number}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=source, text=text,
                                 marker={"size": 8, "color": COLOURS["complete"]},
                                 hovertemplate="%{text}<br>share %{x:.2f}<br>%{y:.4f}"
                                 "<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="share", range=[0, 1], row=1, col=col)
    fig.update_yaxes(title_text=name, row=1, col=1)
    fig.update_layout(title=title, showlegend=False, height=380)
    return Figure("mix", title, fig, "Share = the source's weight over the sum of the trial's "
                  "weights (the mixture is normalized).")


def holdout_figure(data: ReportData, n_best: int = 10) -> Figure:
    """Search-task vs holdout-task scores of the best trials: does the search overfit its tasks?"""
    title = f"Search vs holdout scores of the {n_best} best trials"
    best = [t for t in data.top_trials(n_best)
            if _num(t.user_attrs.get("search_score")) is not None
            or _num(t.user_attrs.get("holdout_score")) is not None]
    if not best:
        return Figure("holdout", title, _empty(
            title, "no completed trial recorded search_score or holdout_score"))
    fig = go.Figure()
    labels = [f"#{t.number}" for t in best]
    for attr, colour in (("search_score", "#457b9d"), ("holdout_score", "#e76f51")):
        fig.add_trace(go.Bar(x=labels, y=[_num(t.user_attrs.get(attr)) for t in best],
                             name=attr.replace("_", " "), marker_color=colour))
    fig.update_layout(title=title, barmode="group", xaxis_title="trial (best first)",
                      yaxis_title="score", height=380)
    return Figure("holdout", title, fig, "The search picks trials on the search tasks; a holdout "
                  "score far below the search score means the search overfits its tasks.")


# --- final run ----------------------------------------------------------------------------


def _curve_points(curve: Any) -> dict[str, list[tuple[float, float]]]:
    """Series by metric from a recorded curve: [{step, val_loss | metrics: {...}}, ...]."""
    series: dict[str, list[tuple[float, float]]] = {}
    if isinstance(curve, dict):  # {step: value}
        curve = [{"step": k, "val_loss": v} for k, v in curve.items()]
    if not isinstance(curve, list):
        return series
    for point in curve:
        if not isinstance(point, dict) or _num(point.get("step")) is None:
            continue
        metrics = dict(point.get("metrics") or {})
        metrics.update({k: v for k, v in point.items() if k.endswith("_loss")})
        for metric in ("val_loss", "train_loss"):
            if _num(metrics.get(metric)) is not None:
                series.setdefault(metric, []).append((float(point["step"]), float(metrics[metric])))
    return series


def final_curve_figure(data: ReportData) -> Figure:
    title = "Final run: learning curve"
    series = _curve_points(data.final.get("curve"))
    if not series:
        why = "the final run has not run yet" if not data.final else "the final run saved no curve"
        return Figure("final", title, _empty(title, why))
    fig = go.Figure()
    for metric, points in series.items():
        points.sort()
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                 mode="lines+markers", name=metric.replace("_", " ")))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=380)
    return Figure("final", title, fig)
