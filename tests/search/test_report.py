"""`budgetune report`: the page, its figures and the trial-table exports.

Edge cases (a running study, an empty one, several studies in one storage) are built
directly with Optuna's API, trial by trial, so each test states exactly what the storage
holds.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from pathlib import Path

import optuna
import pandas as pd
import plotly.offline
import pytest
import sqlalchemy.exc
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from budgetune.engine.errors import UserInputError
from budgetune.search import report_figures
from budgetune.search.cli import app
from budgetune.search.report import (
    build_figures,
    render,
    report_warnings,
    write_report,
    write_run_report,
)
from budgetune.search.report_data import collect, ledger_spans, task_scores

optuna.logging.set_verbosity(optuna.logging.WARNING)

_DISTS = {
    "lora_rank": CategoricalDistribution([4, 8, 16, 32]),
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "micro_batch": CategoricalDistribution([1, 2, 4, 8, 16]),
    "mix.dolly": FloatDistribution(0.0, 1.0),
    "mix.alpaca": FloatDistribution(0.0, 1.0),
}


def _add(study: optuna.Study, i: int, outcome: str, start: dt.datetime, **params: float) -> None:
    """One finished trial as the driver records it: params, outcome attrs, a loss curve."""
    p = {"lora_rank": 8, "lr": 3e-4, "micro_batch": 4, "mix.dolly": 0.5, "mix.alpaca": 0.5}
    p.update(params)
    n_reports = {"complete": 5, "pruned": 2, "diverged": 3, "oom": 0}[outcome]
    curve = {10 * (s + 1): 2.5 * math.exp(-0.2 * s) + 0.01 * i for s in range(n_reports)}
    if outcome == "diverged":
        curve[10 * n_reports] = 80.0
    state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(
        outcome, TrialState.FAIL)
    cost = 30.0 + 20.0 * n_reports
    attrs = {"outcome": outcome, "reason": "" if outcome == "complete" else outcome,
             "cost_s": cost, "cost_train_s": 0.8 * cost, "cost_eval_s": 0.2 * cost,
             "tokens_per_s": 100.0 * p["micro_batch"],
             "peak_memory_bytes": int(p["micro_batch"] * p["lora_rank"] * 2**24),
             "worker_id": f"w{i % 2}"}
    value = None
    if outcome == "complete":
        value = curve[max(curve)]
        attrs.update({"search_score": 1 - value / 3, "holdout_score": 1 - value / 2.5,
                      "task.mmlu_mini.acc": 0.25 + 0.01 * i})
    trial = create_trial(state=state, value=value, params=p, distributions=_DISTS,
                         user_attrs=attrs, intermediate_values=curve)
    trial.datetime_start = start
    trial.datetime_complete = start + dt.timedelta(seconds=cost)
    study.add_trial(trial)


def _study(run_dir: Path, name: str = "demo", n: int = 32) -> optuna.Study:
    """A finished search of `n` trials: completes, prunes, OOMs (big micro-batch), divergences."""
    run_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{run_dir}/study.db")
    study.set_user_attr("budget_s", 4000.0)
    start = dt.datetime(2024, 5, 1, 9, 0, 0)
    for i in range(n):
        rank, mb = (4, 8, 16, 32)[i % 4], (1, 2, 4, 8, 16)[i % 5]
        lr = 10 ** (-5 + 3 * ((i * 7) % n) / n)
        outcome = ("oom" if rank * mb >= 128 else "diverged" if lr > 4e-3
                   else "pruned" if i % 3 == 0 else "complete")
        _add(study, i, outcome, start + dt.timedelta(seconds=100 * i), lora_rank=rank,
             micro_batch=mb, lr=lr, **{"mix.dolly": (i % 7) / 7, "mix.alpaca": 1 - (i % 5) / 5})
    return study


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 32-trial study shared by the tests that only read it (SQLite writes are slow)."""
    run_dir = tmp_path_factory.mktemp("finished")
    _study(run_dir)
    return run_dir


