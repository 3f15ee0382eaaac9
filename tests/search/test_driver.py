"""The driver on the fake backend in virtual time: budget, pruning, failures, final run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from budgetune.engine.errors import UserInputError
from budgetune.search.backends import FakeBackend
from budgetune.search.driver import Driver
from budgetune.search.launch import ledger_for
from budgetune.search.plan import make_plan, show_plan
from budgetune.search.status import collect, format_status, show_status
from budgetune.search.storage import create_or_load, open_storage
from budgetune.search.study import load_study_text

STUDY = """
[study]
name = "fake"
backend = "fake"
[model]
name = "./model"
[data]
max_seq_length = 128
[[data.sources]]
name = "dolly"
path = "dolly.jsonl"
schema = "dolly"
[[data.sources]]
name = "flan"
path = "flan.jsonl"
schema = "flan"
[data.validation]
path = "val.jsonl"
schema = "alpaca"
[train]
global_batch = 16
micro_batch = 4
eval_interval = 20
[search]
lora_rank = { choices = [4, 8, 16, 32] }
lora_alpha = { ratio = 2.0 }
lr = { low = 1e-4, high = 3e-1, log = true }
micro_batch = { choices = [2, 4, 8, 16] }
[search.mix]
dolly = { low = 0.0, high = 1.0 }
flan = { low = 0.0, high = 1.0 }
[budget]
total_s = 400
trial_s = 30
final_share = 0.3
trial_eval_s = 1.0
trial_setup_s = 0.5
[sampler]
n_startup_trials = 4
[fake]
step_s = 0.02
setup_s = 0.5
memory_limit = 20000
diverge_lr = 0.1
"""


def _driver(tmp_path: Path, text: str = STUDY, backend: FakeBackend | None = None):
    study = load_study_text(text, tmp_path, run_dir=tmp_path / "run")
    ostudy = create_or_load(study, open_storage(study.storage))
    backend = backend or FakeBackend(study.fake, eval_s=study.budget.trial_eval_s)
    return study, ostudy, backend, Driver(study, ostudy, backend)


def _check_books(study, ostudy) -> None:
    """Every trial's cost attributes equal its ledger rows; spent <= budget."""
    ledger = ledger_for(study)
    costs = ledger.trial_costs()
    for t in ostudy.get_trials():
        own = costs.get(t.number, {})
        assert t.user_attrs.get("cost_s", 0.0) == pytest.approx(sum(own.values()), abs=1e-6)
    totals = ledger.totals()
    assert totals.spent_s <= study.budget.total_s + 1e-6
    assert not ostudy.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_a_study_spends_its_budget_on_trials_then_one_final_run(tmp_path: Path) -> None:
    study, ostudy, backend, driver = _driver(tmp_path)
    # enqueued configurations run first: one too big to fit, one with a too high lr
    ostudy.enqueue_trial({"micro_batch": 16, "lora_rank": 32, "lr": 1e-3})
    ostudy.enqueue_trial({"micro_batch": 2, "lora_rank": 8, "lr": 0.2})
    driver.run()
    trials = ostudy.get_trials()
    outcomes = [t.user_attrs["outcome"] for t in trials]
    assert outcomes.count("complete") >= 3 and outcomes.count("pruned") >= 1
    # the fake OOMs above micro_batch * rank * length = 20000 and diverges above lr = 0.1
    assert "oom" in outcomes and "diverged" in outcomes
    ledger = ledger_for(study)
    totals = ledger.totals()
    claim = totals.final
    # the final run got at least its reserve, ran once, and the total stayed in budget
    assert claim.state == "done" and claim.allotment_s >= study.budget.final_reserve_s
    assert backend.exported == [study.run_dir / "final" / "export"]
    assert study.budget.total_s - totals.spent_s < study.budget.trial_s
    _check_books(study, ostudy)
    # the final run trained the best trial's configuration on what remained
    best = ostudy.best_trial
    final_cfg = backend.runs[-1]
    assert final_cfg.out_dir == study.run_dir / "final"
    assert (
        final_cfg.learning_rate == best.params["lr"]
        and final_cfg.lora.r == best.params["lora_rank"]
    )
    assert final_cfg.weights == pytest.approx(
        {k[7:]: v for k, v in best.user_attrs.items() if k.startswith("weight.")}
    )
    attrs = ostudy.user_attrs
    assert attrs["final.trial"] == best.number and attrs["final.status"] == "completed"
    assert attrs["final.val_loss"] < best.value
    assert Path(attrs["final.export_dir"], "fake_model.json").exists()
    # trial attributes are what optuna-dashboard and pandas read
    df = ostudy.trials_dataframe()
    for col in ("user_attrs_cost_s", "user_attrs_cost_train_s", "user_attrs_outcome",
                "user_attrs_tokens_per_s", "user_attrs_peak_memory_bytes", "user_attrs_worker_id",
                "params_lr", "params_mix.dolly"):  # fmt: skip
        assert col in df.columns
    # a second run of the same study does nothing more
    n = len(backend.runs)
    Driver(study, ostudy, backend).run()
    assert len(backend.runs) == n


