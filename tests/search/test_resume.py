"""Real processes stopped at the worst moments: Ctrl-C, then SIGKILL mid-trial and mid-final.

The study runs on the fake backend in real time (sleeps), so a process can be stopped in
the middle of a trial or of the final run; after `budgetune resume` every trial is
accounted for once, the ledger equals the recorded costs, and the final run happened once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from budgetune.search.ledger import CLAIMS, Ledger

STUDY = """
[study]
name = "killme"
backend = "fake"
run_dir = "run"
[model]
name = "./model"
[data]
max_seq_length = 64
[[data.sources]]
name = "dolly"
path = "dolly.jsonl"
schema = "dolly"
[data.validation]
path = "val.jsonl"
schema = "alpaca"
[train]
global_batch = 4
micro_batch = 4
eval_interval = 5
[search]
lr = { low = 1e-3, high = 1e-2, log = true }
lora_rank = { choices = [8, 16] }
[budget]
total_s = 20
final_share = 0.35
trial_s = 3.5
min_trial_s = 2
margin_s = 1
final_tail_s = 1
[pruner]
kind = "none"
[fake]
clock = "real"
step_s = 0.012
"""
CLI = [sys.executable, "-c", "from budgetune.search.cli import main; main()"]


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.slow
def test_interrupt_kill_and_resume_account_for_everything_once(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(STUDY)
    run = tmp_path / "run"
    # 1. Ctrl-C in trial 0: it checkpoints, the process says "interrupted" and exits 130
    p = _start("launch", "s.toml", cwd=tmp_path)
    _wait_for(run / "trials" / "0" / "checkpoints" / "fake.json", p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err
    storage = optuna.storages.RDBStorage(f"sqlite:///{run / 'study.db'}")
    ostudy = optuna.load_study(study_name="killme", storage=storage)
    assert [t.state for t in ostudy.get_trials()] == [TrialState.RUNNING]
    # 2. resume, SIGKILL in the middle of trial 2 (a trial checkpoint exists, it is unfinished)
    p = _start("resume", str(run), cwd=tmp_path)
    _wait_for(run / "trials" / "2" / "checkpoints" / "fake.json", p)
    p.kill()
    p.wait()
    running = optuna.load_study(study_name="killme", storage=storage).get_trials(
        states=(TrialState.RUNNING,)
    )
    assert len(running) == 1
    killed = running[0].number
    # 3. resume, SIGKILL in the middle of the final run
    p = _start("resume", str(run), cwd=tmp_path)
    _wait_for(run / "final" / "checkpoints" / "fake.json", p)
    time.sleep(0.3)
    p.kill()
    p.wait()
    killed_at = json.loads((run / "final" / "checkpoints" / "fake.json").read_text())["step"]
    assert not (run / "final" / "export").exists()
    # 4. resume to the end, from a storage URL this time
    p = _start("resume", f"sqlite:///{run / 'study.db'}", "--study", "killme", cwd=tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "study killme (finished)" in out and "export" in out
    # the finished run leaves its report in the run directory and says where
    assert f"report: {run / 'report.html'}" in out and (run / "report.html").stat().st_size > 0

    ostudy = optuna.load_study(study_name="killme", storage=storage)
    trials = ostudy.get_trials()
    # every trial ended; the interrupted and the killed ones were continued, each once
    assert not [t for t in trials if not t.state.is_finished()]
    continued = [t for t in trials if t.user_attrs["outcome"] == "continued"]
    assert {t.number for t in continued} == {0, killed}
    for old in continued:
        new = trials[old.user_attrs["continued_by"]]
        assert new.user_attrs["continues"] == old.number and new.params == old.params
        assert new.state == TrialState.COMPLETE
    # the ledger equals the recorded costs: every trial's rows == its cost attribute
    ledger = Ledger(f"sqlite:///{run / 'study.db'}", "killme", "test")
    costs = ledger.trial_costs()
    assert set(costs) == {t.number for t in trials if t.user_attrs.get("cost_s", 0) > 0}
    for t in trials:
        assert t.user_attrs.get("cost_s", 0.0) == pytest.approx(
            sum(costs.get(t.number, {}).values())
        )
    totals = ledger.totals()
    trial_sum = sum(t.user_attrs.get("cost_s", 0.0) for t in trials)
    assert totals.spent_s == pytest.approx(
        trial_sum + totals.by_category["final"] + totals.by_category.get("overhead", 0.0)
    )
    assert totals.spent_s <= 20.0
    # exactly one final run: one claim, done; it resumed from its checkpoint, one export
    with sa.create_engine(f"sqlite:///{run / 'study.db'}").connect() as conn:
        claims = conn.execute(sa.select(CLAIMS).where(CLAIMS.c.what == "final")).all()
    assert len(claims) == 1 and claims[0].state == "done"
    attrs = ostudy.user_attrs
    steps = [s for s, _ in attrs["final.curve"]]
    # its learning curve runs on from before the kill: no step twice, none restarted
    assert steps == sorted(set(steps)) and steps[0] <= killed_at < steps[-1]
    assert Path(attrs["final.export_dir"], "fake_model.json").exists()
    assert attrs["final.trial"] == ostudy.best_trial.number
