"""The LoRA finetune loop: a fresh adapter per run on a `Worker`'s base model.

A run reads top to bottom: `setup()` (data, adapter, optimizer, resume) -> `main()` ->
`fit()` (the step loop, with the horizon, evals, checkpoints and stop requests explicit in
it) -> `validate()`. Lightning Fabric owns precision and device placement; peft owns LoRA.

Horizons: optimizer steps, training tokens, or seconds. Whatever the horizon, the number of
optimizer steps is fixed before the cosine schedule needs it, so every run ends its schedule
exactly at its horizon: for tokens, from the mixture's mean example length; for seconds, by
measuring the first optimizer steps and budgeting the evals that will follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric

from budgetune.engine import checkpoint as ckpt
from budgetune.engine.config import RunConfig
from budgetune.engine.data import MixtureSampler, pad_id_for, prepare_data, validation_batches
from budgetune.engine.errors import Diverged, OutOfMemory, UserInputError
from budgetune.engine.events import Callback, EvalEvent, RunResult, StopCheck
from budgetune.engine.memory import MemoryGuard, is_out_of_memory
from budgetune.engine.model import Worker

MEASURE_STEPS = 3
"""Optimizer steps timed before a seconds horizon fixes its step count (the first is warmup
of kernels and allocator, so it is excluded from the estimate when there are more)."""
FINAL_MARGIN = 1.2
"""Headroom on the final eval and saves when the wall clock decides whether one more step fits."""
EMA_DECAY = 0.9
"""Smoothing of the train loss for the divergence test: one bad micro-batch is not divergence."""


def get_lr(
    step: int, *, learning_rate: float, warmup_steps: int, total_steps: int | None,
    min_lr: float = 0.0,
) -> float:  # fmt: skip
    """Learning rate for the update after `step` optimizer steps: linear warmup, then cosine.

    Warmup is capped at half the horizon so short trials still decay. The cosine reaches
    `min_lr` at `step == total_steps`, the horizon, so the last update uses a small, non-zero
    rate. `total_steps=None` (a seconds horizon still measuring throughput) gives warmup only.
    """
    warmup = warmup_steps if total_steps is None else min(warmup_steps, total_steps // 2)
    if step < warmup:
        return learning_rate * (step + 1) / (warmup + 1)
    if total_steps is None:
        return learning_rate
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class _Run:
    """One run's live objects, passed between setup, fit and validate."""

    config: RunConfig
    fabric: Fabric
    model: Any
    optimizer: Any
    sampler: MixtureSampler
    val_batches: list[dict[str, torch.Tensor]]
    progress: ckpt.Progress
    guard: MemoryGuard
    callbacks: Sequence[Callback]
    stop_check: StopCheck | None
    t0: float
    """perf_counter() value at which this run's elapsed time was zero (resumes shift it)."""
    data_stats: dict[str, float]
    quiet: bool
    bar: Any = None
    step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
    """(sampler state, generator states) as the current optimizer step began."""
    writer: ckpt.CheckpointWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = ckpt.CheckpointWriter(self.checkpoint_root)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def metrics_path(self) -> Path:
        return self.config.out_dir / "metrics.jsonl"

    @property
    def checkpoint_root(self) -> Path:
        return self.config.out_dir / "checkpoints"


class _Diverging(Exception):
    """Internal: raised in the loop, re-raised as `Diverged` once the run's memory is freed."""

    def __init__(self, step: int, loss: float, why: str) -> None:
        super().__init__(why)
        self.details = (step, loss, why)