def test_oom_steers_away_and_the_frontier_is_skipped_without_running(tmp_path: Path) -> None:
    text = STUDY.replace("[sampler]\nn_startup_trials = 4", '[sampler]\nkind = "random"')
    study, ostudy, backend, driver = _driver(tmp_path, text)
    # (16, 16) runs out of memory; (16, 32) is beyond it, so it must be skipped unrun
    ostudy.enqueue_trial({"micro_batch": 16, "lora_rank": 16})
    ostudy.enqueue_trial({"micro_batch": 16, "lora_rank": 32})
    driver.run()
    trials = ostudy.get_trials()
    ooms = [t for t in trials if t.user_attrs["outcome"] == "oom"]
    skips = [t for t in trials if t.user_attrs["outcome"] == "skipped"]
    assert ooms and skips
    for t in ooms + skips:
        # told PRUNED (samplers ignore FAIL trials) with an infeasible constraint
        assert t.state == TrialState.PRUNED and t.system_attrs["constraints:oom"] == 1.0
    for t in skips:
        assert t.user_attrs["cost_s"] == 0.0 and t.user_attrs["reason"].startswith("oom-frontier")
    # no configuration at or beyond an OOM point was ever run after that OOM
    frontier = [(t.user_attrs["micro_batch"], t.user_attrs["rank"]) for t in ooms]
    runs = [(c.micro_batch, c.lora.r) for c in backend.runs]
    assert (16, 16) in frontier and runs[0] == (16, 16) and skips[0].number == 1
    for mb, r in frontier:
        first = runs.index((mb, r))
        assert not any(m >= mb and rr >= r for m, rr in runs[first + 1 :]), (frontier, runs)
    _check_books(study, ostudy)


def test_a_trials_horizon_leaves_out_what_its_reservation_already_paid(tmp_path: Path) -> None:
    # the only validation is at the horizon's end; every trial's bookkeeping takes 3 s, paid
    # out of the next trial's reservation
    text = STUDY.replace("eval_interval = 20", "eval_interval = 1000")
    text = text.replace('backend = "fake"', 'backend = "fake"\nmax_trials = 2')
    study, ostudy, backend, driver = _driver(tmp_path, text)
    for _ in range(2):
        ostudy.enqueue_trial({"micro_batch": 4, "lora_rank": 8, "lr": 3e-3})
    finish = driver._finish

    def slow_finish(*a, **kw):
        finish(*a, **kw)
        backend.sleep(3.0)

    driver._finish = slow_finish
    driver.run()
    first, second = ostudy.get_trials()[:2]
    assert first.state == TrialState.COMPLETE
    assert first.user_attrs["horizon_s"] == pytest.approx(30 - 0.5 - 1.0)
    # trained to the configured horizon, the second trial would be stopped short of it
    assert second.state == TrialState.COMPLETE, second.user_attrs.get("reason")
    assert second.user_attrs["horizon_s"] == pytest.approx(30 - 0.5 - 1.0 - 3.0, abs=0.01)
    _check_books(study, ostudy)