def test_report_page_embeds_plotly_once_and_draws_every_figure(finished: Path) -> None:
    page = write_report(str(finished))
    text = page.read_text()
    assert page == finished / "report.html"
    # plotly.js is inline exactly once; outside it, nothing points at the network.
    assert text.count("* plotly.js v") == 1
    ours = text.replace(plotly.offline.get_plotlyjs(), "")
    assert not re.search(r"""(src|href)=["']https?:""", ours)
    assert "MathJax" not in ours
    has_data = dict(re.findall(r'data-key="(\w+)" data-has-data="(true|false)"', text))
    # No final run in this study: its curve is the one figure with nothing to draw.
    assert {k for k, v in has_data.items() if v == "false"} == {"final"}
    assert len(has_data) == 13
    assert "OOM frontier hit" in text and "trials diverged" in text


def test_tables_have_the_same_columns_in_csv_and_parquet(finished: Path, tmp_path: Path) -> None:
    csv, parquet = tmp_path / "trials.csv", tmp_path / "trials.parquet"
    write_report(str(finished), out=tmp_path / "r.html", csv=csv, parquet=parquet)
    from_csv, from_parquet = pd.read_csv(csv), pd.read_parquet(parquet)
    assert list(from_csv.columns) == list(from_parquet.columns)
    assert len(from_csv) == len(from_parquet) == 32
    for col in ("number", "outcome", "value", "duration_s", "params_lora_rank", "params_lr",
                "params_mix.dolly", "user_attrs_cost_s", "user_attrs_tokens_per_s",
                "user_attrs_peak_memory_bytes", "user_attrs_reason",
                "user_attrs_task.mmlu_mini.acc"):
        assert col in from_parquet.columns, col
    assert set(from_parquet.outcome) == {"complete", "pruned", "oom", "diverged"}
    # Per-task scores exist only for completed trials.
    scored = from_parquet.dropna(subset=["user_attrs_task.mmlu_mini.acc"])
    assert set(scored.outcome) == {"complete"}
    assert from_csv["value"].dropna().tolist() == pytest.approx(
        from_parquet["value"].dropna().tolist())


def test_importances_are_reproducible_and_contour_uses_the_top_two(finished: Path) -> None:
    data = collect(str(finished))
    first = report_figures.compute_importances(data)
    second = report_figures.compute_importances(collect(str(finished)))
    assert set(first) == {"PED-ANOVA", "fANOVA"}
    assert first == second
    top = sorted(first["fANOVA"], key=lambda k: -first["fANOVA"][k])[:2]
    contour = report_figures.contour_figure(data, first)
    assert contour.has_data and contour.title == f"Contour: {top[0]} vs {top[1]}"


def test_hardware_figure_marks_the_oom_frontier(finished: Path) -> None:
    data = collect(str(finished))
    # rank * micro_batch >= 128 ran out of memory: rank 8 from 16, 16 from 8, 32 from 4.
    assert report_figures.oom_frontier(data) == {8.0: 16.0, 16.0: 8.0, 32.0: 4.0}
    fig = report_figures.hardware_figure(data).fig
    frontier = [t for t in fig.data if t.name == "OOM frontier"]
    assert len(frontier) == 1 and list(frontier[0].x) == [16.0, 8.0, 4.0]


def test_few_trials_say_importances_mean_little(tmp_path: Path) -> None:
    _study(tmp_path, n=6)
    data = collect(str(tmp_path))
    assert any("importances are unreliable" in w for w in report_warnings(data))
    figure = report_figures.importance_figure(data, report_figures.compute_importances(data))
    assert figure.note.startswith(f"Only {len(data.completed)} completed trials")


