"""The replay backend: recorded learning curves, replayed in virtual time.

A search policy can only be judged over many studies, and a study of real finetunes costs
GPU-days. `ReplayBackend` answers a trial from learning curves the real engine recorded once
(`python -m budgetune.search.record_curves`), so the driver, its ledger, pruner and final
run run unchanged over thousands of simulated GPU-hours in seconds (`replay_study`).

The curves file format and the rule that maps a proposed configuration onto a recorded run
are in `curves.py`; each run draws one of the matched configuration's recorded seeds from
the backend's own seeded RNG, so a search sees seed noise as a real one does.

Virtual clock
-------------
A run advances the backend's clock step by step: the time to reach step s is the recorded
`elapsed_s` interpolated linearly in step between checkpoints (with step 0 at 0 s), so the
driver's per-step stop checks, its ledger charges and its reservations behave as with the
engine. A seconds horizon ends at the last step whose elapsed time fits it; the metric at a
step between checkpoints is interpolated the same way, and events are emitted at recorded
checkpoints that fall on the run's `eval_interval` plus the final step, like the engine's
final eval. A horizon beyond the recording ends where the recording ends (status
`completed`): the curve is assumed flat beyond what was measured. Checkpoints are kept in
memory by run directory, so a stopped run resumes on the same recorded run.

The final model's quality (`final_quality`): the matched configuration's recorded value at
the step the final run reached, averaged over the recorded seeds, i.e. the expected
quality of the chosen configuration at the final run's horizon.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from budgetune.engine.config import RunConfig
from budgetune.engine.errors import Diverged, OutOfMemory, UserInputError
from budgetune.engine.events import EvalEvent, RunResult
from budgetune.search.backends import Reporter, Score, VirtualClock
from budgetune.search.curves import RecordedRun, Recording
from budgetune.search.study import Study


@dataclass
class ReplayedRun:
    """What one replayed run did (the benchmark reads the final run's entry)."""

    config: int
    run_id: str
    out_dir: str
    step: int
    elapsed_s: float
    value: float
    status: str
    run_config: RunConfig


@dataclass
class _Checkpoint:
    run_id: str
    step: int
    elapsed_s: float
    curve: list[EvalEvent]


class ReplayBackend:
    """A `TrialBackend` that replays recorded curves on a virtual clock (module docstring).

    `objective` is `val_loss` (the run's final validation loss, the driver's default) or
    `score` (the recorded eval objective, interpolated between the checkpoints that have one).
    `setup_s` and `eval_s` are virtual seconds spent before each run's training and in each
    `score` call; a study's `budget.trial_setup_s`/`trial_eval_s` should say the same.
    """

    def __init__(self, recording: Recording, *, seed: int = 0, setup_s: float = 0.0,
                 eval_s: float = 0.0, objective: str = "val_loss") -> None:  # fmt: skip
        if objective not in ("val_loss", "score"):
            raise UserInputError(f"replay objective {objective!r} is unknown (val_loss or score)")
        if objective == "score" and not any(r.score is not None for r in recording.runs.values()):
            raise UserInputError(f"{recording.source}: objective score needs a score column")
        self.recording = recording
        self.rng = random.Random(seed)
        self.setup_s = setup_s
        self.eval_s = eval_s
        self.objective = objective
        self._clock = VirtualClock()
        self.clock: Callable[[], float] = self._clock
        self.history: list[ReplayedRun] = []
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._last: tuple[RecordedRun, int] | None = None

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, config: RunConfig, reporter: Reporter, resume: bool = True) -> RunResult:
        rec = self.recording
        cid = rec.match(rec.params_of(config))
        key = str(config.out_dir)
        ck = self._checkpoints.get(key) if resume else None
        if ck is None:
            seed = self.rng.choice(rec.seeds(cid))
            ck = _Checkpoint(rec.pick_run(cid, seed, config).run_id, 0, 0.0, [])
        run = rec.runs[ck.run_id]
        reporter.phase("setup")
        self._clock.sleep(self.setup_s)
        reporter.phase("train")
        if run.status == "oom":
            self._clock.sleep(float(run.elapsed[0]))
            raise OutOfMemory(config.micro_batch, config.max_seq_length, int(run.peak_memory_bytes))
        end = run.horizon_step(config)
        diverge_at = run.last_step if run.status == "diverged" else None
        step, elapsed, curve = ck.step, ck.elapsed_s, list(ck.curve)
        recorded = set(int(s) for s in run.steps)
        status = "completed"
        while step < end:
            if reporter.should_stop():
                status = "stopped"
                break
            dt = run.elapsed_at(step + 1) - run.elapsed_at(step)
            self._clock.sleep(dt)
            elapsed += dt
            step += 1
            if diverge_at is not None and step >= diverge_at:
                self._checkpoints.pop(key, None)
                raise Diverged(step, float(run.val_loss[-1]), "the recorded run diverged here")
            if not (step == end or (step in recorded and step % config.eval_interval == 0)):
                continue
            metrics = {"val_loss": run.value_at(step)}
            if run.train_loss is not None:
                metrics["train_loss"] = run.value_at(step, "train_loss")
            ev = EvalEvent(step, run.tokens_at(step), elapsed, metrics)
            curve.append(ev)
            self._checkpoints[key] = _Checkpoint(run.run_id, step, elapsed, list(curve))
            if reporter.report(ev):
                status = "stopped"
                break
        self._checkpoints[key] = _Checkpoint(run.run_id, step, elapsed, list(curve))
        metrics = {"tokens_per_s": run.tokens_at(step) / max(elapsed, 1e-9),
                   "step_time_s": elapsed / max(step, 1),
                   "peak_memory_bytes": run.peak_memory_bytes}  # fmt: skip
        if curve:
            metrics["val_loss"] = curve[-1].metrics["val_loss"]
        self._last = (run, step)
        value = curve[-1].metrics["val_loss"] if curve else float("nan")
        self.history.append(ReplayedRun(cid, run.run_id, key, step, elapsed, value, status, config))
        return RunResult(status, step, run.tokens_at(step), elapsed, metrics, curve, config.out_dir)

    def score(self, result: RunResult, previous: list[float] | None = None) -> Score:
        """The objective at the run's end; `eval_s` virtual seconds (no holdout tasks here)."""
        self._clock.sleep(self.eval_s)
        val = float(result.metrics.get("val_loss", float("nan")))
        if self.objective == "score" and self._last is not None:
            run, step = self._last
            return Score(run.value_at(step, "score"), {"val_loss": val}, self.eval_s)
        return Score(val, {}, self.eval_s)

    def score_final(self, result: RunResult) -> Score:
        """The final model's eval: the same objective, at the same virtual cost."""
        return self.score(result)

    def export(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        last = self.history[-1] if self.history else None
        info = {} if last is None else {
            "replayed_run": last.run_id, "config": self.recording.describe(last.config),
            "step": last.step, "val_loss": last.value,
        }  # fmt: skip
        (out_dir / "replay_model.json").write_text(json.dumps(info, indent=1, default=str))
        return out_dir

    def final_quality(self, entry: ReplayedRun | None = None) -> float:
        """Expected val_loss of a run's configuration at the step it reached (default: last run)."""
        entry = entry or self.history[-1]
        return self.recording.expected_value(entry.config, entry.run_config, entry.step)


class MemoryStorage(optuna.storages.InMemoryStorage):
    """Optuna's in-memory storage plus the heartbeat calls the driver makes (no-ops here):
    a replayed study has one worker in one process, so there is no dead worker to detect."""

    def get_heartbeat_interval(self) -> int | None:
        return None

    def record_heartbeat(self, trial_id: int) -> None:
        pass


@dataclass
class ReplayOutcome:
    """One replayed study, end to end."""

    final_quality: float
    """Expected val_loss of the final configuration at the final run's horizon."""
    final_params: dict[str, Any]
    final_trial: int | None
    final_steps: int
    final_train_s: float
    spent_s: float
    n_trials: int
    n_complete: int
    n_pruned: int


def replay_study(study: Study, backend: ReplayBackend) -> ReplayOutcome:
    """Run the real driver on `backend`, keeping nothing: a study in seconds, not GPU-hours.

    The study's sampler, pruner, budget and space apply as written; its run directory and
    storage are replaced by a temporary folder (in memory where the system has /dev/shm) with
    a SQLite file for the ledger and worker registry, and Optuna's trials are kept in memory.
    """
    from budgetune.search.driver import Driver
    from budgetune.search.storage import make_pruner, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="budgetune-replay-", dir=shm) as tmp:
        s = dataclasses.replace(study, storage=f"sqlite:///{tmp}/study.db", run_dir=Path(tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ostudy = optuna.create_study(
                storage=MemoryStorage(), sampler=make_sampler(s), pruner=make_pruner(s),
                study_name=s.name, direction="minimize",
            )  # fmt: skip
        driver = Driver(s, ostudy, backend)
        driver.run()
        spent = driver.ledger.totals().spent_s
        driver.ledger.close()
    trials = [t for t in ostudy.get_trials(deepcopy=False) if t.state.is_finished()]
    states = [t.state for t in trials]
    final = backend.history[-1]
    return ReplayOutcome(
        final_quality=backend.final_quality(final),
        final_params=dict(ostudy.user_attrs.get("final.params") or {}),
        final_trial=ostudy.user_attrs.get("final.trial"),
        final_steps=final.step,
        final_train_s=final.elapsed_s,
        spent_s=spent,
        n_trials=len(trials),
        n_complete=states.count(optuna.trial.TrialState.COMPLETE),
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
    )
