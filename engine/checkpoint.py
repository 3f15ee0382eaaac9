"""Atomic, verifiable checkpoints of a run, for exact resume.

Layout under `<out_dir>/checkpoints/`:

    step-000120/            one checkpoint (the last `keep` are kept)
        adapter.safetensors   trainable (LoRA) weights only: the frozen base is not copied
        optimizer.pt          AdamW moments
        rng.pt                python / numpy / torch / cuda generator states
        state.json            counters, sampler state, curve and metrics so far, horizon
        manifest.json         size and sha256 of every file above
    latest                  name of the newest checkpoint (replaced atomically)

A checkpoint is written into a hidden temp folder, fsynced, and renamed into place (by a
background thread, so training goes on), so a crash mid-write leaves no folder that looks
complete. Loading checks the manifest; a corrupt or half-written checkpoint is skipped with a
warning and the previous good one is used.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from budgetune.engine.config import RunConfig
from budgetune.engine.errors import UserInputError

PREFIX = "step-"
LATEST = "latest"
MANIFEST = "manifest.json"
FILES = ("adapter.safetensors", "optimizer.pt", "rng.pt", "state.json")


@dataclass
class Checkpoint:
    """A verified checkpoint, loaded into memory."""

    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def capture_rng() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, sampling), as they are now.

    Cheap enough to call every optimizer step; `save_checkpoint` converts it for storage.
    """
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _storable_rng(rng: dict[str, Any]) -> dict[str, Any]:
    """Generator states as lists and tensors, which `torch.load(weights_only=True)` reads."""
    version, internal, gauss = rng["python"]
    name, keys, *rest = rng["numpy"]
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys).copy()), *rest],
        "torch": rng["torch"],
    }
    if "cuda" in rng:
        out["cuda"] = rng["cuda"]
    return out


def restore_rng(rng: dict[str, Any]) -> None:
    """Put every generator back where `capture_rng` found it (stored or not)."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, keys, *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, tmp / FILES[0])
    torch.save(optimizer, tmp / FILES[1])
    torch.save(_storable_rng(rng), tmp / FILES[2])
    (tmp / FILES[3]).write_text(json.dumps(state, indent=1))
    manifest = {}
    for name in FILES:
        _fsync_file(tmp / name)
        manifest[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.exists():
        # The same step saved again (a stop request right after an eval's checkpoint): the
        # new copy is the one to trust; move the old one aside before replacing it.
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(_step_dirs(root), key=lambda p: p.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path`, or None when every file checks out."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "manifest missing or unreadable"
    files = manifest.get("files", {})
    for name in FILES:
        entry, file = files.get(name), path / name
        if entry is None:
            return f"manifest does not list {name}"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['size']}"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest step first.

    Loading goes by step number rather than by `latest`: a crash between renaming a new
    checkpoint into place and updating the pointer leaves a complete checkpoint that
    `latest` does not name yet, and it is the one to resume from. `latest` is for people and
    tools that want the newest checkpoint without listing the folder.
    """
    if not root.is_dir():
        return []
    return sorted(_step_dirs(root), key=lambda p: p.name, reverse=True)


