"""Trial backends: "run these parameters within this allowance, report through this reporter".

The driver never trains anything itself. A `TrialBackend` runs one configuration (a
`RunConfig`: horizon, run directory, everything) and talks back through a `Reporter`: it
says which phase its time belongs to (`setup`, `train`, `eval`: the ledger's categories),
hands every `EvalEvent` to `report` (True means: stop, this trial is pruned), and polls
`should_stop` every optimizer step (Ctrl-C, or the trial's reservation is used up).

- `EngineBackend` is the real one: one `budgetune.engine.train.Worker` per process (the base
  model loads once), a fresh adapter per trial, the short-horizon eval through an
  `Objective` on the in-memory model (the seam for `search/evaluation.py`).
- `FakeBackend` simulates learning curves, throughput, out-of-memory and divergence from the
  parameters, in virtual time (the driver's tests run in milliseconds) or in real time (a
  real process can be interrupted mid-trial). It checkpoints and resumes like the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from budgetune.engine.config import RunConfig
from budgetune.engine.errors import Diverged, OutOfMemory
from budgetune.engine.events import EvalEvent, RunResult
from budgetune.search.study import FakeSpec


class Reporter(Protocol):
    """How a backend talks to the driver while it runs a configuration."""

    def phase(self, name: str) -> None:
        """Book the time so far to the current phase, then switch (`setup`/`train`/`eval`)."""

    def report(self, event: EvalEvent) -> bool:
        """One validation pass; True asks the run to stop (pruned)."""

    def should_stop(self) -> bool:
        """Polled every optimizer step; True makes the run checkpoint and stop."""


@dataclass
class Score:
    """A trial's short-horizon eval: the objective (minimized) and per-task results."""

    value: float
    tasks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    search_score: float | None = None
    """Weighted normalized score of the search tasks (None: objective = validation loss)."""
    holdout_score: float | None = None
    """Holdout tasks (never part of the objective), on top trials and the final model."""
    search_stderr: float | None = None
    """Standard error of `search_score` (None: unknown); the overfitting guard ignores
    differences within a few of these, because short-horizon evals are noisy."""
    holdout_stderr: float | None = None
    """Standard error of `holdout_score` (None: unknown)."""
    holdout_tasks: dict[str, Any] = field(default_factory=dict)
    """Per-task results of the holdout tasks, keyed by task (empty when none ran)."""


class Objective(Protocol):
    """Scores a trained model in memory (`search/evaluation.py`'s Evaluator fits this).

    Optional methods, used when present: `is_holdout_candidate(value, previous_values)` and
    `holdout(model, tokenizer, out_dir)` (holdout tasks on the best trials), and
    `final(model, tokenizer, out_dir)` (the final model's full eval).
    """

    def score_trial(
        self, model: Any, tokenizer: Any, val_loss: float | None, out_dir: Path | None = None
    ) -> Any:
        """Returns an object with `value` (minimized), `tasks` and `seconds`."""


class ValLossObjective:
    """The default objective: the validation loss the run ended with; costs nothing more."""

    def score_trial(
        self, model: Any, tokenizer: Any, val_loss: float | None, out_dir: Path | None = None
    ) -> Score:
        return Score(value=float("nan") if val_loss is None else float(val_loss))


class TrialBackend(Protocol):
    clock: Callable[[], float]
    """Seconds; the ledger's `Meter` reads time from the backend so fakes can be virtual."""

    def setup(self) -> None:
        """Load what every run shares (the base model), once per worker."""

    def run(self, config: RunConfig, reporter: Reporter, resume: bool = True) -> RunResult:
        """Train one configuration; raises OutOfMemory, Diverged, UserInputError."""

    def score(self, result: RunResult, previous: list[float] | None = None) -> Score:
        """The short-horizon eval of the run just trained (in memory); `previous` holds the
        objective values of earlier trials (holdout tasks run only on the best ones)."""

    def score_final(self, result: RunResult, seconds_left: float | None = None) -> Score:
        """The final model's full eval (in memory), within `seconds_left` when given."""

    def export(self, out_dir: Path) -> Path:
        """Merge the last run's adapter into the base and save it; returns the folder."""

    def close(self) -> None:
        """Free what setup loaded."""