def test_running_study_reports_running_trials(tmp_path: Path) -> None:
    study = _study(tmp_path, n=12)
    running = study.ask()  # a worker holds a GPU for this trial right now
    running.suggest_categorical("lora_rank", [4, 8, 16, 32])
    running.report(2.0, step=10)
    data = collect(str(tmp_path))
    assert data.phase.startswith("running")
    row = data.table.set_index("number").loc[running.number]
    assert row.outcome == "running" and row.state == "RUNNING"
    # No ledger in this storage: spans come from trial times, the running one ends "now".
    spans = data.spans.set_index("trial")
    assert spans.loc[running.number, "end_s"] == spans.end_s.max()
    assert "fig-curves" in render(data)


def test_empty_study_renders_with_no_data_notes(tmp_path: Path) -> None:
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/study.db")
    data = collect(str(tmp_path))
    figures = [f for section in build_figures(data).values() for f in section]
    assert len(figures) == 13 and not any(f.has_data for f in figures)
    assert "No completed trial yet." in render(data)


def test_final_run_curve_and_task_table(tmp_path: Path) -> None:
    study = _study(tmp_path, n=10)
    # As the driver writes them: flat `final.*` study attrs, the curve as [step, val_loss].
    study.set_user_attr("final.status", "completed")
    study.set_user_attr("final.val_loss", 1.1)
    study.set_user_attr("final.curve", [[100 * i, 2.0 / i] for i in range(1, 6)])
    study.set_user_attr("final.tasks", [
        {"task": "mmlu_mini", "metric": "acc,none", "value": 0.31, "stderr": 0.02},
        {"task": "truthfulqa_mini", "metric": "exact_match,strict", "value": 0.12},
    ])
    data = collect(str(tmp_path))
    assert data.phase == "finished"
    final = report_figures.final_curve_figure(data)
    assert [list(t.y) for t in final.fig.data] == [[2.0, 1.0, 2.0 / 3, 0.5, 0.4]]
    text = render(data)
    assert "<td>truthfulqa_mini</td><td>exact_match</td><td class=\"num\">0.12</td>" in text
    assert "<td>mmlu_mini</td><td>acc</td><td class=\"num\">0.31</td>" in text


def test_bad_sources_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no such run directory"):
        collect(str(tmp_path / "missing"))
    with pytest.raises(UserInputError, match="no study.db in this run directory"):
        collect(str(tmp_path))
    _study(tmp_path, name="a", n=3)
    _study(tmp_path, name="b", n=3)
    with pytest.raises(UserInputError, match=r"pass --study \(studies found: a, b\)"):
        collect(str(tmp_path))
    with pytest.raises(UserInputError, match="--study 'c': not in"):
        collect(str(tmp_path), "c")
    assert len(collect(f"sqlite:///{tmp_path}/study.db", "b").trials) == 3


def test_cli_writes_the_report_and_prints_its_path(tmp_path: Path) -> None:
    _study(tmp_path, n=8)
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(out), "--csv",
                                      str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    assert f"report: {out}" in result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert len(pd.read_csv(tmp_path / "t.csv")) == 8


def test_task_scores_read_every_stored_shape() -> None:
    as_list = [{"task": "arc", "metric": "acc_norm,none", "value": 0.4}]
    assert task_scores(as_list) == {"arc.acc_norm": 0.4}
    assert task_scores({"arc": 0.4, "qa": {"exact_match,strict": 0.1, "n": "x"}}) == {
        "arc.score": 0.4, "qa.exact_match": 0.1}
    assert task_scores({"arc": {"task": "arc", "metric": "acc", "value": 0.3}}) == {
        "arc.acc": 0.3}
    assert task_scores(None) == {} and task_scores("text") == {}


