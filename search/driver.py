"""The budgeted search loop: trials within the search share, then one final run.

`Driver(study, ostudy, backend).run()` does, in one worker process:

1. Recover (before every trial, and while waiting; see `recovery.py`): open reservations
   of dead workers are released (their charges stay); a RUNNING trial whose worker is dead
   (see `workers.py`) is closed as FAIL with `outcome=continued`, and a new trial with the
   SAME parameters, `continues=<old>` and the old trial's directory (the engine resumes from
   its checkpoint) is enqueued; it re-reports the old intermediate values for the pruner.
   Costs are counted once: each trial's cost attributes are its own ledger rows.
2. Search: reserve (see `ledger.py`) -> ask -> sample -> skip a configuration known not to
   fit (at or beyond an OOM'd micro-batch, rank and length: PRUNED, `reason=oom-frontier`,
   zero cost) -> run through the backend, reporting validation loss at optimizer steps to
   the pruner -> score -> tell. Out-of-memory trials are told PRUNED (not FAIL: Optuna's
   samplers ignore failed trials) with `Trial.set_constraint("oom", 1)`, which TPE uses to
   steer away; diverged trials are PRUNED with their reason; any other error is FAIL with
   its message; none stops the study (a `UserInputError` does: the study itself is wrong).
3. Final: once no trial can start here, the worker claims the final run; the claim succeeds
   only when no trial is in flight on any worker, so a worker whose search is over waits
   (idle, not charged) for the others' trials, each of which may free budget for one more
   trial. Exactly one worker wins the claim; the others stop. The best complete trial's
   parameters (the default configuration if none completed) are trained in
   `run_dir/final` on everything that remains (`max_seconds` = allotment - tail, so the
   engine fits its schedule to it), scored, merged and exported to `run_dir/final/export`;
   results and paths go into study user attrs `final.*`.

Ctrl-C (`request_stop`) makes the running trial or final run checkpoint and return; the
ledger is written, the trial stays RUNNING (the next resume continues it) and
`KeyboardInterrupt` propagates (the CLI exits 130). Many workers may run one study at once,
each its own `Driver` in its own process (see `workers.py` and the README's "Several GPUs").
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from budgetune.engine.errors import Diverged, OutOfMemory, RunFailed, UserInputError
from budgetune.engine.events import RunResult
from budgetune.search.backends import Score, TrialBackend, final_val_loss
from budgetune.search.ledger import FinalClaim, Ledger, Meter, Reservation
from budgetune.search.monitor import FinalReporter, Heartbeat, TrialReporter
from budgetune.search.progress import NullProgress, Progress
from budgetune.search.recovery import recover
from budgetune.search.space import AlphaRatio
from budgetune.search.study import Study
from budgetune.search.workers import HEARTBEAT_S, WorkerRegistry

OUTCOMES = ("complete", "pruned", "oom", "diverged", "failed", "skipped", "continued")
MAX_SKIPS = 100
"""Consecutive frontier skips after which the search gives up (the space is all too big)."""


def new_worker_id() -> str:
    """host:pid:uuid, recorded on every trial and ledger row."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Frontier:
    """Configurations known not to fit: (micro_batch, rank, max_seq_length) that OOM'd."""

    points: list[tuple[int, int, int]] = field(default_factory=list)

    def blocks(self, mb: int, rank: int, length: int) -> tuple[int, int, int] | None:
        for p in self.points:
            if mb >= p[0] and rank >= p[1] and length >= p[2]:
                return p
        return None


def _score_attrs(score: Any) -> dict[str, Any]:
    """A trial's eval as user attrs: per-task results (`eval_tasks`, `holdout_tasks`), the
    search and holdout scores and their standard errors (what the overfitting guard reads
    back through `GuardRow.from_attrs`); a value the backend did not measure is left out."""
    out: dict[str, Any] = {}
    if score.tasks:
        out["eval_tasks"] = score.tasks
    if getattr(score, "holdout_tasks", None):
        out["holdout_tasks"] = score.holdout_tasks
    for k in ("search_score", "search_stderr", "holdout_score", "holdout_stderr"):
        if getattr(score, k, None) is not None:
            out[k] = getattr(score, k)
    return out