def run_on(
    worker: Worker, config: RunConfig, callbacks: Sequence[Callback] = (),
    stop_check: StopCheck | None = None, resume: bool = True,
) -> RunResult:  # fmt: skip
    """`Worker.run`: one run on the worker's base; a failure leaves the worker as it was.

    `OutOfMemory` and `Diverged` are raised only after the run's adapter, optimizer and
    activations are freed, so the next configuration runs as it would in a fresh process.
    """
    start = time.perf_counter()
    worker.check_compatible(config)
    worker.drop_adapter()
    failure: tuple[str, tuple] | None = None
    try:
        result = main(worker, config, callbacks, stop_check, resume, start)
    except _Diverging as e:
        failure = ("diverged", e.details)
    except Exception as e:
        if not is_out_of_memory(e):
            worker.drop_adapter()
            raise
        failure = ("oom", (getattr(e, "rss_bytes", 0),))
    except BaseException:
        worker.drop_adapter()
        raise
    else:
        worker.last_config = config
        return result
    # Outside the except blocks: the traceback and the loop's frames, which hold the
    # activations, are gone by now, so release_memory() can actually free them.
    guard_peak = worker.last_peak_bytes
    worker.drop_adapter()
    _append_line(config.out_dir / "metrics.jsonl", {"kind": "failed", "reason": failure[0]})
    if failure[0] == "diverged":
        raise Diverged(*failure[1])
    raise OutOfMemory(config.micro_batch, config.max_seq_length, max(guard_peak, *failure[1]))


def run(
    config: RunConfig, callbacks: Sequence[Callback] = (), stop_check: StopCheck | None = None,
    resume: bool = True, quiet: bool = False,
) -> RunResult:  # fmt: skip
    """One run in a fresh worker: for `budgetune train` and scripts that do a single run."""
    worker = Worker(config.model, precision=config.precision, quantize=config.quantize, quiet=quiet)
    return worker.run(config, callbacks, stop_check, resume)


# --- one run -----------------------------------------------------------------------------------