def test_ledger_rows_tile_each_workers_gpu_time() -> None:
    # Two workers; "end" is wall time (Unix s); w1 starts 100 s after w0.
    entries = [
        {"end": 1000.0, "seconds": 5.0, "category": "overhead", "trial": None, "worker": "w0"},
        {"end": 1001.0, "seconds": 30.0, "category": "train", "trial": 0, "worker": "w0"},
        {"end": 1110.0, "seconds": 10.0, "category": "setup", "trial": 1, "worker": "w1"},
        {"end": 1002.0, "seconds": 4.0, "category": "eval", "trial": 0, "worker": "w0"},
    ]
    spans = ledger_spans(entries, [])
    # A virtual clock's seconds need not match wall time: slices follow each other per worker.
    assert spans.start_s.tolist() == [0.0, 5.0, 105.0, 35.0]
    assert spans.end_s.tolist() == [5.0, 35.0, 115.0, 39.0]
    # The timeline draws one bar per stretch of the same work of one worker.
    more = ledger_spans([*entries,
                         {"end": 1003.0, "seconds": 2.0, "category": "eval", "trial": 0,
                          "worker": "w0"},
                         *({"end": 1004.0 + i, "seconds": 1.0, "category": "final",
                            "trial": None, "worker": "w0"} for i in range(3))], [])
    merged = report_figures.merge_adjacent(more)
    assert merged[merged.worker == "w0"].seconds.tolist() == [5.0, 30.0, 6.0, 3.0]
    assert merged.seconds.sum() == more.seconds.sum()


def test_run_report_lands_in_the_run_dir_and_never_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _study(tmp_path, n=4)
    url = f"sqlite:///{tmp_path}/study.db"
    page = write_run_report(url, "demo", tmp_path)
    assert page == tmp_path / "report.html" and page.is_file()
    assert f"report: {page}" in capsys.readouterr().out
    # A missing run dir: one line, no exception (the study's result is already stored).
    assert write_run_report(url, "demo", tmp_path / "gone") is None
    assert "report not written" in capsys.readouterr().out


def test_report_from_a_postgresql_storage_url(tmp_path: Path) -> None:
    url = "postgresql://postgres@localhost:5432/test"  # SQLAlchemy's default driver: psycopg 3
    try:
        names = optuna.study.get_all_study_names(url)
    except sqlalchemy.exc.OperationalError as e:  # no server here: the rest of the suite runs
        pytest.skip(f"no PostgreSQL at localhost:5432 ({str(e.orig).splitlines()[0]})")
    name = f"report-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=url)
    try:
        for i in range(3):
            _add(study, i, "complete", dt.datetime(2024, 5, 1, 9, i), lr=1e-4 * (i + 1))
        page = write_report(url, name, out=tmp_path / "pg.html")
        assert page.read_text().count("<td>complete</td><td class=\"num\">3</td>") == 1
        if names:  # other studies share this database: then the name is required
            with pytest.raises(UserInputError, match="pass --study"):
                collect(url)
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_horizon_figure_shows_how_early_readings_ranked_the_trials(finished: Path) -> None:
    # Every completed trial's curve keeps its rank from the first report to the end.
    figure = report_figures.horizon_figure(collect(str(finished)))
    assert figure.has_data and "consider" not in figure.note
    (trace,) = figure.fig.data
    assert list(trace.x) == [10, 20, 30, 40] and list(trace.y) == pytest.approx([1.0] * 4)


def test_horizon_figure_warns_when_early_readings_rank_trials_backwards(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="crossing", storage=f"sqlite:///{tmp_path}/study.db")
    for i in range(6):
        # fast starters end worst: the ranking at step 10 is the end's, reversed
        curve = {10: 2.0 - 0.1 * i, 20: 1.5, 30: 1.0 + 0.05 * i}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=curve[30],
                                     params={"lr": 1e-4 * (i + 1)},
                                     distributions={"lr": FloatDistribution(1e-5, 1e-2)},
                                     intermediate_values=curve))  # fmt: skip
    figure = report_figures.horizon_figure(collect(str(tmp_path)))
    (trace,) = figure.fig.data
    assert list(trace.x) == [10, 20] and trace.y[0] == pytest.approx(-1.0)
    assert "At step 10 rho is -1.00" in figure.note and "pruner.min_resource" in figure.note


def test_horizon_figure_waits_for_enough_completed_trials(tmp_path: Path) -> None:
    _study(tmp_path, n=4)
    figure = report_figures.horizon_figure(collect(str(tmp_path)))
    assert not figure.has_data and "needs 5 completed trials" in figure.note