class Driver:
    """Runs one study to its end (or to Ctrl-C) in this process; see the module docstring."""

    def __init__(
        self,
        study: Study,
        ostudy: optuna.Study,
        backend: TrialBackend,
        *,
        worker_id: str | None = None,
        progress: Progress | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.study = study
        self.ostudy = ostudy
        self.backend = backend
        self.worker_id = worker_id or new_worker_id()
        self.progress: Progress = progress or NullProgress()
        self.ledger = Ledger(study.storage, study.name, self.worker_id)
        b = study.budget
        self.ledger.create(b.total_s, b.final_reserve_s, b.margin)
        self.meter = Meter(self.ledger, backend.clock)
        self.workers = WorkerRegistry(study.storage, study.name, self.worker_id, heartbeat_s,
                                      on_evicted=self.request_stop)  # fmt: skip
        self._poll_s = min(2.0, heartbeat_s)
        self._said: set[str] = set()
        self._after_s = 0.0
        self.stop_requested = False
        self.storage = ostudy._storage
        self._spent_cache = 0.0

    # --- bookkeeping ------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the trial or final run in flight to checkpoint and return (Ctrl-C)."""
        self.stop_requested = True

    def ledger_spent(self) -> float:
        return self._spent_cache

    def _refresh_spent(self) -> float:
        self._spent_cache = self.ledger.totals().spent_s
        return self._spent_cache

    def _set_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial_id, k, v)

    def _check_interrupt(self) -> None:
        if self.stop_requested:
            self.meter.charge("overhead")
            if self.workers.evicted:
                raise RunFailed(
                    f"worker {self.worker_id} missed its heartbeats and was presumed dead; "
                    "another worker took its work over (`budgetune resume` joins again)"
                )
            raise KeyboardInterrupt

    def say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.progress.log(message)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Search until the search share is spent, then the final run; idempotent on resume."""
        b = self.study.budget
        self.progress.begin(self.study.name, b.total_s)
        self.workers.register()
        try:
            with self.workers.beating():
                if sum(w.alive for w in self.workers.workers()) > 1:
                    # the study's seed is taken: another sequence, or workers sample alike
                    self.ostudy.sampler.reseed_rng()
                self._refresh_spent()
                claim = self.ledger.final_claim()
                if claim is not None and claim.state == "done":
                    return
                if claim is not None and self.workers.liveness().get(claim.worker_id, False):
                    self.progress.log(f"final run: held by worker {claim.worker_id}; nothing to do")
                    return  # before loading a model for nothing
                recover(self)
                self.backend.setup()
                self.meter.charge("overhead")
                claim = self._search()
                if claim is not None:
                    self._final(claim)
        finally:
            self.meter.charge("overhead")
            self.workers.stop()
            self.workers.close()
            self.progress.end()

    def _search(self) -> FinalClaim | None:
        """Trials until none can start here, then the final claim (None: not this worker's)."""
        skips = 0
        while True:
            self._check_interrupt()
            recover(self)
            if self.ledger.final_claim() is None and skips < MAX_SKIPS:
                more, skipped = self._search_one()
                if more:
                    skips = skips + 1 if skipped else 0
                    continue
            claim = self.ledger.claim_final(self._final_params(), is_stale=self.workers.is_dead)
            if claim is not None:
                if claim.state == "done":
                    return None
                self._abandon_waiting()
                return claim
            holder = self.ledger.final_claim()
            if holder is not None:
                self.progress.log(f"final run: held by worker {holder.worker_id}; this one stops")
                return None
            self._wait_for_trials()

    def _wait_for_trials(self) -> None:
        """Idle a moment while other workers' trials are in flight (polling is not spent)."""
        self.meter.skip()
        self.workers.set_activity("waiting")
        self.say_once("search over here: waiting for the trials in flight on other workers")
        end = time.monotonic() + self._poll_s
        while time.monotonic() < end and not self.stop_requested:
            time.sleep(0.05)
        self.meter.skip()

    def _logical_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Trials that count as one search step each (not skips, not superseded ones)."""
        return [
            t
            for t in self.ostudy.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("outcome") not in ("skipped", "continued")
        ]

    def _enough(self) -> bool:
        done = self._logical_trials()
        if self.study.max_trials is not None:
            # trials in flight on other workers count: max_trials holds across workers
            running = self.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len(done) + len(running) >= self.study.max_trials:
                return True
        if self.study.patience is not None:
            best, since = math.inf, 0
            for t in sorted(done, key=lambda t: t.number):
                if t.state == TrialState.COMPLETE and t.value is not None and t.value < best:
                    best, since = t.value, 0
                else:
                    since += 1
            return since >= self.study.patience and best < math.inf
        return False

    def _search_one(self) -> tuple[bool, bool]:
        """One trial. Returns (go on searching, this trial was a frontier skip)."""
        self._check_interrupt()
        waiting = self.ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and self._enough():
            return False, False
        b = self.study.budget
        want = b.trial_s
        if waiting:
            w = waiting[0].user_attrs
            want = max(b.min_trial, w.get("prior_reserved_s", want) - w.get("prior_cost_s", 0.0))
        res = self.ledger.reserve_trial(want, b.min_trial)
        if res is None:
            return False, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = self.ostudy.ask()
        self.ledger.attach(res, trial.number)
        self.workers.set_activity("trial", trial.number)
        try:
            skipped = self._run_trial(trial, res)
        finally:
            # the bookkeeping of the trial (tell, attrs) is spent within its reservation: with
            # several workers holding all the search share, unreserved time would eat the
            # final run's reserve
            self._after_s = self.meter.charge("overhead", None, res)
            self.ledger.release(res)
            self._refresh_spent()
        return True, skipped

    def _run_trial(self, trial: optuna.Trial, res: Reservation) -> bool:
        study, b = self.study, self.study.budget
        attrs = trial.user_attrs
        prior = attrs.get("continues")
        params = study.space.suggest(trial)
        tid = trial._trial_id
        trial_dir = Path(attrs.get("trial_dir") or study.run_dir / "trials" / str(trial.number))
        stored = attrs.get("horizon_s")  # a continuation keeps its trial's LR schedule
        horizon = float(stored or max(1.0, res.seconds - b.trial_setup_s - b.trial_eval_s))
        config = study.run_config(trial_dir, params, max_seconds=horizon)
        start = {"worker_id": self.worker_id, "trial_dir": str(trial_dir),
                 "reserved_s": res.seconds}  # fmt: skip
        if isinstance(study.space.params.get("lora_alpha"), AlphaRatio):
            start["lora_alpha"] = params["lora_alpha"]
        for src, w in (params.get("weights") or {}).items():
            start[f"weight.{src}"] = w
        if prior is not None:
            self._relink(prior, trial)
        self._set_attrs(tid, start)
        blocked = self._frontier().blocks(config.micro_batch, config.lora.r, config.max_seq_length)
        if blocked is not None:
            mb, rank, length = blocked
            reason = (
                f"oom-frontier: micro_batch>={mb}, rank>={rank}, length>={length} ran out of memory"
            )
            self._finish(trial, "skipped", TrialState.PRUNED, reason=reason, infeasible=True)
            self.progress.log(f"trial {trial.number}: skipped ({reason})")
            return True
        self.progress.trial(trial.number, params)
        # asking and sampling now, and the bookkeeping after it (as long as the last trial's),
        # come out of the trial's allowance
        used = self.meter.charge("overhead", None, res) + self._after_s
        reporter = TrialReporter(self, trial, dataclasses.replace(res, seconds=res.seconds - used))
        if not stored:
            # so does the horizon: trained past the reporter's allowance, a run is stopped
            # before its final validation and the trial is spent with no score
            horizon = max(1.0, horizon - used)
            config = dataclasses.replace(config, max_seconds=horizon)
            self._set_attrs(tid, {"horizon_s": horizon})
        reporter.phase("setup")
        extra: dict[str, Any] = {}
        try:
            with Heartbeat(self.storage, tid, self.storage.get_heartbeat_interval() or 60):
                result = self.backend.run(config, reporter, resume=prior is not None)
            if reporter.interrupted:
                reporter.phase(None)
                if self.workers.evicted:
                    return False  # another worker continues this trial: tell it nothing
                self._set_attrs(tid, self._cost_attrs(reporter.costs))
                raise KeyboardInterrupt
            extra = self._result_attrs(result)
            if reporter.pruned:
                reporter.phase(None)
                self._finish(trial, "pruned", TrialState.PRUNED, reporter, extra,
                             reason=f"pruned at step {result.step}")  # fmt: skip
                return False
            val = final_val_loss(result)
            if val is None or not math.isfinite(val):
                reporter.phase(None)
                self._finish(trial, "failed", TrialState.FAIL, reporter, extra,
                             reason="no validation loss within the allowance")  # fmt: skip
                return False
            if reporter.out_of_time:
                # The reservation ran out before the horizon: score what was reached, no eval.
                reporter.phase(None)
                extra["reason"] = "stopped at its allowance"
                self._finish(trial, "complete", TrialState.COMPLETE, reporter, extra, value=val)
                return False
            reporter.phase("eval")
            previous = [t.value for t in self.ostudy.get_trials(deepcopy=False,
                        states=(TrialState.COMPLETE,)) if t.value is not None]  # fmt: skip
            score = self.backend.score(result, previous)
            reporter.phase(None)
            extra["val_loss"] = val
            extra.update(_score_attrs(score))
            self._finish(trial, "complete", TrialState.COMPLETE, reporter, extra, value=score.value)
        except OutOfMemory as e:
            reporter.phase(None)
            extra = {"micro_batch": e.micro_batch, "max_seq_length": e.max_seq_length,
                     "rank": config.lora.r, "peak_memory_bytes": e.peak_memory_bytes}  # fmt: skip
            self._finish(
                trial, "oom", TrialState.PRUNED, reporter, extra, reason=str(e), infeasible=True
            )
        except Diverged as e:
            reporter.phase(None)
            self._finish(
                trial,
                "diverged",
                TrialState.PRUNED,
                reporter,
                {"diverged_step": e.step},
                reason=str(e),
            )
        except UserInputError as e:
            reporter.phase(None)
            self._finish(trial, "failed", TrialState.FAIL, reporter, reason=str(e))
            raise
        except Exception as e:
            reporter.phase(None)
            self._finish(
                trial, "failed", TrialState.FAIL, reporter, reason=f"{type(e).__name__}: {e}"
            )
        return False

    def _relink(self, prior: int, trial: optuna.Trial) -> None:
        """A continuation re-reports its predecessor's intermediate values for the pruner."""
        old = self.ostudy.get_trials(deepcopy=False)[prior]
        for step, value in sorted(old.intermediate_values.items()):
            trial.report(value, step)
        self.progress.log(f"trial {trial.number}: continues trial {prior} from its checkpoint")

    def _frontier(self) -> _Frontier:
        f = _Frontier()
        for t in self.ostudy.get_trials(deepcopy=False):
            a = t.user_attrs
            if a.get("outcome") == "oom":
                f.points.append((int(a["micro_batch"]), int(a["rank"]), int(a["max_seq_length"])))
        return f

    @staticmethod
    def _cost_attrs(costs: dict[str, float]) -> dict[str, float]:
        return {
            "cost_s": sum(costs.values()),
            "cost_train_s": costs.get("train", 0.0),
            "cost_eval_s": costs.get("eval", 0.0),
            "cost_setup_s": costs.get("setup", 0.0),
        }

    @staticmethod
    def _result_attrs(result: RunResult) -> dict[str, Any]:
        keep = ("tokens_per_s", "nonpad_tokens_per_s", "peak_memory_bytes", "padding_fraction")
        out: dict[str, Any] = {k: float(result.metrics[k]) for k in keep if k in result.metrics}
        out.update({"steps": result.step, "tokens_seen": result.tokens_seen})
        return out

    def _finish(
        self,
        trial: optuna.Trial,
        outcome: str,
        state: TrialState,
        reporter: TrialReporter | None = None,
        extra: dict[str, Any] | None = None,
        *,
        value: float | None = None,
        reason: str | None = None,
        infeasible: bool = False,
    ) -> None:
        if self.workers.evicted:
            return  # the trial was taken over by another worker while this one was "dead"
        attrs = dict(extra or {})
        attrs.update(self._cost_attrs(reporter.costs if reporter else {}))
        attrs["outcome"] = outcome
        if reason is not None:
            attrs["reason"] = reason
        attrs.setdefault("reason", "")
        self._set_attrs(trial._trial_id, attrs)
        if infeasible:
            trial.set_constraint("oom", 1.0)
        self.ostudy.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        best = self._best_value()
        self.progress.trial_done(trial.number, outcome, value, best)

    def _best_value(self) -> float | None:
        try:
            return self.ostudy.best_value
        except ValueError:
            return None

    # --- the end of the search ---------------------------------------------------------

    def _abandon_waiting(self) -> None:
        """Continuations the search budget could not hold are closed, not left WAITING."""
        for t in self.ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial = self.ostudy.ask()
            self.study.space.suggest(trial)
            self._finish(
                trial, "failed", TrialState.FAIL, reason="no search budget left to continue it"
            )
            del t

    # --- the final run ------------------------------------------------------------------

    def _final_params(self) -> dict[str, Any]:
        try:
            best = self.ostudy.best_trial
        except ValueError:
            return {"trial": None, "params": {}}
        params = dict(best.params)
        weights = {
            k[len("weight.") :]: v for k, v in best.user_attrs.items() if k.startswith("weight.")
        }
        if weights:
            params["weights"] = weights
        if "lora_alpha" in best.user_attrs:
            params["lora_alpha"] = best.user_attrs["lora_alpha"]
        return {"trial": best.number, "params": params, "value": best.value}

    def _final(self, claim: FinalClaim) -> None:
        self._check_interrupt()
        b = self.study.budget
        self.meter.charge("overhead")
        self.workers.set_activity("final")
        if claim.config.get("trial") is None:
            self.progress.log("no trial completed: the final run uses the default configuration")
        params = dict(claim.config.get("params") or {})
        final_dir = self.study.run_dir / "final"
        max_seconds = max(1.0, claim.allotment_s - b.final_tail - b.trial_setup_s)
        config = self.study.run_config(final_dir, params, max_seconds=max_seconds)
        spent = self._refresh_spent()
        reporter = FinalReporter(self, b.total_s - b.final_tail, spent)
        self.progress.log(
            f"final run: trial {claim.config.get('trial')}'s configuration, {max_seconds:.0f} s"
        )
        attrs: dict[str, Any] = {
            "final.trial": claim.config.get("trial"),
            "final.params": params,
            "final.allotment_s": claim.allotment_s,
            "final.run_dir": str(final_dir),
        }
        try:
            result = self.backend.run(config, reporter, resume=True)
        except (OutOfMemory, Diverged) as e:
            reporter.phase(None)
            attrs.update({"final.status": e.reason, "final.reason": str(e)})
            self._close_final(attrs)
            return
        if reporter.interrupted:
            reporter.phase(None)
            self._check_interrupt()
        # What is left for the final eval: the budget, minus what export needs (half the tail).
        left = b.total_s - reporter.spent_s - self.meter.pending() - b.final_tail / 2
        try:
            score = self._score_final(result, left)
        except Exception as e:  # a failed eval (a dataset out of reach) must not lose the model
            attrs["final.eval_error"] = f"{type(e).__name__}: {e}"
            self.progress.log(f"final run: eval failed ({attrs['final.eval_error']}); exporting")
            val = final_val_loss(result)
            score = Score(float("nan") if val is None else val)
        reporter.phase(None)
        export_dir = self.backend.export(final_dir / "export")
        reporter.phase(None)
        attrs.update({
            "final.status": "completed" if result.status == "completed" else "stopped at budget",
            "final.val_loss": final_val_loss(result),
            "final.tasks": score.tasks,
            "final.search_score": score.search_score,
            "final.search_stderr": getattr(score, "search_stderr", None),
            "final.holdout_score": score.holdout_score,
            "final.holdout_stderr": getattr(score, "holdout_stderr", None),
            "final.holdout_tasks": getattr(score, "holdout_tasks", None) or {},
            "final.eval_limit": getattr(self.backend, "final_eval_limit", None),
            "final.steps": result.step,
            "final.tokens_seen": result.tokens_seen,
            "final.train_s": result.elapsed_s,
            "final.export_dir": str(export_dir),
            "final.curve": [[e.step, e.metrics.get("val_loss")] for e in result.curve],
            **{f"final.{k}": float(v) for k, v in result.metrics.items()
               if k in ("tokens_per_s", "peak_memory_bytes", "padding_fraction")},
        })  # fmt: skip
        self._close_final(attrs)

    def _score_final(self, result: RunResult, seconds_left: float) -> Any:
        """The backend's final eval, told the seconds left when it accepts them (backends
        written before `seconds_left` joined the protocol take the result alone)."""
        params = inspect.signature(self.backend.score_final).parameters
        if "seconds_left" in params:
            return self.backend.score_final(result, seconds_left=seconds_left)
        return self.backend.score_final(result)

    def _close_final(self, attrs: dict[str, Any]) -> None:
        attrs["final.cost_s"] = (
            self.ledger.totals().by_category.get("final", 0.0) + self.meter.pending()
        )
        for k, v in attrs.items():
            self.ostudy.set_user_attr(k, v)
        self.ledger.finish_final()
        self.progress.log(f"final run: {attrs.get('final.status')}")