def fair_cap(demands: list[int | None], docs: float) -> int | None:
    """The largest per-task example cap c with sum(min(demand, c)) <= docs (water-filling:
    tasks asking for fewer keep all of theirs, the rest share what is left evenly); None
    when every demand fits as it is. A demand of None (no limit) never fits."""
    bounded = sorted(d for d in demands if d is not None)
    used = 0
    for i, d in enumerate(bounded):
        sharing = len(demands) - i
        if used + d * sharing > docs:
            return max(0, int((docs - used) // sharing))
        used += d
    unbounded = len(demands) - len(bounded)
    return max(0, int((docs - used) // unbounded)) if unbounded else None


def final_val_loss(result: RunResult) -> float | None:
    """The last validation loss a run measured (its final metrics, else its curve)."""
    v = result.metrics.get("val_loss")
    if v is None and result.curve:
        v = result.curve[-1].metrics.get("val_loss")
    return None if v is None else float(v)


class EngineBackend:
    """The real backend: the Fabric engine's `Worker`, one base model per process."""

    clock = staticmethod(time.monotonic)

    def __init__(self, model: str, precision: str, quantize: str | None = None,
                 objective: Objective | None = None, quiet: bool = True) -> None:  # fmt: skip
        self.model_name = model
        self.precision = precision
        self.quantize = quantize
        self.objective: Objective = objective or ValLossObjective()
        self.quiet = quiet
        self.worker: Any = None
        self._eval_docs_per_s = 0.0
        self.final_eval_limit: int | None = None
        """Examples per task the final eval was cut to (None: as configured; 0: no time)."""
        # Import torch & co. now, before the driver's clock starts: that is process start-up,
        # not time the worker holds the GPU (the model load in setup() is, and is charged).
        from budgetune.engine.train import Worker

        self._worker_cls = Worker

    def setup(self) -> None:
        if self.worker is None:
            self.worker = self._worker_cls(
                self.model_name, precision=self.precision, quantize=self.quantize, quiet=self.quiet
            )

    def run(self, config: RunConfig, reporter: Reporter, resume: bool = True) -> RunResult:
        self.setup()
        reporter.phase("train")
        return self.worker.run(
            config, callbacks=[reporter.report], stop_check=reporter.should_stop, resume=resume
        )

    def score(self, result: RunResult, previous: list[float] | None = None) -> Score:
        model, tok, out = self.worker.model, self.worker.tokenizer, result.out_dir
        s = self.objective.score_trial(model, tok, final_val_loss(result), out_dir=out)
        score = Score(
            float(s.value),
            dict(getattr(s, "tasks", {}) or {}),
            float(s.seconds),
            search_score=getattr(s, "search_score", None),
            search_stderr=getattr(s, "search_stderr", None),
        )
        docs = sum(int(t.get("n_examples", 0)) for t in score.tasks.values())
        if docs and s.seconds > 0:
            self._eval_docs_per_s = docs / float(s.seconds)
        is_candidate = getattr(self.objective, "is_holdout_candidate", None)
        if is_candidate is not None and is_candidate(score.value, previous or []):
            h = self.objective.holdout(model, tok, out_dir=out)  # type: ignore[attr-defined]
            score.holdout_score, score.seconds = h.score, score.seconds + h.seconds
            score.holdout_stderr = getattr(h, "stderr", None)
            score.holdout_tasks = dict(getattr(h, "tasks", {}) or {})
        return score

    def score_final(self, result: RunResult, seconds_left: float | None = None) -> Score:
        val = final_val_loss(result)
        value = float("nan") if val is None else val
        final = getattr(self.objective, "final", None)
        if final is None:
            return Score(value)
        settings = self._capped(seconds_left)
        if settings is False:
            return Score(value)  # not one example per task fits in the time left
        swap = settings is not None
        if swap:  # the same Evaluator (its lm-eval task index is built), with cut limits
            configured, self.objective.settings = self.objective.settings, settings  # type: ignore[attr-defined]
        try:
            f = final(self.worker.model, self.worker.tokenizer, out_dir=result.out_dir)
        finally:
            if swap:
                self.objective.settings = configured  # type: ignore[attr-defined]
        h = f.holdout
        return Score(
            value, dict(f.tasks), float(f.seconds),
            search_score=f.search_score, holdout_score=h.score if h is not None else None,
            search_stderr=getattr(f, "search_stderr", None),
            holdout_stderr=getattr(h, "stderr", None) if h is not None else None,
            holdout_tasks=dict(h.tasks) if h is not None else {},
        )  # fmt: skip

    def _capped(self, seconds_left: float | None) -> Any:
        """The objective's settings with the final eval's example limits cut to fit
        `seconds_left`; None: run as configured; False: not even one example per task fits.

        The final eval runs three sections (final, search and holdout tasks), so all three
        are cut: a final model's search score on fewer examples (the first ones of the same
        set) is noisier, which its standard error says, but an eval past the budget is not
        allowed. The rate is the documents per second the trials' evals reached; 80% of the
        time left is shared out as `fair_cap` says. Without a measured rate (no trial was
        scored by tasks) the final eval runs as configured.
        """
        settings = getattr(self.objective, "settings", None)
        if seconds_left is None or settings is None or not self._eval_docs_per_s:
            return None
        sections = {k: getattr(settings, k) for k in ("final", "search", "holdout")}
        demands = [t.limit for tasks in sections.values() for t in tasks]
        if not demands:
            return None
        docs = 0.8 * max(0.0, seconds_left) * self._eval_docs_per_s
        cap = fair_cap(demands, docs)
        self.final_eval_limit = cap
        if cap is None:
            return None
        if cap < 1:
            return False
        cut = {
            k: [dataclasses.replace(t, limit=min(t.limit, cap) if t.limit else cap) for t in v]
            for k, v in sections.items()
        }
        return dataclasses.replace(settings, **cut)

    def export(self, out_dir: Path) -> Path:
        return Path(self.worker.export_merged(Path(out_dir)))

    def close(self) -> None:
        self.worker = None


class VirtualClock:
    """Time that passes only when the fake backend says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# How good each quickstart-style source is for the fake's loss floor (unknown names: 0.5).
_SOURCE_QUALITY = {"dolly": 1.0, "alpaca": 0.9, "oasst1": 0.7, "flan": 0.4}


class FakeBackend:
    """Simulated runs whose loss, speed, memory and failures follow from the parameters.

    Loss: floor + (3 - floor) * exp(-step / 25), with the floor lowest at lr = 3e-3, rank 16
    and a mixture weighted to the better sources. Time per optimizer step:
    `step_s * grad_accum * (0.5 + 0.5 * micro_batch) * (1 + rank / 64)`, evals cost one
    micro-batch each. OOM above `memory_limit` (micro_batch * rank * max_seq_length), divergence
    above `diverge_lr` (at the second eval). Checkpoints at every eval to
    `out_dir/checkpoints/fake.json`; resumes from it like the engine does.
    """

    def __init__(self, spec: FakeSpec | None = None, clock: str | None = None,
                 eval_s: float = 0.0) -> None:  # fmt: skip
        self.spec = spec or FakeSpec()
        kind = clock or self.spec.clock
        self._virtual = VirtualClock() if kind == "virtual" else None
        self.clock: Callable[[], float] = self._virtual or time.monotonic
        self.eval_s = eval_s
        self.setups = 0
        self.runs: list[RunConfig] = []
        self.last: RunConfig | None = None
        self.exported: list[Path] = []

    def sleep(self, seconds: float) -> None:
        if self._virtual is not None:
            self._virtual.sleep(seconds)
        elif seconds > 0:
            time.sleep(seconds)

    def setup(self) -> None:
        self.setups += 1

    def close(self) -> None:
        pass

    def _floor(self, c: RunConfig) -> float:
        lr_term = 0.25 * math.log10(c.learning_rate / 3e-3) ** 2
        rank_term = 0.03 * abs(math.log2(c.lora.r / 16))
        weights = c.weights or {s.name: 1.0 for s in c.sources}
        total = sum(weights.values()) or 1.0
        quality = sum(w * _SOURCE_QUALITY.get(n, 0.5) for n, w in weights.items()) / total
        return 1.0 + lr_term + rank_term + 0.4 * (1 - quality)

    def _step_s(self, c: RunConfig) -> float:
        per_micro = self.spec.step_s * (0.5 + 0.5 * c.micro_batch) * (1 + c.lora.r / 64)
        return per_micro * c.grad_accum

    def _total_steps(self, c: RunConfig, step_s: float, eval_s: float) -> int:
        if c.max_steps is not None:
            return c.max_steps
        if c.max_tokens is not None:
            return max(1, math.ceil(c.max_tokens / (c.global_batch * 100)))
        per_step = step_s + eval_s / c.eval_interval
        return max(1, int((c.max_seconds or 0) // per_step))

    def run(self, config: RunConfig, reporter: Reporter, resume: bool = True) -> RunResult:
        c = config
        self.runs.append(c)
        self.last = c
        reporter.phase("setup")
        self.sleep(self.spec.setup_s)
        reporter.phase("train")
        ckpt = Path(c.out_dir) / "checkpoints" / "fake.json"
        state = {"step": 0, "elapsed_s": 0.0, "curve": []}
        if resume and ckpt.exists():
            state = json.loads(ckpt.read_text())
        step_s = self._step_s(c)
        eval_s = self.spec.step_s * (0.5 + 0.5 * c.micro_batch)
        memory = c.micro_batch * c.lora.r * c.max_seq_length
        if self.spec.memory_limit and memory > self.spec.memory_limit:
            self.sleep(step_s / c.grad_accum)
            raise OutOfMemory(c.micro_batch, c.max_seq_length, memory * 1000)
        total = self._total_steps(c, step_s, eval_s)
        floor = self._floor(c)
        diverge = bool(self.spec.diverge_lr) and c.learning_rate > self.spec.diverge_lr
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        curve = [EvalEvent(**e) for e in state["curve"]]
        tokens_per_step = c.global_batch * 100
        status = "completed"
        while step < total:
            if reporter.should_stop():
                status = "stopped"
                break
            self.sleep(step_s)
            elapsed += step_s
            step += 1
            if step % c.eval_interval and step != total:
                continue
            self.sleep(eval_s)
            elapsed += eval_s
            loss = floor + (3.0 - floor) * math.exp(-step / 25)
            if diverge:
                loss = 3.0 * (1 + step / c.eval_interval)
            ev = EvalEvent(
                step, step * tokens_per_step, elapsed, {"val_loss": loss, "lr": c.learning_rate}
            )
            curve.append(ev)
            self._checkpoint(ckpt, step, elapsed, curve)
            if diverge and len(curve) >= 2:
                raise Diverged(step, loss, f"loss above {c.divergence_factor}x its start")
            if reporter.report(ev):
                status = "stopped"
                break
        self._checkpoint(ckpt, step, elapsed, curve)
        metrics = {
            "tokens_per_s": tokens_per_step / step_s,
            "nonpad_tokens_per_s": 0.9 * tokens_per_step / step_s,
            "padding_fraction": 0.1,
            "peak_memory_bytes": float(memory * 1000),
            "step_time_s": step_s,
        }
        if curve:
            metrics["val_loss"] = curve[-1].metrics["val_loss"]
        return RunResult(status, step, step * tokens_per_step, elapsed, metrics, curve, c.out_dir)

    def _checkpoint(self, path: Path, step: int, elapsed: float, curve: list[EvalEvent]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = {"step": step, "elapsed_s": elapsed, "curve": [e.to_dict() for e in curve]}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def score(self, result: RunResult, previous: list[float] | None = None) -> Score:
        self.sleep(self.eval_s)
        # a run stopped before its first eval has no loss (a final run left no time)
        return Score(value=float(result.metrics.get("val_loss", math.nan)), seconds=self.eval_s)

    def score_final(self, result: RunResult, seconds_left: float | None = None) -> Score:
        return self.score(result)

    def export(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        assert self.last is not None
        (out_dir / "fake_model.json").write_text(
            json.dumps({"lr": self.last.learning_rate, "r": self.last.lora.r})
        )
        self.exported.append(out_dir)
        return out_dir
