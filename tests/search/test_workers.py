"""Worker registry and takeover, in one process on SQLite: liveness, eviction, recovery.

Other workers are simulated by rows and reservations written the way a worker in another
process (or on another machine) would write them; the real multi-process runs on
PostgreSQL are in `test_postgres.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from budgetune.engine.errors import RunFailed
from budgetune.search.backends import FakeBackend
from budgetune.search.driver import Driver
from budgetune.search.launch import ledger_for
from budgetune.search.ledger import Ledger
from budgetune.search.progress import NullProgress
from budgetune.search.recovery import recover
from budgetune.search.status import show_status
from budgetune.search.storage import create_or_load, make_sampler, open_storage
from budgetune.search.study import load_study_text
from budgetune.search.workers import (
    WORKERS,
    WorkerRegistry,
    db_now_sql,
    host_key,
    list_workers,
)

# ask() outside Study.optimize, as the driver does: Optuna warns about its heartbeat
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")

STUDY = """
[study]
name = "crew"
backend = "fake"
max_trials = 4
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
total_s = 100
trial_s = 10
final_share = 0.3
[pruner]
kind = "none"
[fake]
step_s = 0.02
"""


class _Log(NullProgress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _study(tmp_path: Path, text: str = STUDY):
    study = load_study_text(text, tmp_path, run_dir=tmp_path / "run")
    return study, create_or_load(study, open_storage(study.storage))


def _add_worker(url: str, worker_id: str, *, age_s: float = 0.0, **values) -> None:
    """A worker row as another machine's worker writes it (heartbeat `age_s` ago)."""
    engine = sa.create_engine(url)
    WORKERS.metadata.create_all(engine)
    with engine.begin() as conn:
        now = conn.execute(sa.select(db_now_sql("sqlite"))).scalar_one()
        row = dict(study_name="crew", worker_id=worker_id, host="far", pid=1,
                   host_key="another-machine", process_start=0.0, device="GPU X",
                   heartbeat_s=1.0, activity="trial", trial_number=None,
                   started_at=now - 100, heartbeat_at=now - age_s)  # fmt: skip
        row.update(values)
        conn.execute(WORKERS.insert().values(**row))
    engine.dispose()


def _remote_trial(study, ostudy, worker_id: str, charged_s: float) -> int:
    """A RUNNING trial of another worker: asked, its budget reserved and partly charged."""
    led = Ledger(study.storage, study.name, worker_id)
    res = led.reserve_trial(study.budget.trial_s, study.budget.min_trial)
    trial = ostudy.ask()
    study.space.suggest(trial)
    led.attach(res, trial.number)
    trial.set_user_attr("worker_id", worker_id)
    trial.set_user_attr("reserved_s", res.seconds)
    trial.report(2.5, 5)
    led.charge("train", charged_s, trial.number, res)
    led.close()
    return trial.number


