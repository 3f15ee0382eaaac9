"""Checkpoints: a SIGKILLed run resumes exactly; corrupt or half-written ones are skipped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from budgetune.engine import checkpoint as ckpt
from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.errors import UserInputError
from budgetune.engine.train import Worker

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "studies" / "quickstart" / "model"
DATA = ROOT / "studies" / "quickstart" / "data"

CONFIG = dict(
    model=str(MODEL),
    sources=[SourceSpec("dolly", str(DATA / "dolly.jsonl"), "dolly", limit=200),
             SourceSpec("alpaca", str(DATA / "alpaca.json"), "alpaca", limit=200)],
    val=SourceSpec("val", str(DATA / "val.jsonl"), "alpaca"),
    global_batch=8, micro_batch=4, learning_rate=3e-3, warmup_steps=2, eval_interval=2,
    eval_examples=16, max_seq_length=128, seed=11,
)  # fmt: skip
"""The run every test here checkpoints; dropout (0.05) makes the RNG state matter."""

_RUN_SCRIPT = """
import json, sys
from pathlib import Path
from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.train import Worker
spec = json.loads(sys.argv[1])
spec["sources"] = [SourceSpec(**s) for s in spec["sources"]]
spec["val"] = SourceSpec(**spec["val"])
config = RunConfig(**spec)
result = Worker(config.model, quiet=True).run(config)
print(json.dumps({"curve": [e.to_dict() for e in result.curve], "step": result.step,
                  "tokens_seen": result.tokens_seen, "elapsed_s": result.elapsed_s}))
"""


def make_config(out_dir: Path, cache_dir: Path, **overrides) -> RunConfig:
    return RunConfig(**{**CONFIG, "out_dir": out_dir, "cache_dir": cache_dir, **overrides})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def worker() -> Worker:
    return Worker(str(MODEL), quiet=True)


def losses(curve: list[dict]) -> list[float]:
    """Each point's validation and training loss, flat: pytest.approx compares no nesting."""
    return [e["metrics"][k] for e in curve for k in ("val_loss", "train_loss")]


def _spawn(out_dir: Path, cache_dir: Path, max_steps: int) -> subprocess.Popen:
    spec = {**CONFIG, "out_dir": str(out_dir), "cache_dir": str(cache_dir),
            "max_steps": max_steps}  # fmt: skip
    spec["sources"] = [vars(s) for s in CONFIG["sources"]]
    spec["val"] = vars(CONFIG["val"])
    return subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_curve(worker: Worker, tmp_path, cache_dir) -> None:
    # The reference: the same run, uninterrupted (also warms the token cache).
    reference = worker.run(make_config(tmp_path / "ref", cache_dir, max_steps=24))
    out = tmp_path / "killed"
    proc = _spawn(out, cache_dir, 24)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-000004":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = latest.read_text().strip()
    # It really died mid-run: killed by the signal, before its last step.
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert "step-000004" <= killed_at < "step-000024"

    resumed = _spawn(out, cache_dir, 24)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    expected = [e.to_dict() for e in reference.curve]
    assert result["step"] == 24 and result["tokens_seen"] == reference.tokens_seen
    assert [e["step"] for e in result["curve"]] == [e["step"] for e in expected]
    assert [e["tokens_seen"] for e in result["curve"]] == [e["tokens_seen"] for e in expected]
    # Same batches, same LR, same dropout masks: the loss curve matches the uninterrupted one.
    assert losses(result["curve"]) == pytest.approx(losses(expected), rel=1e-5)
    # Time carries over: the resumed run's clock continues from the checkpoint's.
    kill_step = int(killed_at.removeprefix("step-"))
    at_kill = next(e for e in result["curve"] if e["step"] == kill_step)["elapsed_s"]
    assert result["elapsed_s"] > at_kill > 0
    # metrics.jsonl was rewritten from the checkpoint: one line per eval, none duplicated.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == list(range(2, 25, 2))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(
    worker: Worker, tmp_path, cache_dir
) -> None:
    out = tmp_path / "run"
    first = worker.run(make_config(out, cache_dir, max_steps=4))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000004"]
    adapter = root / "step-000004" / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF
    adapter.write_bytes(bytes(data))

    with pytest.warns(RuntimeWarning, match=r"step-000004 is corrupt .*sha256.*step-000002"):
        found = ckpt.load_checkpoint(root)
    assert found is not None and found.step == 2
    # Resuming redoes steps 3-4 from step 2 and lands on the curve the run first drew.
    with pytest.warns(RuntimeWarning, match="corrupt"):
        result = worker.run(make_config(out, cache_dir, max_steps=4))
    assert [e.step for e in result.curve] == [2, 4]
    assert losses([e.to_dict() for e in result.curve]) == pytest.approx(
        losses([e.to_dict() for e in first.curve]), rel=1e-5
    )


def _save(root: Path, step: int) -> Path:
    return ckpt.save_checkpoint(
        root, step, adapter={"w": torch.full((3,), float(step))}, optimizer={"state": {}},
        rng=ckpt.capture_rng(), state={"progress": {"step": step}},
    )  # fmt: skip


def test_only_the_last_two_are_kept_and_latest_names_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (root / "latest").read_text().strip() == "step-000003"
    found = ckpt.load_checkpoint(root)
    assert found.step == 3 and torch.equal(found.adapter["w"], torch.full((3,), 3.0))


def test_half_written_and_unlisted_checkpoints_are_never_trusted(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 2)
    # A crash mid-write leaves only a hidden temp folder, which loading ignores...
    partial = root / ".tmp-step-000004-12345"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\x00" * 10)
    # ...and a newer step folder without a manifest (copied by hand, or a disk that lost the
    # file) is skipped with a warning.
    bogus = root / "step-000006"
    bogus.mkdir()
    (bogus / "state.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match="step-000006 is corrupt .manifest missing"):
        found = ckpt.load_checkpoint(root)
    assert found.step == 2
    # Truncating a file is caught by its recorded size.
    (root / "step-000002" / "optimizer.pt").write_bytes(b"")
    assert "optimizer.pt has 0 bytes" in ckpt.verify_checkpoint(root / "step-000002")


def test_resuming_with_a_different_config_is_refused(worker: Worker, tmp_path, cache_dir):
    out = tmp_path / "run"
    worker.run(make_config(out, cache_dir, max_steps=2))
    with pytest.raises(UserInputError, match="different learning_rate"):
        worker.run(make_config(out, cache_dir, max_steps=4, learning_rate=1e-4))
    # resume=False starts over in the same folder instead.
    result = worker.run(make_config(out, cache_dir, max_steps=2, learning_rate=1e-4), resume=False)
    assert result.step == 2 and result.curve[0].step == 2


def test_rng_state_round_trips() -> None:
    state = ckpt.capture_rng()
    expected = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    ckpt.restore_rng(state)
    again = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    assert expected[0] == again[0] and torch.equal(expected[1], again[1])
    assert expected[2] == again[2]
