"""The training loop on the shipped tiny model: horizons, evals, stops, failures, reuse."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budgetune.engine import model as model_module
from budgetune.engine.checkpoint import Progress
from budgetune.engine.config import LoraSettings, RunConfig, SourceSpec
from budgetune.engine.errors import Diverged, OutOfMemory, UserInputError
from budgetune.engine.events import EvalEvent
from budgetune.engine.memory import rss_bytes
from budgetune.engine.train import Worker, _Diverging, _track_loss, get_lr

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "studies" / "quickstart"
MODEL = QUICKSTART / "model"
DATA = QUICKSTART / "data"


def make_config(out_dir: Path, cache_dir: Path, **overrides) -> RunConfig:
    """A small run on the shipped data: two sources, 16 validation examples, short sequences."""
    values = dict(
        model=str(MODEL),
        sources=[
            SourceSpec("dolly", str(DATA / "dolly.jsonl"), "dolly", limit=200),
            SourceSpec("alpaca", str(DATA / "alpaca.json"), "alpaca", limit=200),
        ],
        val=SourceSpec("val", str(DATA / "val.jsonl"), "alpaca"),
        out_dir=out_dir, max_steps=4, global_batch=8, micro_batch=4, learning_rate=3e-3,
        warmup_steps=1, eval_interval=2, eval_examples=16, max_seq_length=128, seed=7,
        cache_dir=cache_dir,
    )  # fmt: skip
    lora = overrides.pop("lora", None)
    values.update(overrides)
    config = RunConfig(**values)
    if lora is not None:
        config.lora = lora
    return config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def worker() -> Worker:
    return Worker(str(MODEL), quiet=True)


def val_curve(result) -> list[float]:
    return [e.metrics["val_loss"] for e in result.curve]


# --- the schedule ------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_to_min_at_the_horizon() -> None:
    kw = {"learning_rate": 1.0, "warmup_steps": 4, "total_steps": 20, "min_lr": 0.1}
    warm = [get_lr(s, **kw) for s in range(4)]
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert get_lr(4, **kw) == pytest.approx(1.0)
    decay = [get_lr(s, **kw) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # The cosine ends exactly at the horizon: min_lr at step == total_steps.
    assert get_lr(20, **kw) == pytest.approx(0.1)
    assert get_lr(12, **kw) == pytest.approx(0.55)  # half-way through the decay


def test_lr_warmup_is_capped_at_half_a_short_horizon() -> None:
    lrs = [get_lr(s, learning_rate=1.0, warmup_steps=100, total_steps=6) for s in range(7)]
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert lrs[3] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.0)
    # No horizon yet (a seconds run still measuring): warmup only, never decay.
    assert get_lr(500, learning_rate=1.0, warmup_steps=10, total_steps=None) == 1.0


# --- a run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fixed_hyperparameter_run_lowers_validation_loss(worker: Worker, tmp_path, cache_dir):
    config = make_config(
        tmp_path / "run", cache_dir, max_steps=16, eval_interval=8, learning_rate=1e-2,
        warmup_steps=2, lora=LoraSettings(r=16, alpha=32, targets="all-linear"),
    )  # fmt: skip
    result = worker.run(config)
    initial, final = result.metrics["initial_val_loss"], result.metrics["val_loss"]
    print(f"val loss {initial:.3f} -> {final:.3f} in {result.elapsed_s:.1f}s")
    assert final <= 0.9 * initial
    assert result.elapsed_s < 30


def test_run_writes_config_metrics_and_result(worker: Worker, tmp_path, cache_dir) -> None:
    config = make_config(tmp_path / "run", cache_dir)
    result = worker.run(config)
    assert result.status == "completed" and result.step == 4
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["initial", "eval", "eval", "final"]
    assert [x["step"] for x in lines] == [0, 2, 4, 4]
    # The curve the callbacks saw is what metrics.jsonl holds, line for line.
    assert [e.to_dict() for e in result.curve] == [
        {k: v for k, v in x.items() if k != "kind"} for x in lines[1:3]
    ]
    expected = {"train_loss", "val_loss", "lr", "tokens_per_s", "nonpad_tokens_per_s",
                "padding_fraction", "step_time_s", "peak_memory_bytes", "n_truncated",
                "overhead_s", "overhead_fraction", "model_load_s"}  # fmt: skip
    assert expected <= set(result.metrics)
    assert 0 <= result.metrics["padding_fraction"] < 1
    assert result.metrics["peak_memory_bytes"] > 0
    # Tokens counted are the non-padding ones; throughput is consistent with them.
    assert result.tokens_seen == lines[-1]["tokens_seen"] > 0
    assert result.metrics["nonpad_tokens_per_s"] <= result.metrics["tokens_per_s"]
    assert 0 < result.metrics["overhead_fraction"] < 1
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["learning_rate"] == 3e-3 and saved["resolved"]["grad_accum"] == 2
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_runs_in_one_worker_do_not_leak(monkeypatch, tmp_path, cache_dir) -> None:
    loads = []
    real = model_module.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))  # fmt: skip
    w = Worker(str(MODEL), quiet=True)
    base_state = {k: v.clone() for k, v in w.model.state_dict().items()}
    a = make_config(tmp_path / "a", cache_dir)
    lora = LoraSettings(r=16, alpha=8, dropout=0.0, targets="all-linear")
    b = make_config(tmp_path / "b", cache_dir, learning_rate=1e-2, lora=lora)
    first = w.run(a)
    other = w.run(b)
    again = w.run(dataclasses.replace(a, out_dir=tmp_path / "a2"))
    assert val_curve(first) == val_curve(again)
    assert val_curve(first) != val_curve(other)
    assert [e.metrics["train_loss"] for e in first.curve] == [
        e.metrics["train_loss"] for e in again.curve
    ]
    # The base model was read from disk once, and its weights never changed.
    assert len(loads) == 1
    w.drop_adapter()
    after = w.model.state_dict()
    assert set(after) == set(base_state)
    assert all(torch.equal(after[k], base_state[k]) for k in base_state)


def test_last_adapter_stays_active_for_in_memory_use(worker: Worker, tmp_path, cache_dir):
    result = worker.run(make_config(tmp_path / "run", cache_dir, learning_rate=3e-2))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        tuned = worker.model(input_ids=ids).logits
        with worker.model.disable_adapter():
            bare = worker.model(input_ids=ids).logits
    # A trained adapter changes the output, and worker.model is in eval mode for scoring.
    assert not torch.allclose(tuned, bare)
    assert not worker.model.training
    assert result.metrics["val_loss"] == result.curve[-1].metrics["val_loss"]


# --- stops ------------------------------------------------------------------------------------


def test_callback_can_stop_the_run_after_checkpointing(worker: Worker, tmp_path, cache_dir):
    seen: list[EvalEvent] = []
    config = make_config(tmp_path / "run", cache_dir, max_steps=10)
    result = worker.run(config, callbacks=[lambda e: seen.append(e) or e.step >= 4])
    assert result.status == "stopped" and result.step == 4
    assert [e.step for e in seen] == [2, 4]
    assert seen[0].elapsed_s < seen[1].elapsed_s and seen[0].tokens_seen < seen[1].tokens_seen
    assert result.checkpoint_dir is not None and result.checkpoint_dir.name == "step-000004"


def test_stop_check_is_polled_every_step(worker: Worker, tmp_path, cache_dir) -> None:
    polls = []
    config = make_config(tmp_path / "run", cache_dir, max_steps=10, eval_interval=5)
    result = worker.run(config, stop_check=lambda: polls.append(1) or len(polls) > 3)
    assert result.status == "stopped" and result.step == 3
    # Stopping between evals still checkpoints the exact step it stopped at.
    assert result.checkpoint_dir.name == "step-000003"


def test_ctrl_c_checkpoints_then_reraises(worker: Worker, tmp_path, cache_dir) -> None:
    polls = []

    def interrupt() -> bool:
        polls.append(1)
        if len(polls) == 4:
            raise KeyboardInterrupt
        return False

    config = make_config(tmp_path / "run", cache_dir, max_steps=10, eval_interval=5)
    with pytest.raises(KeyboardInterrupt):
        worker.run(config, stop_check=interrupt)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step-000003"
    # The interrupted run's adapter is gone from the worker.
    assert worker.model is worker._base


# --- horizons ---------------------------------------------------------------------------------


def test_seconds_horizon_fixes_the_schedule_and_keeps_the_allowance(
    worker: Worker, tmp_path, cache_dir
) -> None:
    config = make_config(tmp_path / "run", cache_dir, max_steps=None, max_seconds=5.0,
                         eval_interval=4, global_batch=4)  # fmt: skip
    result = worker.run(config)
    step_s = result.metrics["step_time_s"]
    total = int(result.metrics["total_steps"])
    print(f"seconds horizon: {result.step}/{total} steps in {result.elapsed_s:.2f}s "
          f"(steps {step_s:.3f}s, slowest {result.metrics['max_step_time_s']:.3f}s)")
    # Never over the allowance by more than one optimizer step (evals and saves included).
    assert result.elapsed_s <= config.max_seconds + result.metrics["max_step_time_s"]
    assert total > 3
    if result.step == total:
        # The schedule completed: the last update used the end of the cosine.
        assert result.metrics["lr"] == pytest.approx(
            get_lr(total - 1, learning_rate=3e-3, warmup_steps=1, total_steps=total)
        )
    else:
        # A machine slower than measured (a busy CI box) makes the explicit clock check stop
        # the run early; most of the fitted schedule still ran.
        assert total // 2 <= result.step < total


def test_tokens_horizon_stops_at_the_token_budget(worker: Worker, tmp_path, cache_dir) -> None:
    config = make_config(tmp_path / "run", cache_dir, max_steps=None, max_tokens=2500)
    result = worker.run(config)
    per_step = result.tokens_seen / result.step
    assert 2500 - per_step <= result.tokens_seen <= 2500 + per_step
    assert result.step == pytest.approx(result.metrics["total_steps"], abs=1)


# --- failures ---------------------------------------------------------------------------------


def test_nan_loss_is_divergence(worker: Worker, tmp_path, cache_dir) -> None:
    embed = worker.model.get_input_embeddings().weight
    saved = embed.detach().clone()
    try:
        with torch.no_grad():
            embed[:, 0] = float("nan")
        with pytest.raises(Diverged, match="loss is not finite") as err:
            worker.run(make_config(tmp_path / "run", cache_dir))
    finally:
        with torch.no_grad():
            embed.copy_(saved)
    assert err.value.step == 1 and math.isnan(err.value.loss)
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1]) == {
        "kind": "failed", "reason": "diverged"
    }


def test_divergence_uses_the_smoothed_loss_against_the_first() -> None:
    p = Progress()
    # One spike to 3x the start is smoothed away under a factor of 2...
    for loss in (2.0, 6.0, 2.0, 1.9):
        _track_loss(p, loss, factor=2.0)
    # ...a loss that stays high is not.
    with pytest.raises(_Diverging, match=r"smoothed loss .* > 2.0 x starting loss 2"):
        for loss in [9.0] * 10:
            _track_loss(p, loss, factor=2.0)
    assert p.loss_start == 2.0 and p.loss_ema > 4.0


def test_a_diverged_run_raises_and_leaves_the_worker_clean(worker: Worker, tmp_path, cache_dir):
    # A factor below 1 flags the very first step: the whole failure path, deterministically.
    config = make_config(tmp_path / "run", cache_dir, divergence_factor=0.5)
    with pytest.raises(Diverged, match=r"diverged at step 1: smoothed loss") as err:
        worker.run(config)
    assert err.value.step == 1 and err.value.loss > 0
    # A failed run leaves no adapter behind; the next run works.
    assert worker.model is worker._base
    assert worker.run(make_config(tmp_path / "ok", cache_dir)).status == "completed"


def test_memory_cap_is_out_of_memory_and_the_worker_survives(
    worker: Worker, tmp_path, cache_dir
) -> None:
    cap = rss_bytes() + 20 * 2**20
    config = make_config(tmp_path / "big", cache_dir, micro_batch=32, global_batch=32,
                         max_seq_length=512, memory_cap_bytes=cap)  # fmt: skip
    with pytest.raises(OutOfMemory) as err:
        worker.run(config)
    assert (err.value.micro_batch, err.value.max_seq_length) == (32, 512)
    assert err.value.peak_memory_bytes > cap
    assert worker.model is worker._base
    assert worker.run(make_config(tmp_path / "ok", cache_dir)).status == "completed"


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {here!r})
from test_train import make_config
from budgetune.engine.errors import OutOfMemory
from budgetune.engine.memory import rss_bytes
from budgetune.engine.train import Worker
out, cache = Path(sys.argv[1]), Path(sys.argv[2])
w = Worker({model!r}, quiet=True)
fresh = w.run(make_config(out / "fresh", cache)).metrics["peak_memory_bytes"]
big = make_config(out / "big", cache, micro_batch=32, global_batch=32, max_seq_length=512,
                  memory_cap_bytes=rss_bytes() + 400 * 2**20)
try:
    w.run(big)
    raise SystemExit("expected OutOfMemory")
except OutOfMemory as e:
    oom = e.peak_memory_bytes
after = w.run(make_config(out / "after", cache)).metrics["peak_memory_bytes"]
print(json.dumps({{"fresh": fresh, "oom": oom, "after": after}}))
"""