def setup(
    worker: Worker, config: RunConfig, callbacks: Sequence[Callback],
    stop_check: StopCheck | None, resume: bool, start: float,
) -> _Run:  # fmt: skip
    """Data, adapter, optimizer and (when a good checkpoint exists) the resumed state.

    `start` is when the caller began the run: everything from there counts as its time.
    """
    fabric = worker.fabric
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    fabric.seed_everything(config.seed, verbose=False)
    guard = MemoryGuard(fabric.device, config.memory_cap_bytes)
    train_sources, val = prepare_data(config, worker.tokenizer)
    pad_id = pad_id_for(worker.tokenizer)
    sampler = MixtureSampler(train_sources, config.weights, config.micro_batch, pad_id, config.seed)
    val_batches = validation_batches(
        val, config.micro_batch, pad_id, config.eval_batches, max_examples=config.eval_examples
    )
    if not val_batches:
        raise UserInputError(f"{config.val.path}: the validation set is empty")
    peft_model = worker.attach_adapter(config.lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    model, optimizer = fabric.setup(peft_model, optimizer)
    mixture = sampler.mixture
    mean_len = sum(mixture.get(s.name, 0.0) * s.n_tokens / max(1, len(s)) for s in train_sources)
    stats = {
        "n_truncated": sum(s.n_truncated for s in [*train_sources, val]),
        "n_prompt_too_long": sum(s.n_prompt_too_long for s in [*train_sources, val]),
        "n_trainable_params": sum(p.numel() for p in trainable),
        "mean_example_tokens": mean_len,
    }
    progress = ckpt.Progress(
        total_steps=_fixed_total_steps(config, mean_len),
        horizon=[config.max_steps, config.max_tokens, config.max_seconds],
    )
    found = ckpt.load_checkpoint(out / "checkpoints") if resume else None
    if found is None:
        ckpt.clear_run(out)
    run = _Run(config, fabric, model, optimizer, sampler, val_batches, progress, guard,
               callbacks, stop_check, start, stats, worker.quiet)  # fmt: skip
    if found is not None:
        _restore(run, found)
    _write_config(run, worker)
    return run


def main(
    worker: Worker, config: RunConfig, callbacks: Sequence[Callback],
    stop_check: StopCheck | None, resume: bool, start: float,
) -> RunResult:  # fmt: skip
    """Set up, validate once before training, fit, save the adapter, report."""
    run = setup(worker, config, callbacks, stop_check, resume, start)
    finished = False
    try:
        if run.progress.step == 0 and run.progress.initial_val_loss is None:
            t = time.perf_counter()
            run.progress.initial_val_loss = validate(run)
            run.progress.last_eval_s = time.perf_counter() - t
            run.progress.eval_s += run.progress.last_eval_s
            _append_line(run.metrics_path, {"kind": "initial", "step": 0,
                                            "val_loss": run.progress.initial_val_loss})
        run.model.train()  # LoRA dropout on (also when a resume skipped the first validation)
        _mark_step_start(run)
        with _progress_bar(run):
            status = fit(run)
        # The adapter is saved while the last checkpoint is still being written.
        adapter_dir = config.out_dir / "adapter"
        worker._peft.save_pretrained(adapter_dir)
        finished = True
    finally:
        worker.last_peak_bytes = run.guard.peak_bytes()
        run.writer.close(raise_errors=finished)
    worker._peft.eval()
    latest = ckpt.find_checkpoints(run.checkpoint_root)
    elapsed = run.elapsed()
    metrics = _metrics(run, elapsed) | {"model_load_s": worker.model_load_s}
    _append_line(run.metrics_path, {"kind": "final", "status": status, "step": run.progress.step,
                                    "tokens_seen": run.progress.tokens_seen,
                                    "elapsed_s": elapsed, **metrics})  # fmt: skip
    return RunResult(
        status=status, step=run.progress.step, tokens_seen=run.progress.tokens_seen,
        elapsed_s=elapsed, metrics=metrics,
        curve=[EvalEvent(**e) for e in run.progress.curve], out_dir=config.out_dir,
        adapter_dir=adapter_dir, checkpoint_dir=latest[0] if latest else None,
    )  # fmt: skip


def fit(run: _Run) -> str:
    """The step loop. Returns `completed` at the horizon, `stopped` when asked to stop."""
    config, p = run.config, run.progress
    last_eval_step = p.curve[-1]["step"] if p.curve else -1
    try:
        while not _horizon_reached(run):
            if run.stop_check is not None and run.stop_check():
                save_checkpoint(run)
                return "stopped"
            if config.max_seconds is not None and not _next_step_fits(run):
                break
            p.lr = get_lr(p.step, learning_rate=config.learning_rate,
                          warmup_steps=config.warmup_steps, total_steps=p.total_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = p.lr
            t = time.perf_counter()
            loss, n_real, n_batch = train_step(run)
            with ckpt.defer_interrupts():
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                step_s = time.perf_counter() - t
                p.step += 1
                p.tokens_seen += n_real
                p.batch_tokens += n_batch
                p.train_s += step_s
                p.max_step_s = max(p.max_step_s, step_s)
                if len(p.step_times) < MEASURE_STEPS:
                    p.step_times.append(step_s)
                _track_loss(p, loss, config.divergence_factor)
                if p.total_steps is None and len(p.step_times) >= MEASURE_STEPS:
                    p.total_steps = _seconds_total_steps(run)
                _mark_step_start(run)
            if run.bar is not None:
                run.bar.update(run.bar.task_ids[0], completed=p.step, total=p.total_steps,
                               description=f"loss {loss:.4f}")
            if p.step % config.eval_interval == 0 and not _horizon_reached(run):
                last_eval_step = p.step
                if evaluate(run):
                    return "stopped"
            elif config.checkpoint_interval and p.step % config.checkpoint_interval == 0:
                save_checkpoint(run)
        if last_eval_step != p.step:
            evaluate(run, final=True)
        return "completed"
    except KeyboardInterrupt:
        save_checkpoint(run)
        raise


def train_step(run: _Run) -> tuple[float, int, int]:
    """One optimizer step's forward/backward passes over `grad_accum` micro-batches.

    Returns the mean loss and the step's non-padding and total token counts; the caller adds
    them to the run's counters only once the step is applied (a Ctrl-C in here leaves the
    counters as the step found them, matching the checkpoint it triggers).
    """
    config, fabric = run.config, run.fabric
    losses = []
    n_real_total = n_batch_total = 0
    for micro in range(config.grad_accum):
        batch, n_real = get_batch(run)
        with fabric.no_backward_sync(run.model, enabled=micro < config.grad_accum - 1):
            loss = run.model(**batch).loss
            run.guard.check()
            fabric.backward(loss / config.grad_accum)
            run.guard.check()
        losses.append(loss.detach())
        n_real_total += n_real
        n_batch_total += batch["input_ids"].numel()
    if config.grad_clip:
        fabric.clip_gradients(run.model, run.optimizer, max_norm=config.grad_clip,
                              error_if_nonfinite=False)
    # One host-device sync per optimizer step, for the divergence test and the progress bar.
    return torch.stack(losses).float().mean().item(), n_real_total, n_batch_total


def get_batch(run: _Run) -> tuple[dict[str, torch.Tensor], int]:
    """The next training micro-batch on the run's device, and its non-padding token count."""
    batch = run.sampler.next_batch()
    n_real = int(batch["attention_mask"].sum())
    return run.fabric.to_device(batch), n_real


@torch.no_grad()
def validate(run: _Run) -> float:
    """Mean loss per target token over the fixed validation batches."""
    run.model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in run.val_batches:
        batch = run.fabric.to_device(batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = run.model(**batch).loss
        total += loss.double().cpu() * n
        count += n
        run.guard.check()
    run.model.train()
    return float(total / max(count, 1))


def evaluate(run: _Run, final: bool = False) -> bool:
    """Validate, checkpoint, log and call the callbacks; True when one asks the run to stop."""
    p, config = run.progress, run.config
    t = time.perf_counter()
    val_loss = validate(run)
    p.last_eval_s = time.perf_counter() - t
    p.eval_s += p.last_eval_s
    metrics = {
        "val_loss": val_loss,
        "train_loss": p.loss_sum / p.loss_count if p.loss_count else float("nan"),
        **_throughput(run),
    }
    p.loss_sum, p.loss_count = 0.0, 0
    event = EvalEvent(step=p.step, tokens_seen=p.tokens_seen, elapsed_s=run.elapsed(),
                      metrics=metrics)  # fmt: skip
    p.curve.append(event.to_dict())
    interval = config.checkpoint_interval
    saved = final or interval is None or p.step % interval == 0
    if saved:
        save_checkpoint(run)
    _append_line(run.metrics_path, {"kind": "eval", **event.to_dict()})
    stop = False
    for callback in run.callbacks:
        stop = bool(callback(event)) or stop
    if stop and not saved:
        save_checkpoint(run)  # a stopped run must be resumable from where it stopped
    return stop and not final


def save_checkpoint(run: _Run) -> None:
    """Checkpoint the run as of its last completed optimizer step.

    A background thread writes it; `main()` waits for the last write before it returns or
    re-raises, so a stopped or interrupted run is on disk when the caller hears of it.
    """
    t = time.perf_counter()
    run.writer.submit(_snapshot(run), run.model, run.optimizer,
                      ckpt.resume_fingerprint(run.config))  # fmt: skip
    run.progress.checkpoint_s = time.perf_counter() - t


# --- horizon -----------------------------------------------------------------------------------


def _fixed_total_steps(config: RunConfig, mean_example_tokens: float) -> int | None:
    """Optimizer steps of a steps or tokens horizon (None: seconds, fixed after measuring)."""
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        per_step = max(1.0, mean_example_tokens * config.global_batch)
        return max(1, math.ceil(config.max_tokens / per_step))
    return None


def _horizon_reached(run: _Run) -> bool:
    p, config = run.progress, run.config
    if p.total_steps is not None and p.step >= p.total_steps:
        return True
    return config.max_tokens is not None and p.tokens_seen >= config.max_tokens


def _step_estimate_s(p: ckpt.Progress) -> float:
    """Mean optimizer-step time, leaving out the first step (allocator and kernel warmup)."""
    if p.step > 1 and p.step_times:
        return (p.train_s - p.step_times[0]) / (p.step - 1)
    return p.train_s / p.step if p.step else 0.0


def _seconds_total_steps(run: _Run) -> int:
    """Fix a seconds horizon's step count from measured step, eval and checkpoint times.

    The driver charges evals and checkpoints to the allowance, so the count leaves room for
    every eval the remaining steps will trigger plus the final one.
    """
    p, config = run.progress, run.config
    assert config.max_seconds is not None
    step_s = max(_step_estimate_s(p), 1e-6)
    per_eval = p.last_eval_s + _checkpoint_estimate_s(run)
    final_extra = _checkpoint_estimate_s(run)  # the adapter saved at the end
    remaining = config.max_seconds - run.elapsed()
    n = max(0, int(remaining / step_s))
    while n > 0:
        n_evals = (p.step + n) // config.eval_interval - p.step // config.eval_interval + 1
        if n * step_s + n_evals * per_eval + final_extra <= remaining:
            break
        n -= 1
    return p.step + n


def _checkpoint_estimate_s(run: _Run) -> float:
    """Seconds a checkpoint takes: measured once one was written, else from its size.

    Adapter plus two AdamW moments, written, fsynced and hashed at a conservative 200 MB/s.
    """
    if run.progress.checkpoint_s:
        return run.progress.checkpoint_s
    bytes_per_param = 4 if run.config.precision in ("32-true", "bf16-mixed", "16-mixed") else 2
    return 3 * run.data_stats["n_trainable_params"] * bytes_per_param / 200e6


def _next_step_fits(run: _Run) -> bool:
    """The explicit wall-clock stop: one more step plus the final eval must fit the allowance.

    The final eval and saves get a fifth more than last measured: on a busy machine they run
    slower than they did, and the allowance is a hard limit.
    """
    p, config = run.progress, run.config
    assert config.max_seconds is not None
    if not p.step_times:
        return run.elapsed() < config.max_seconds
    needed = _step_estimate_s(p) + FINAL_MARGIN * (p.last_eval_s + 2 * _checkpoint_estimate_s(run))
    return run.elapsed() + needed <= config.max_seconds


def _track_loss(p: ckpt.Progress, loss: float, factor: float) -> None:
    """Accumulate the train loss and raise `_Diverging` on NaN/inf or a blown-up loss."""
    if not math.isfinite(loss):
        raise _Diverging(p.step, loss, "loss is not finite")
    p.loss_sum += loss
    p.loss_count += 1
    if p.loss_start is None:
        p.loss_start = loss
    p.loss_ema = loss if p.loss_ema is None else EMA_DECAY * p.loss_ema + (1 - EMA_DECAY) * loss
    if p.loss_start is not None and p.loss_ema is not None and p.loss_ema > factor * p.loss_start:
        raise _Diverging(
            p.step, p.loss_ema,
            f"smoothed loss {p.loss_ema:.4g} > {factor} x starting loss {p.loss_start:.4g}",
        )  # fmt: skip


# --- resume ------------------------------------------------------------------------------------


def _mark_step_start(run: _Run) -> None:
    """Remember the sampler and generators at a step boundary (cheap: counters and ~5 KB)."""
    run.step_start = (run.sampler.state_dict(), ckpt.capture_rng())


def _snapshot(run: _Run) -> ckpt.Snapshot:
    """The resumable state: counters now, sampler and generators as this step began."""
    if run.step_start is None:
        _mark_step_start(run)
    assert run.step_start is not None
    run.progress.elapsed_s = run.elapsed()
    sampler, rng = run.step_start
    return ckpt.Snapshot(dataclasses.asdict(run.progress), sampler, rng)


def _restore(run: _Run, found: ckpt.Checkpoint) -> None:
    """Continue the checkpointed run: weights, optimizer, sampler, generators, counters, log."""
    saved = ckpt.restore_run(
        found, run.model, run.optimizer, run.sampler, ckpt.resume_fingerprint(run.config)
    )
    fresh_total, horizon = run.progress.total_steps, run.progress.horizon
    run.progress = ckpt.Progress(**saved)
    if run.progress.horizon != horizon:
        # A longer (or shorter) run asked of the same checkpoint: refit the schedule to the new
        # horizon (a seconds horizon refits at the next step from the times measured so far).
        run.progress.total_steps, run.progress.horizon = fresh_total, horizon
    run.t0 -= run.progress.elapsed_s
    # The log is rewritten from the checkpoint: evals after it will be redone, not duplicated.
    lines = [{"kind": "eval", **e} for e in run.progress.curve]
    if run.progress.initial_val_loss is not None:
        lines.insert(0, {"kind": "initial", "step": 0, "val_loss": run.progress.initial_val_loss})
    ckpt.write_text_atomic(run.metrics_path, "".join(json.dumps(x) + "\n" for x in lines))


# --- reporting ---------------------------------------------------------------------------------


def _throughput(run: _Run) -> dict[str, float]:
    p = run.progress
    train_s = max(p.train_s, 1e-9)
    return {
        "lr": p.lr,
        "tokens_per_s": p.batch_tokens / train_s,
        "nonpad_tokens_per_s": p.tokens_seen / train_s,
        "padding_fraction": 1.0 - p.tokens_seen / p.batch_tokens if p.batch_tokens else 0.0,
        "step_time_s": p.train_s / p.step if p.step else 0.0,
        "max_step_time_s": p.max_step_s,
        "peak_memory_bytes": float(run.guard.peak_bytes()),
    }


def _metrics(run: _Run, elapsed: float) -> dict[str, float]:
    """The final figures of a run: last eval, throughput, overhead, data counts."""
    p = run.progress
    last = p.curve[-1]["metrics"] if p.curve else {}
    overhead = max(0.0, elapsed - p.train_s - p.eval_s)
    return {
        **last,
        **_throughput(run),
        "initial_val_loss": p.initial_val_loss if p.initial_val_loss is not None else math.nan,
        "total_steps": float(p.total_steps if p.total_steps is not None else p.step),
        "train_s": p.train_s,
        "eval_s": p.eval_s,
        "overhead_s": overhead,
        "overhead_fraction": overhead / elapsed if elapsed > 0 else 0.0,
        **{k: float(v) for k, v in run.data_stats.items()},
    }


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line. Not fsynced: a resume rewrites the log from its checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _write_config(run: _Run, worker: Worker) -> None:
    """Print the resolved configuration and keep it next to the run's outputs."""
    resolved = json.loads(json.dumps(dataclasses.asdict(run.config), default=str))
    resolved["resolved"] = {
        "model_path": str(worker.path),
        "grad_accum": run.config.grad_accum,
        "mixture": run.sampler.mixture,
        "total_steps": run.progress.total_steps,
        "device": str(run.fabric.device),
        "resumed_at_step": run.progress.step or None,
        **run.data_stats,
    }
    ckpt.write_text_atomic(run.config.out_dir / "config.json", json.dumps(resolved, indent=2))
    if not run.quiet:
        from rich.console import Console

        Console(stderr=True).print_json(data=resolved)


@contextlib.contextmanager
def _progress_bar(run: _Run):
    """A rich progress bar over optimizer steps, on a terminal and when not quiet."""
    if run.quiet or not sys.stderr.isatty():
        yield
        return
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
               rp.TimeElapsedColumn())  # fmt: skip
    with rp.Progress(*columns, console=Console(stderr=True)) as bar:
        bar.add_task("training", total=run.progress.total_steps, completed=run.progress.step)
        run.bar = bar
        try:
            yield
        finally:
            run.bar = None
