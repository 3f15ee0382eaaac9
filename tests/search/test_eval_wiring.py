"""The eval results' way from the backend to storage, `status`, the launch summary and the report.

Search and holdout scores, their standard errors and per-task results must reach the trial
and final attributes, and the overfitting guard must speak up in `status`, the summary
`launch` prints and the report when (and only when) scores differ beyond their noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from optuna.trial import TrialState

from budgetune.engine.evaluate import TaskResult
from budgetune.engine.events import RunResult
from budgetune.search.backends import EngineBackend, FakeBackend, Score, fair_cap
from budgetune.search.evaluation import (
    EvalSettings,
    EvalTask,
    FinalScore,
    HoldoutScore,
    TrialScore,
)
from budgetune.search.launch import ledger_for, run_study
from budgetune.search.progress import NullProgress
from budgetune.search.report import report_warnings
from budgetune.search.report_data import collect as collect_report
from budgetune.search.status import collect, format_status, guard_rows
from budgetune.search.storage import create_or_load, open_storage
from budgetune.search.study import load_study_text

STUDY = """
[study]
name = "scored"
backend = "fake"
max_trials = 6
[model]
name = "./model"
[data]
max_seq_length = 128
[[data.sources]]
name = "dolly"
path = "dolly.jsonl"
schema = "dolly"
[data.validation]
path = "val.jsonl"
schema = "alpaca"
[train]
global_batch = 16
micro_batch = 4
eval_interval = 20
[search]
lr = { low = 1e-4, high = 3e-2, log = true }
[budget]
total_s = 400
trial_s = 30
trial_eval_s = 1.0
[sampler]
kind = "random"
[pruner]
kind = "none"
[fake]
step_s = 0.02
"""


def _task(name: str, value: float, stderr: float) -> dict[str, Any]:
    return TaskResult(name, "acc,none", value, stderr, 40).to_dict()


class ScoringFake(FakeBackend):
    """The fake backend plus task scores: the search score follows the validation loss and
    the holdout score runs against it (a search fitting its own tasks), with `stderr` noise."""

    def __init__(self, spec: Any, stderr: float) -> None:
        super().__init__(spec, eval_s=1.0)
        self.stderr = stderr

    def _scored(self, val: float) -> Score:
        search = 1.0 - val / 3.0
        holdout = 0.2 + 5.0 * (val - 1.0)  # the lower the loss, the worse the holdout
        return Score(
            value=val - search,
            tasks={"mc": _task("mc", search, self.stderr)},
            seconds=self.eval_s,
            search_score=search,
            holdout_score=holdout,
            search_stderr=self.stderr,
            holdout_stderr=self.stderr,
            holdout_tasks={"held": _task("held", holdout, self.stderr)},
        )

    def score(self, result: RunResult, previous: list[float] | None = None) -> Score:
        self.sleep(self.eval_s)
        return self._scored(float(result.metrics["val_loss"]))

    def score_final(self, result: RunResult, seconds_left: float | None = None) -> Score:
        return self._scored(float(result.metrics["val_loss"]))


def _run(tmp_path: Path, stderr: float) -> tuple[Any, Any, str]:
    study = load_study_text(STUDY, tmp_path, run_dir=tmp_path / "run")
    ostudy = create_or_load(study, open_storage(study.storage))
    summary = run_study(study, ostudy, ScoringFake(study.fake, stderr), NullProgress())
    return study, ostudy, summary


def test_scores_stderrs_and_per_task_results_are_stored_and_overfitting_is_said(
    tmp_path: Path,
) -> None:
    study, ostudy, summary = _run(tmp_path, stderr=0.001)
    done = [t for t in ostudy.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) >= 3
    for t in done:
        a = t.user_attrs
        assert a["search_stderr"] == a["holdout_stderr"] == 0.001
        assert a["search_score"] == pytest.approx(1 - a["val_loss"] / 3)
        assert a["eval_tasks"]["mc"]["value"] == pytest.approx(a["search_score"])
        assert a["holdout_tasks"]["held"]["value"] == pytest.approx(a["holdout_score"])
    final = {k[6:]: v for k, v in ostudy.user_attrs.items() if k.startswith("final.")}
    assert final["search_stderr"] == final["holdout_stderr"] == 0.001
    assert final["holdout_tasks"]["held"]["value"] == pytest.approx(final["holdout_score"])
    # the guard reads its rows back from storage: every scored trial in order, then the final
    rows = guard_rows(ostudy.get_trials(), final)
    assert [r.label for r in rows] == [f"trial {t.number}" for t in done] + ["final"]
    assert rows[0].holdout_stderr == 0.001 and rows[-1].final
    # holdout runs against search here and the noise is tiny: the guard must say so
    ledger = ledger_for(study)
    status = format_status(collect(study, ostudy, ledger))
    ledger.close()
    assert "warning  overfitting guard:" in status
    assert "is the best by search objective but ranks" in status
    # the summary `launch` prints ends with the same warnings, and the final model's scores
    assert "overfitting guard:" in summary and "holdout score" in summary
    data = collect_report(str(study.run_dir))
    comparison = data.guard_comparison()
    assert [r["label"] for r in comparison] == [r.label for r in rows]
    assert comparison[-1]["final"] and comparison[-1]["holdout_stderr"] == 0.001
    assert any(w.startswith("Overfitting guard:") for w in report_warnings(data))


def test_differences_within_the_noise_are_not_flagged(tmp_path: Path) -> None:
    study, ostudy, summary = _run(tmp_path, stderr=0.5)
    assert "overfitting guard" not in summary
    ledger = ledger_for(study)
    report = collect(study, ostudy, ledger)
    ledger.close()
    assert report.guard_warnings == []
    # the final model's scores are shown with their standard errors
    assert "± 0.500" in format_status(report)
    data = collect_report(str(study.run_dir))
    # the rows are there (the comparison is data), only the warnings are not
    assert len(data.guard_comparison()) >= 3
    assert not any(w.startswith("Overfitting guard:") for w in report_warnings(data))


class FailingFinalEval(FakeBackend):
    def score_final(self, result: RunResult, seconds_left: float | None = None) -> Score:
        raise ConnectionError("dataset unreachable")


def test_a_failed_final_eval_still_exports_the_model(tmp_path: Path) -> None:
    study = load_study_text(STUDY.replace("max_trials = 6", "max_trials = 2"), tmp_path,
                            run_dir=tmp_path / "run")  # fmt: skip
    ostudy = create_or_load(study, open_storage(study.storage))
    summary = run_study(study, ostudy, FailingFinalEval(study.fake), NullProgress())
    attrs = ostudy.user_attrs
    assert attrs["final.eval_error"] == "ConnectionError: dataset unreachable"
    # the model trained on the final share of the budget is not lost with its eval
    assert Path(attrs["final.export_dir"], "fake_model.json").exists()
    assert attrs["final.val_loss"] > 0 and "eval     failed: ConnectionError" in summary


class _Objective:
    """Real score objects of `search/evaluation.py`, without a model or lm-eval."""

    settings = EvalSettings(search=[EvalTask("mc")], holdout=[EvalTask("held")])

    def __init__(self, *args: Any) -> None:
        self.mc = TaskResult("mc", "acc,none", 0.6, 0.05, 40)
        self.held = TaskResult("held", "acc,none", 0.4, 0.07, 30)

    def score_trial(self, model: Any, tok: Any, val_loss: float | None, out_dir: Any = None):
        return TrialScore(1.0 - 0.6, val_loss, 0.6, [self.mc], 2.0, search_stderr=0.05)

    def is_holdout_candidate(self, value: float, previous: list[float]) -> bool:
        return True

    def holdout(self, model: Any, tok: Any, out_dir: Any = None) -> HoldoutScore:
        return HoldoutScore(0.4, [self.held], 1.5, stderr=0.07)

    def final(self, model: Any, tok: Any, out_dir: Any = None) -> FinalScore:
        return FinalScore([self.mc], 0.6, self.holdout(model, tok), 3.0, search_stderr=0.05)


def test_engine_backend_passes_stderrs_and_holdout_tasks_on() -> None:
    backend = EngineBackend("unused", "32-true", objective=_Objective())
    backend.worker = SimpleNamespace(model=None, tokenizer=None)
    result = RunResult("completed", 10, 100, 5.0, {"val_loss": 1.0}, [], Path("."))
    s = backend.score(result, [])
    assert (s.search_score, s.search_stderr) == (0.6, 0.05)
    assert (s.holdout_score, s.holdout_stderr) == (0.4, 0.07)
    assert s.holdout_tasks["held"]["n_examples"] == 30 and s.seconds == pytest.approx(3.5)
    f = backend.score_final(result)
    assert (f.search_stderr, f.holdout_stderr, f.value) == (0.05, 0.07, 1.0)
    assert set(f.tasks) == {"mc"} and set(f.holdout_tasks) == {"held"}
    assert not math.isnan(f.seconds)


def test_fair_cap_shares_the_documents_that_fit() -> None:
    # everything fits: no cap
    assert fair_cap([40, 20, 40, 20], 200) is None
    # small demands keep theirs (20 + 20), the two 40s share the other 50
    assert fair_cap([40, 20, 40, 20], 90) == 25
    # unlimited tasks never fit; they share what the limited ones leave
    assert fair_cap([None, None, 40, 20], 160) == 50
    assert fair_cap([None, 5], 3) == 1 and fair_cap([None, 5], 1) == 0


def test_the_final_eval_is_cut_to_the_time_left_in_every_section() -> None:
    objective = _Objective()
    backend = EngineBackend("unused", "32-true", objective=objective)
    backend.worker = SimpleNamespace(model=None, tokenizer=None)
    result = RunResult("completed", 10, 100, 5.0, {"val_loss": 1.0}, [], Path("."))
    seen: list[EvalSettings] = []
    real_final = objective.final

    def final(model: Any, tok: Any, out_dir: Any = None) -> FinalScore:
        seen.append(objective.settings)
        return real_final(model, tok, out_dir)

    objective.final = final  # type: ignore[method-assign]
    objective.settings = EvalSettings(
        search=[EvalTask("mc", limit=40)], holdout=[EvalTask("held", limit=40)],
        final=[EvalTask("mc")],
    )  # fmt: skip
    configured = objective.settings
    backend.score(result, [])  # measures the rate: 40 documents in 2 s
    assert backend._eval_docs_per_s == pytest.approx(20.0)
    # 0.8 * 3 s * 20 docs/s = 48 documents over three tasks: 16 each, in every section
    backend.score_final(result, seconds_left=3.0)
    cut = seen[-1]
    assert [t.limit for t in (*cut.final, *cut.search, *cut.holdout)] == [16, 16, 16]
    assert backend.final_eval_limit == 16
    # the objective keeps its own settings afterwards
    assert objective.settings is configured
    # with time to spare, limited tasks keep their limits; the unlimited one gets the rest
    backend.score_final(result, seconds_left=1000.0)
    assert [t.limit for t in (*seen[-1].final, *seen[-1].search, *seen[-1].holdout)] == [
        0.8 * 1000 * 20 - 80, 40, 40,
    ]  # fmt: skip
    # no time at all: the final model keeps its validation loss, no task is run
    n = len(seen)
    s = backend.score_final(result, seconds_left=0.0)
    assert len(seen) == n and s.tasks == {} and s.value == 1.0
