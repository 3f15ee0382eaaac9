"""`budgetune report`: one self-contained HTML page, plus the trial table for pandas.

Users decide what to try next from this page and send it to their team, often from a
machine with no network: plotly.js is embedded once in the page head (no CDN, no MathJax, no
web fonts), and every figure is a plain `Plotly.newPlot` call on it. The page reads a study
that may still be running; what is not there yet says "no data" instead of failing.

Layout: summary (budget, outcomes, best trial, final run, warnings) -> search (importances,
history, learning curves, parallel coordinates, slices, contour) -> where the budget went
(timeline, cumulative spend, throughput/memory, mixture, holdout) -> final run -> trials.
Data access lives in `report_data.py`, the figures in `report_figures.py`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import plotly.io as pio
import plotly.offline

from budgetune.engine.errors import UserInputError
from budgetune.search import report_figures as figs
from budgetune.search.report_data import (
    OUTCOMES,
    ReportData,
    as_float,
    collect,
    outcome_of,
    task_scores,
)

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
"""No "edit in Chart Studio" link: the page never sends anyone to the network."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 0 24px 48px; color: #1d3557; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #ddd;
      z-index: 10; }
nav a { margin-right: 16px; color: #457b9d; text-decoration: none; }
h1 { margin-bottom: 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #e9ecef; }
.meta { color: #6c757d; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 24px; }
.cards > div { flex: 1 1 360px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #dee2e6; padding: 3px 8px; text-align: left; }
th { background: #f1f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff3cd; border-left: 4px solid #e9c46a; padding: 8px 12px; margin: 6px 0; }
.ok { color: #2a9d8f; }
.note { color: #6c757d; font-size: 13px; margin: 0 0 24px; }
.figure { margin-top: 16px; }
.scroll { overflow-x: auto; max-height: 600px; }
"""

_TRIAL_CATEGORIES = ("setup", "train", "eval")
_CATEGORY_LABELS = {
    "setup": "· trial setup",
    "train": "· trial training",
    "eval": "· trial evals",
    "trial": "trials",
    "final": "final run",
    "overhead": "overhead (between trials)",
}
_BEST_ATTRS = ("val_loss", "search_score", "search_stderr", "holdout_score", "holdout_stderr",
               "cost_s", "tokens_per_s", "peak_memory_bytes", "padding_fraction")  # fmt: skip
_FINAL_KEYS = ("status", "reason", "eval_error", "trial", "val_loss", "objective", "search_score",
               "search_stderr", "holdout_score", "holdout_stderr", "eval_limit", "steps",
               "tokens_seen", "train_s", "cost_s", "allotment_s", "tokens_per_s",
               "peak_memory_bytes", "export_dir")  # fmt: skip


def write_report(
    source: str,
    study_name: str | None = None,
    out: Path | None = None,
    csv: Path | None = None,
    parquet: Path | None = None,
) -> Path:
    """Write the HTML report (default: `<run dir>/report.html`) and optional table exports.

    Returns the page's path. Storage problems (no such run dir, several studies and no
    name) raise `UserInputError` naming what was wrong.
    """
    data = collect(source, study_name)
    if out is None:
        out = (Path(source) if Path(source).is_dir() else Path.cwd()) / "report.html"
    out = Path(out)
    for path in (out, csv, parquet):
        if path is not None and not Path(path).parent.is_dir():
            raise UserInputError(f"{path}: folder {Path(path).parent} does not exist")
    out.write_text(render(data), encoding="utf-8")
    export_table(data, csv=csv, parquet=parquet)
    return out


def report_command(
    source: str, study_name: str | None, out: Path | None, csv: Path | None, parquet: Path | None
) -> None:
    """`budgetune report`: write the page (and tables) and print where they are."""
    page = write_report(source, study_name, out, csv=csv, parquet=parquet)
    print(f"report: {page}")
    for kind, path in (("csv", csv), ("parquet", parquet)):
        if path is not None:
            print(f"{kind}: {path}")


def write_run_report(storage_url: str, study_name: str, run_dir: Path) -> Path | None:
    """The page `launch` and `resume` leave in the run directory when they end; prints it.

    The report is a by-product of a run: if it cannot be written, one line says why and
    the study's own result (already in storage) stands, so this never raises.
    """
    try:
        page = write_report(storage_url, study_name, out=Path(run_dir) / "report.html")
    except Exception as e:  # a figure bug must not turn a finished study into a traceback
        print(f"budgetune: report not written ({type(e).__name__}: {e}); "
              f"try `budgetune report {run_dir}`")  # fmt: skip
        return None
    print(f"report: {page}")
    return page


def export_table(data: ReportData, csv: Path | None = None, parquet: Path | None = None) -> None:
    """Write the trial table; CSV and Parquet get exactly the same columns."""
    if csv is not None:
        data.table.to_csv(csv, index=False)
    if parquet is not None:
        data.table.to_parquet(parquet, index=False)


def build_figures(data: ReportData) -> dict[str, list[figs.Figure]]:
    """Every figure of the page, by section, in page order."""
    importances = figs.compute_importances(data)
    return {
        "search": [
            figs.importance_figure(data, importances),
            figs.history_figure(data),
            figs.learning_curves_figure(data),
            figs.horizon_figure(data),
            figs.parallel_figure(data),
            figs.slice_figure(data),
            figs.contour_figure(data, importances),
        ],
        "budget": [
            figs.timeline_figure(data),
            figs.spend_figure(data),
            figs.hardware_figure(data),
            figs.mix_figure(data),
            figs.holdout_figure(data),
        ],
        "final": [figs.final_curve_figure(data)],
    }


def render(data: ReportData) -> str:
    """The whole page as one string."""
    sections = build_figures(data)
    title = f"budgetune report: {data.study.study_name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(data.source)} · {html.escape(data.phase)} · '
        f"{data.direction} {html.escape(data.objective_name())} · generated "
        f"{data.generated_at:%Y-%m-%d %H:%M:%S} UTC</p>",
        '<nav><a href="#summary">Summary</a><a href="#search">Search</a>'
        '<a href="#budget">Budget</a><a href="#final">Final run</a>'
        '<a href="#trials">Trials</a></nav>',
        '<section id="summary"><h2>Summary</h2>', _summary(data), "</section>",
        '<section id="search"><h2>Search</h2>', *_figures(sections["search"]), "</section>",
        '<section id="budget"><h2>Where the budget went</h2>', *_figures(sections["budget"]),
        "</section>",
        '<section id="final"><h2>Final run</h2>', *_figures(sections["final"]),
        _final_tasks(data), _guard(data), "</section>",
        '<section id="trials"><h2>Trials</h2>', _trials(data), "</section>",
    ]  # fmt: skip
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        # plotly.js once, inline: the page must open with no network.
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
        "</head><body>",
        *body,
        "</body></html>",
    ])  # fmt: skip


def _figures(figures: Iterable[figs.Figure]) -> list[str]:
    out = []
    for f in figures:
        div = pio.to_html(f.fig, full_html=False, include_plotlyjs=False, include_mathjax=False,
                          div_id=f"fig-{f.key}", config=_PLOT_CONFIG)
        note = f'<p class="note">{html.escape(f.note)}</p>' if f.note else ""
        out.append(f'<div class="figure" data-key="{f.key}" data-has-data="'
                   f'{str(f.has_data).lower()}">{div}{note}</div>')
    return out


# --- tables -------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


# --- summary ------------------------------------------------------------------------------


def spent_by_category(data: ReportData) -> dict[str, float]:
    """GPU-seconds spent per ledger category (setup, train, eval, final, overhead)."""
    if data.spans.empty:
        return {}
    sums = data.spans.groupby("category")["seconds"].sum()
    return {str(k): float(v) for k, v in sums.items()}


def outcome_counts(data: ReportData) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in data.trials:
        counts[outcome_of(t)] = counts.get(outcome_of(t), 0) + 1
    order = [o for o in OUTCOMES if o in counts] + sorted(set(counts) - set(OUTCOMES))
    return {o: counts[o] for o in order}


def report_warnings(data: ReportData) -> list[str]:
    """What the reader should know before trusting the page."""
    out: list[str] = []
    n_done = len(data.completed)
    if n_done < figs.MIN_TRIALS_FOR_IMPORTANCE:
        out.append(f"Only {n_done} completed trials: parameter importances are unreliable below "
                   f"{figs.MIN_TRIALS_FOR_IMPORTANCE}.")  # fmt: skip
    frontier = figs.oom_frontier(data)
    if frontier:
        n_oom = sum(outcome_of(t) == "oom" for t in data.trials)
        n_skip = sum(outcome_of(t) == "skipped" for t in data.trials)
        where = ", ".join(f"rank {r:g}: micro-batch ≥ {mb:g}" for r, mb in sorted(frontier.items()))
        out.append(f"OOM frontier hit: {n_oom} trials ran out of memory ({where}) and {n_skip} "
                   "more were skipped beyond it. The search space reaches past what fits on "
                   "this GPU: narrow micro_batch or lora_rank.")  # fmt: skip
    n_div = sum(outcome_of(t) == "diverged" for t in data.trials)
    if n_div:
        out.append(f"{n_div} trials diverged: the learning-rate range may reach too high.")
    n_failed = sum(outcome_of(t) == "failed" for t in data.trials)
    if n_failed:
        out.append(f"{n_failed} trials failed for other reasons: see their reason in the table.")
    out.extend(overfitting_warnings(data))
    spent = sum(spent_by_category(data).values())
    if data.budget_s is not None and spent > data.budget_s * 1.001:
        out.append(f"Spent {_duration(spent)} of a {_duration(data.budget_s)} budget.")
    return out


def overfitting_warnings(data: ReportData) -> list[str]:
    """The evaluation module's guard over every trial that ran holdout tasks, then the final;
    with the stored standard errors, so differences within the evals' noise are not flagged."""
    from budgetune.search.evaluation import overfitting_warnings as guard

    rows = data.guard_rows()
    if not rows:
        return []
    return [f"Overfitting guard: {w}" for w in guard(rows, gap_tolerance=data.gap_tolerance())]


def _summary(data: ReportData) -> str:
    spent = spent_by_category(data)
    total = sum(spent.values())
    budget = data.budget_s

    def share(seconds: float) -> str:
        return f"{seconds / budget:.1%}" if budget else ""

    rows: list[list[Any]] = [["budget", _duration(budget), share(budget or 0.0)]]
    if data.ledger is not None and data.ledger.final_reserve_s is not None:
        reserve = data.ledger.final_reserve_s
        rows.append(["of which reserved for the final run", _duration(reserve), share(reserve)])
    trial_total = sum(spent.get(c, 0.0) for c in _TRIAL_CATEGORIES)
    if trial_total:
        rows.append(["trials (setup + training + evals)", _duration(trial_total),
                     share(trial_total)])
    order = [c for c in (*_TRIAL_CATEGORIES, "trial", "final", "overhead") if c in spent]
    for category in order + sorted(set(spent) - set(order)):
        rows.append([_CATEGORY_LABELS.get(category, category), _duration(spent[category]),
                     share(spent[category])])
    rows.append(["spent", _duration(total), share(total)])
    if budget:
        rows.append(["left", _duration(max(budget - total, 0.0)), share(max(budget - total, 0))])
    counts = [*outcome_counts(data).items(), ("total", len(data.trials))]
    parts = [
        f"<div><h3>Budget</h3>{_table(['', 'GPU time', 'of budget'], rows)}</div>",
        f"<div><h3>Trials</h3>{_table(['outcome', 'trials'], counts)}</div>",
        f"<div><h3>Best trial</h3>{_best(data)}</div>",
        f"<div><h3>Final run</h3>{_final(data)}</div>",
    ]
    warnings = report_warnings(data)
    warn_html = ("".join(f'<div class="warn">{html.escape(w)}</div>' for w in warnings)
                 if warnings else '<p class="ok">No warnings.</p>')  # fmt: skip
    return f'<div class="cards">{"".join(parts)}</div><h3>Warnings</h3>{warn_html}'


def _best(data: ReportData) -> str:
    best = data.best_trial()
    if best is None:
        return "<p>No completed trial yet.</p>"
    attrs = [(a, best.user_attrs[a]) for a in _BEST_ATTRS if a in best.user_attrs]
    attrs += sorted((k, v) for k, v in best.user_attrs.items() if k.startswith("weight."))
    return (f"<p>Trial {best.number}: {html.escape(data.objective_name())} = "
            f"{best.value:.5g}</p>" + _table(["parameter", "value"], sorted(best.params.items()))
            + _table(["measured", "value"], attrs))  # fmt: skip


def _final(data: ReportData) -> str:
    if not data.final:
        return "<p>The final run has not run yet.</p>"
    rows = [(k, data.final[k]) for k in _FINAL_KEYS if k in data.final]
    params = data.final.get("params")
    if isinstance(params, dict):
        rows += sorted((f"params.{k}", v if not isinstance(v, dict) else ", ".join(
            f"{s}={as_float(w) or 0:.2f}" for s, w in v.items())) for k, v in params.items())
    return _table(["final run", "value"], rows)


def _final_tasks(data: ReportData) -> str:
    scores = task_scores(data.final.get("tasks"))
    holdout = data.final.get("holdout")
    held = task_scores(data.final.get("holdout_tasks"))
    if isinstance(holdout, dict):
        held.update(task_scores(holdout.get("tasks")))
    scores.update({f"holdout: {k}": v for k, v in held.items()})
    if not scores:
        why = "no final run yet" if not data.final else "the study's [eval] has no final tasks"
        return f"<h3>Per-task evaluation</h3><p>No per-task scores ({why}).</p>"
    rows = [(*key.rsplit(".", 1), value) for key, value in sorted(scores.items())]
    return "<h3>Per-task evaluation</h3>" + _table(["task", "metric", "value"], rows)


def _guard(data: ReportData) -> str:
    rows = data.guard_comparison()
    if not rows:
        return ""
    table = [(r["label"], r["objective"], r["search_score"], r["search_stderr"],
              r["holdout_score"], r["holdout_stderr"], r["gap"], r["holdout_rank"])
             for r in rows]  # fmt: skip
    header = ["model", "objective", "search score", "± stderr", "holdout score", "± stderr",
              "gap", "holdout rank"]  # fmt: skip
    return ("<h3>Search vs holdout (overfitting guard)</h3>" + _table(header, table)
            + '<p class="note">Scores are chance-normalized weighted means (0: guessing, '
            "1: perfect). The guard flags a difference only beyond 2 standard errors.</p>")


def _trials(data: ReportData) -> str:
    table = data.table
    if table.empty:
        return "<p>No trials yet.</p>"
    shown = table.drop(columns=["datetime_start", "datetime_complete"])
    header = [c.removeprefix("params_").removeprefix("user_attrs_") for c in shown.columns]
    rows = ([None if _missing(v) else v for v in row] for row in shown.itertuples(index=False))
    return ('<p class="note">The same table, with start and end times, is exported by '
            "<code>--csv</code> and <code>--parquet</code>.</p>"
            f'<div class="scroll">{_table(header, rows)}</div>')  # fmt: skip


def _missing(value: Any) -> bool:
    try:
        return bool(value != value)  # NaN and NaT are the values not equal to themselves
    except (TypeError, ValueError):
        return False