def load_checkpoint(root: Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest good checkpoint under `root`, or None when there is none.

    A corrupt one is skipped with a `RuntimeWarning` naming it and saying why, so the user
    learns that some steps will be redone.
    """
    skipped: list[str] = []
    for path in find_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                ckpt = Checkpoint(
                    path=path,
                    step=int(path.name[len(PREFIX) :]),
                    adapter=load_file(path / FILES[0]),
                    optimizer=torch.load(path / FILES[1], map_location=map_location),
                    rng=torch.load(path / FILES[2], weights_only=True),
                    state=json.loads((path / FILES[3]).read_text()),
                )
            except Exception as e:  # verified bytes that still do not load: treat as corrupt
                problem = f"cannot be read ({type(e).__name__}: {e})"
            else:
                if skipped:
                    warnings.warn(
                        f"{'; '.join(skipped)}; resuming from {path}", RuntimeWarning, stacklevel=2
                    )
                return ckpt
        skipped.append(f"checkpoint {path} is corrupt ({problem})")
    if skipped:
        warnings.warn(f"{'; '.join(skipped)}; starting from scratch", RuntimeWarning, stacklevel=2)
    return None


# --- a run's state ---------------------------------------------------------------------------

RESUME_KEYS = ("sources", "val", "weights", "precision", "quantize", "lora", "learning_rate",
               "weight_decay", "warmup_steps", "global_batch", "micro_batch", "max_seq_length",
               "mask_prompt", "grad_clip", "seed")  # fmt: skip
"""Config fields a checkpoint must agree on to be resumed: they decide what the next step does."""


@dataclass
class Progress:
    """Everything a checkpoint carries besides weights: where the run is and what it saw."""

    step: int = 0
    tokens_seen: int = 0
    """Non-padding training tokens."""
    batch_tokens: int = 0
    """Training tokens including padding (what the GPU computed on)."""
    elapsed_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    total_steps: int | None = None
    """The fixed horizon in optimizer steps (None while a seconds horizon is measuring)."""
    horizon: list[float | None] = field(default_factory=list)
    """(max_steps, max_tokens, max_seconds) that `total_steps` was fixed for."""
    step_times: list[float] = field(default_factory=list)
    """Durations of the first optimizer steps, for the seconds horizon's estimate."""
    max_step_s: float = 0.0
    """The slowest optimizer step so far (what a seconds horizon may overrun by)."""
    last_eval_s: float = 0.0
    checkpoint_s: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    loss_start: float | None = None
    loss_ema: float | None = None
    lr: float = 0.0
    initial_val_loss: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    """EvalEvent dicts, one per eval the callbacks saw."""


def resume_fingerprint(config: RunConfig) -> dict[str, Any]:
    """The config fields (`RESUME_KEYS`) a checkpoint records and a resume must match."""
    data = dataclasses.asdict(config)
    return json.loads(json.dumps({k: data[k] for k in RESUME_KEYS}, default=str))




@dataclass
class Snapshot:
    """A run's resumable state at an optimizer-step boundary; weights are read at save time.

    The sampler and generator states are those the current step started from (the loop
    records them after every optimizer step), so a Ctrl-C in the middle of a step's
    micro-batches checkpoints the state that step started from, not a half-consumed sampler.
    """

    progress: dict[str, Any]
    sampler: dict[str, Any]
    """The sampler's `state_dict()` (JSON-able)."""
    rng: dict[str, Any]
    """`capture_rng()`."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (the adapter), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class CheckpointWriter:
    """Writes a run's checkpoints in a background thread, one at a time.

    Writing is mostly waiting on the disk (each fsync ~1-10 ms, a 7B adapter's optimizer
    state is gigabytes), so the loop only copies the state to CPU memory -- the live tensors
    change with the next step -- and trains on while a thread writes, fsyncs and renames.
    A new checkpoint waits for the previous one; `wait()` before relying on the files.
    """

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Path] | None = None

    def submit(
        self, snap: Snapshot, model: torch.nn.Module, optimizer: Any,
        fingerprint: dict[str, Any],
    ) -> None:  # fmt: skip
        """Checkpoint a run: its adapter and optimizer as they are now, counters as of `snap`."""
        self.wait()
        adapter = {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}
        optim = _cpu_copy(optimizer.state_dict())
        state = {"progress": snap.progress, "sampler": snap.sampler, "config": fingerprint}
        self._pending = self._pool.submit(
            save_checkpoint, self.root, snap.progress["step"], adapter=adapter,
            optimizer=optim, rng=snap.rng, state=state, keep=self.keep,
        )  # fmt: skip

    def wait(self) -> Path | None:
        """Block until the checkpoint being written is on disk; re-raise its error if any."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self, raise_errors: bool = True) -> None:
        """Finish the pending write and stop the thread (errors dropped on a failing run)."""
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
        finally:
            self._pool.shutdown(wait=True)


def _cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to CPU (optimizer state dicts nest them)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def restore_run(
    found: Checkpoint, model: torch.nn.Module, optimizer: Any, sampler: Any,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Load a checkpoint into a freshly set-up run; returns the saved progress counters.

    Refuses a checkpoint whose run differs in anything that decides the next step (a
    different rank or learning rate would silently continue someone else's run).
    """
    saved = found.state["config"]
    differ = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    if differ:
        raise UserInputError(
            f"{found.path}: checkpoint is from a run with different {', '.join(differ)}; "
            "use another out_dir or resume=False to start over"
        )
    params = trainable_state(model)
    if set(found.adapter) != set(params):
        raise UserInputError(f"{found.path}: adapter weights do not match this LoRA setup")
    with torch.no_grad():
        for name, value in found.adapter.items():
            params[name].copy_(value)
    optimizer.load_state_dict(found.optimizer)
    sampler.load_state_dict(found.state["sampler"])
    restore_rng(found.rng)
    return found.state["progress"]


def clear_run(out: Path) -> None:
    """A fresh run in a used folder: old checkpoints and metrics would mislead a later resume."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


@contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an optimizer step is never half applied.

    Only the main thread can own signal handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