class _Failing(FakeBackend):
    def __init__(self, *a, error: Exception, **kw) -> None:
        super().__init__(*a, **kw)
        self.error = error

    def run(self, config, reporter, resume=True):
        if len(self.runs) == 1:
            self.runs.append(config)
            raise self.error
        return super().run(config, reporter, resume)


def test_an_unexpected_error_fails_one_trial_not_the_study(tmp_path: Path) -> None:
    study = load_study_text(STUDY, tmp_path, run_dir=tmp_path / "run")
    backend = _Failing(study.fake, error=RuntimeError("disk full"))
    study, ostudy, backend, driver = _driver(tmp_path, backend=backend)
    driver.run()
    t1 = ostudy.get_trials()[1]
    assert t1.state == TrialState.FAIL and t1.user_attrs["reason"] == "RuntimeError: disk full"
    assert ledger_for(study).final_claim().state == "done"


def test_a_user_input_error_stops_the_study(tmp_path: Path) -> None:
    study = load_study_text(STUDY, tmp_path, run_dir=tmp_path / "run")
    backend = _Failing(study.fake, error=UserInputError("data/x.jsonl line 3: not valid JSON"))
    study, ostudy, backend, driver = _driver(tmp_path, backend=backend)
    with pytest.raises(UserInputError, match="line 3"):
        driver.run()
    assert ostudy.get_trials()[1].state == TrialState.FAIL