@pytest.mark.slow
def test_after_oom_the_next_run_peaks_like_a_fresh_process(tmp_path, cache_dir) -> None:
    # One new process: a run as the first thing it does, an OOM, the same run again.
    script = _PEAK_SCRIPT.format(here=str(Path(__file__).parent), model=str(MODEL))
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(cache_dir)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    mib = {k: round(v / 2**20) for k, v in peak.items()}
    print(f"peak MiB: fresh {mib['fresh']}, OOM run {mib['oom']}, same run after {mib['after']}")
    # The OOM run really grew well past the good run's peak...
    assert peak["oom"] > peak["fresh"] + 200 * 2**20
    # ...and afterwards the good run peaks as it did fresh (RSS noise: 5%).
    assert abs(peak["after"] - peak["fresh"]) <= 0.05 * peak["fresh"]


# --- precision and compatibility -------------------------------------------------------------


@pytest.mark.parametrize(("precision", "dtype"),
                         [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_bf16_precisions_train_on_cpu(tmp_path, cache_dir, precision, dtype) -> None:
    w = Worker(str(MODEL), precision=precision, quiet=True)
    config = make_config(tmp_path / "run", cache_dir, precision=precision, max_steps=1,
                         eval_interval=1, eval_examples=4)  # fmt: skip
    result = w.run(config)
    assert math.isfinite(result.metrics["val_loss"]) and result.step == 1
    lora = [p for n, p in w.model.named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {dtype}


def test_config_for_another_precision_is_refused(worker: Worker, tmp_path, cache_dir) -> None:
    config = make_config(tmp_path / "run", cache_dir, precision="bf16-true")
    with pytest.raises(UserInputError, match="precision=bf16-true.*loaded once per worker"):
        worker.run(config)