def test_a_worker_is_dead_when_silent_stopped_or_its_local_process_is_gone(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    me = WorkerRegistry(url, "crew", "me", heartbeat_s=0.5)
    me.register("cpu")
    # a process that has ended: its PID no longer exists on this machine
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    _add_worker(url, "fresh", age_s=2.0)  # grace for 1 s beats: 3 * 1 + 5 = 8 s
    _add_worker(url, "silent", age_s=9.0)
    _add_worker(url, "stopped", activity="stopped")
    _add_worker(url, "ended", host_key=host_key(), pid=int(ended.stdout))
    # this very PID, but a process started at another time: the PID was reused
    _add_worker(url, "reused", host_key=host_key(), pid=os.getpid())
    seen = {w.worker_id: w for w in me.workers()}
    assert seen["me"].alive and seen["fresh"].alive
    assert seen["silent"].why_dead == "no heartbeat for 9 s"
    assert seen["stopped"].why_dead == "stopped"
    assert seen["ended"].why_dead == seen["reused"].why_dead == "process gone"
    # unknown workers (a reservation left by an older version) count as dead; never this one
    assert me.is_dead("nobody") and not me.is_dead("me") and not me.is_dead("fresh")
    # readers see the same without the registry's write-locking engine
    assert {w.worker_id: w.alive for w in list_workers(url, "crew")} == {
        k: w.alive for k, w in seen.items()
    }


def test_heartbeats_keep_a_worker_fresh_and_eviction_reaches_it(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    calls: list[str] = []
    me = WorkerRegistry(url, "crew", "me", heartbeat_s=0.1, on_evicted=lambda: calls.append("x"))
    me.register("cpu")
    other = WorkerRegistry(url, "crew", "other")
    with me.beating():
        time.sleep(0.6)
        age = {w.worker_id: w.age_s for w in other.workers()}["me"]
        # the thread beat several times: the last beat is younger than two intervals
        assert age < 0.25
        other.mark_dead("me")
        time.sleep(0.35)
    # the next beat found the row marked dead: evicted once, and the row stays dead
    assert me.evicted and calls == ["x"]
    me.stop()
    (w,) = [w for w in other.workers() if w.worker_id == "me"]
    assert w.activity == "dead" and not w.alive


def test_recovery_continues_only_dead_workers_trials_exactly_once(tmp_path) -> None:
    study, ostudy = _study(tmp_path)
    d = Driver(study, ostudy, FakeBackend(study.fake))
    d.workers.register()
    _add_worker(study.storage, "live", age_s=0.0, heartbeat_s=60.0)
    _add_worker(study.storage, "gone", age_s=500.0)
    live_n = _remote_trial(study, ostudy, "live", 3.0)
    dead_n = _remote_trial(study, ostudy, "gone", 4.0)
    recover(d)
    trials = ostudy.get_trials()
    old, live = trials[dead_n], trials[live_n]
    # the live worker's trial and reservation are left alone
    assert live.state == TrialState.RUNNING and d.ledger.open_reservations() == 1
    assert old.state == TrialState.FAIL and old.user_attrs["outcome"] == "continued"
    assert old.user_attrs["cost_s"] == pytest.approx(4.0)
    new = trials[old.user_attrs["continued_by"]]
    assert new.state == TrialState.WAITING and new.system_attrs["fixed_params"] == old.params
    # the continuation carries what the dead trial had left, not a second copy of its cost
    assert new.user_attrs["prior_cost_s"] == pytest.approx(4.0)
    assert {w.worker_id: w.activity for w in d.workers.workers()}["gone"] == "dead"
    # a second worker recovering later finds the continuation: no second one
    d2 = Driver(study, ostudy, FakeBackend(study.fake))
    d2.workers.register()
    recover(d2)
    assert sum(t.user_attrs.get("continues") == dead_n for t in ostudy.get_trials()) == 1
    # the dead worker's spend stays on the ledger: 3 s + 4 s charged
    assert d.ledger.totals().spent_s == pytest.approx(7.0)
    d.workers.stop()
    d2.workers.stop()


def test_a_trial_without_a_known_worker_waits_while_others_live(tmp_path) -> None:
    study, ostudy = _study(tmp_path)
    orphan = ostudy.ask()  # a worker died between ask and reserving its budget
    study.space.suggest(orphan)
    d = Driver(study, ostudy, FakeBackend(study.fake))
    d.workers.register()
    _add_worker(study.storage, "live", heartbeat_s=60.0)
    recover(d)
    # another live worker may be about to reserve for it: left alone for now
    assert ostudy.get_trials()[orphan.number].state == TrialState.RUNNING
    WorkerRegistry(study.storage, study.name, "live").stop()
    recover(d)
    # no other worker lives: it can only be a dead one's, continued at once
    assert ostudy.get_trials()[orphan.number].user_attrs["outcome"] == "continued"
    d.workers.stop()


def test_several_live_workers_on_sqlite_are_warned_about(tmp_path) -> None:
    study, ostudy = _study(tmp_path)
    log = _Log()
    d = Driver(study, ostudy, FakeBackend(study.fake), progress=log)
    d.workers.register()
    recover(d)
    # alone on SQLite: the default, nothing to say
    assert log.lines == []
    _add_worker(study.storage, "neighbour", heartbeat_s=600.0, activity="starting")
    recover(d)
    recover(d)
    # a second live worker showed up: said once, naming the way out
    assert len(log.lines) == 1 and "2 workers" in log.lines[0]
    assert "share the SQLite storage" in log.lines[0] and "postgresql://" in log.lines[0]
    d.workers.stop()


class _EvictedAt(FakeBackend):
    """Another worker judges this one dead at the n-th eval of its first run."""

    def __init__(self, *a, n: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.n, self.seen, self.driver = n, 0, None

    def run(self, config, reporter, resume=True):
        inner = reporter.report

        def report(ev):
            self.seen += 1
            if self.seen == self.n:
                judge = WorkerRegistry(self.driver.study.storage, "crew", "judge")
                judge.mark_dead(self.driver.worker_id)
                self.driver.workers.beat()
            return inner(ev)

        reporter.report = report
        return super().run(config, reporter, resume)


def test_an_evicted_worker_stops_and_tells_its_trial_nothing(tmp_path) -> None:
    study, ostudy = _study(tmp_path)
    backend = _EvictedAt(study.fake, n=3)
    d = Driver(study, ostudy, backend)
    backend.driver = d
    with pytest.raises(RunFailed, match="presumed dead"):
        d.run()
    (t,) = ostudy.get_trials()
    # stopped at the eval after the eviction; the trial is left for whoever took it over
    assert backend.seen == 3 and t.state == TrialState.RUNNING and "outcome" not in t.user_attrs
    # its row stays dead (it was not marked stopped), so the next worker takes the trial over
    d2 = Driver(study, ostudy, FakeBackend(study.fake))
    d2.workers.register()
    recover(d2)
    assert ostudy.get_trials()[0].user_attrs["outcome"] == "continued"
    assert ledger_for(study).open_reservations() == 0
    d2.workers.stop()


def test_status_lists_the_workers(tmp_path) -> None:
    study, ostudy = _study(tmp_path)
    d = Driver(study, ostudy, FakeBackend(study.fake))
    d.workers.register("cpu")
    d.workers.stop()
    _add_worker(study.storage, "gpu-box", age_s=1.0, heartbeat_s=60.0, trial_number=7,
                device="NVIDIA H100 (CUDA_VISIBLE_DEVICES=3)")  # fmt: skip
    text = show_status(str(study.run_dir))
    assert "workers  1 alive, 1 dead" in text
    # one line per worker: host, device, what it does, heartbeat age, alive or why dead
    line = next(x for x in text.splitlines() if "far pid 1" in x)
    assert "NVIDIA H100 (CUDA_VISIBLE_DEVICES=3)  trial 7  beat 1 s ago  alive" in line
    mine = next(x for x in text.splitlines() if "  cpu  " in x)
    assert mine.strip().endswith("dead (stopped)")


def test_tpe_lies_about_running_trials() -> None:
    study = load_study_text(STUDY, Path("."))  # the default sampler: TPE
    # constant liar: a trial running on another worker counts as a bad one when sampling
    assert make_sampler(study)._constant_liar is True


def test_resume_wants_one_place_to_find_the_study(tmp_path) -> None:
    from budgetune.engine.errors import UserInputError
    from budgetune.search.launch import resume

    with pytest.raises(UserInputError, match="run directory or storage URL"):
        resume(None)
    with pytest.raises(UserInputError, match="run directory or storage URL"):
        resume(str(tmp_path), storage="postgresql://nowhere/db")
    # a study whose run directory cannot exist here: one line saying what workers need
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = load_study_text(STUDY, tmp_path, run_dir=Path("/proc/budgetune"), storage=url)
    create_or_load(study, open_storage(url))
    with pytest.raises(UserInputError, match="same path"):
        resume(None, "crew", storage=url)