class _StopAfter(FakeBackend):
    """Presses Ctrl-C (driver.request_stop) at the n-th eval of the whole study."""

    def __init__(self, *a, n: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.n, self.seen, self.driver = n, 0, None

    def run(self, config, reporter, resume=True):
        inner = reporter.report

        def report(ev):
            self.seen += 1
            if self.seen == self.n:
                self.driver.request_stop()
            return inner(ev)

        reporter.report = report
        return super().run(config, reporter, resume)


def test_ctrl_c_then_resume_continues_the_trial_with_the_same_parameters(tmp_path: Path) -> None:
    study = load_study_text(STUDY, tmp_path, run_dir=tmp_path / "run")
    backend = _StopAfter(study.fake, n=9, eval_s=1.0)
    study, ostudy, backend, driver = _driver(tmp_path, backend=backend)
    backend.driver = driver
    with pytest.raises(KeyboardInterrupt):
        driver.run()
    stale = ostudy.get_trials(states=(TrialState.RUNNING,))
    assert len(stale) == 1
    old = stale[0]
    ckpt = Path(old.user_attrs["trial_dir"], "checkpoints", "fake.json")
    assert ckpt.exists()
    # a new process (new worker) resumes from the storage
    backend2 = FakeBackend(study.fake, eval_s=1.0)
    Driver(study, ostudy, backend2).run()
    old = ostudy.get_trials()[old.number]
    new = ostudy.get_trials()[old.user_attrs["continued_by"]]
    assert old.state == TrialState.FAIL and old.user_attrs["outcome"] == "continued"
    assert new.user_attrs["continues"] == old.number and new.params == old.params
    assert new.user_attrs["trial_dir"] == old.user_attrs["trial_dir"]
    # it picked up the old intermediate values and went on from the checkpoint
    assert set(old.intermediate_values) <= set(new.intermediate_values)
    assert backend2.runs[0].out_dir == Path(old.user_attrs["trial_dir"])
    _check_books(study, ostudy)
    assert ledger_for(study).final_claim().state == "done"


def test_max_trials_and_patience_end_the_search_early(tmp_path: Path) -> None:
    text = STUDY.replace('backend = "fake"', 'backend = "fake"\nmax_trials = 3')
    study, ostudy, backend, driver = _driver(tmp_path, text)
    driver.run()
    counted = [t for t in ostudy.get_trials() if t.user_attrs["outcome"] not in ("skipped",)]
    assert len(counted) == 3
    # the unused search share flowed to the final run
    assert (
        ledger_for(study).final_claim().allotment_s
        > study.budget.total_s - 4 * study.budget.trial_s
    )


def test_no_completed_trial_means_the_final_run_uses_the_defaults(tmp_path: Path) -> None:
    text = STUDY.replace("diverge_lr = 0.1", "diverge_lr = 0.00001")
    text = text.replace('backend = "fake"', 'backend = "fake"\nmax_trials = 4')
    study, ostudy, backend, driver = _driver(tmp_path, text)
    driver.run()
    assert all(t.state != TrialState.COMPLETE for t in ostudy.get_trials())
    assert ostudy.user_attrs["final.trial"] is None
    # the default configuration: [train] values and RunConfig's Lit-GPT defaults
    assert (backend.runs[-1].learning_rate, backend.runs[-1].micro_batch) == (3e-4, 4)


def test_plan_and_status_say_where_the_budget_goes(tmp_path: Path) -> None:
    short = STUDY.replace('backend = "fake"', 'backend = "fake"\nmax_trials = 3')
    study, ostudy, backend, driver = _driver(tmp_path, short)
    plan = make_plan(study)
    assert (plan.search_s, plan.final_reserve_s) == (280.0, 120.0)
    # (280 - 4 margin) // 30 = 9 trials without pruning; pruning makes trials cheaper
    assert plan.n_trials_no_pruning == 9 and plan.n_trials_pruning > 9
    (tmp_path / "s.toml").write_text(STUDY)
    assert "9 without pruning" in show_plan(str(tmp_path / "s.toml"))
    driver.run()
    report = collect(study, ostudy, ledger_for(study))
    assert report.finished and report.best_number == ostudy.best_trial.number
    text = format_status(report)
    assert f"trial {ostudy.best_trial.number}" in text and "final    completed" in text
    assert show_status(str(study.run_dir)).startswith("study fake (finished)")


def test_launching_an_existing_study_with_another_file_is_refused(tmp_path: Path) -> None:
    study, ostudy, backend, driver = _driver(tmp_path)
    changed = load_study_text(STUDY.replace("total_s = 400", "total_s = 500"), tmp_path,
                              run_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(UserInputError, match="budgetune resume"):
        create_or_load(changed, open_storage(changed.storage))
    # the same file (comments aside) loads the existing study
    same = load_study_text("# hello\n" + STUDY, tmp_path, run_dir=tmp_path / "run")
    assert create_or_load(same, open_storage(same.storage)).study_name == "fake"


@pytest.mark.slow
@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    total=st.sampled_from([120.0, 200.0, 300.0]),
    share=st.floats(0.2, 0.5),
    trial=st.floats(10.0, 40.0),
    step=st.floats(0.005, 0.05),
    seed=st.integers(0, 1000),
)
def test_budget_invariant_on_random_studies(
    tmp_path_factory, total, share, trial, step, seed
) -> None:
    tmp = tmp_path_factory.mktemp("inv")
    text = (STUDY.replace("total_s = 400", f"total_s = {total}")
            .replace("final_share = 0.3", f"final_share = {share}")
            .replace("trial_s = 30", f"trial_s = {trial}")
            .replace("step_s = 0.02", f"step_s = {step}")
            .replace('name = "fake"', f'name = "fake"\nseed = {seed}'))  # fmt: skip
    study, ostudy, backend, driver = _driver(tmp, text)
    driver.run()
    claim = ledger_for(study).final_claim()
    assert claim.state == "done" and claim.allotment_s >= study.budget.final_reserve_s - 1e-6
    _check_books(study, ostudy)
    assert math.isfinite(ostudy.user_attrs["final.val_loss"])
