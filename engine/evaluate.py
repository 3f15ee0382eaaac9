"""Score a model on lm-eval tasks: in memory after a trial, or from an exported folder.

The engine side of evaluation. `evaluate` wraps the live model (a peft `PeftModel` with its
adapter unmerged, a Fabric-wrapped module, or a plain `transformers` model) in lm-eval's
`HFLM` and runs lm-eval's evaluation core, so a trial is scored without merging or writing a
single weight; `evaluate_pretrained` gives lm-eval a folder path instead, exactly as
`lm_eval --model hf --model_args pretrained=<dir>` would, so a user can reproduce the score.

Tasks are named as lm-eval names them (`mmlu`, `gsm8k`, `arc_easy`) or defined by local task
YAMLs in include folders. lm-eval hands a YAML's `dataset_kwargs.data_files` to
`datasets.load_dataset` untouched, and `datasets` resolves relative paths against the process's
working directory, not the YAML's folder. So `localize_task_dirs` copies include folders with
those paths made absolute (relative to the YAML, as lm-eval already does for `include:` and
`!function`), and a shipped study's task YAMLs work from any working directory.

Cost notes (what makes a short-horizon eval cheap): building a `TaskManager` that indexes
lm-eval's thousands of built-in YAMLs takes tens of seconds, so it is built without them
whenever every task is local (`build_task_manager`), and is meant to be built once and reused.
`lm_eval.simple_evaluate` also spends 1.5-3 s per call collecting environment info, so the
evaluation core is called directly (see `_run`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import yaml

from budgetune.engine.errors import BudgetuneError, UserInputError

LOCAL_DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
"""`dataset_path` values that read local files through `datasets`' packaged builders."""

_YAML_SUFFIXES = (".yaml", ".yml")
FEWSHOT_SEED = 1234
"""lm-eval's default few-shot sampler seed, so few-shot prompts match `lm_eval` runs."""


@dataclass(frozen=True)
class TaskRequest:
    """One lm-eval task (or group) to run, and how much of it."""

    name: str
    """lm-eval task, group or tag name."""
    limit: int | None = None
    """Evaluate at most this many examples per task (None: all of them)."""
    num_fewshot: int | None = None
    """Few-shot examples in each prompt (None: the task's default, else 0)."""
    metric: str | None = None
    """Primary metric, `name` or `name,filter` (None: the task's first metric)."""


@dataclass
class TaskResult:
    """What one task measured: its primary metric, with every other figure kept alongside."""

    task: str
    metric: str
    """Primary metric as `name,filter` (lm-eval's key, e.g. `acc,none`)."""
    value: float
    stderr: float | None
    """Standard error of `value` (None when lm-eval could not compute one)."""
    n_examples: int
    """Examples actually evaluated (after the limit), summed over a group's tasks."""
    higher_is_better: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    """All numeric figures lm-eval reported for the task (stderrs included)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        return cls(**d)


@dataclass
class EvalReport:
    """Per-task results of one evaluation, and the seconds it took (charged to the ledger)."""

    tasks: list[TaskResult]
    seconds: float

    def by_task(self) -> dict[str, TaskResult]:
        return {t.task: t for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, tasks keyed by name as in lm-eval's own `results`."""
        return {"seconds": self.seconds, "tasks": results_by_task(self.tasks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        tasks = [TaskResult.from_dict(t) for t in d["tasks"].values()]
        return cls(tasks=tasks, seconds=d["seconds"])


def results_by_task(results: Sequence[TaskResult]) -> dict[str, dict[str, Any]]:
    """Task name -> result dict: the JSON shape stored per trial and written to run dirs."""
    return {r.task: r.to_dict() for r in results}


# --- task folders -----------------------------------------------------------------------


class _FunctionTag(str):
    """A YAML `!function module.fn` reference, kept verbatim through a rewrite."""


class _TagLoader(yaml.SafeLoader):
    pass


class _TagDumper(yaml.SafeDumper):
    pass


_TagLoader.add_constructor(
    "!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node))
)
_TagDumper.add_representer(
    _FunctionTag, lambda dumper, data: dumper.represent_scalar("!function", str(data))
)


def _is_local_relative(value: object) -> bool:
    return isinstance(value, str) and "://" not in value and not Path(value).is_absolute()


def _absolute(value: Any, base: Path) -> Any:
    """`value` (a path, a list of them, or a split -> path(s) mapping) made absolute."""
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if _is_local_relative(value):
        return str((base / value).resolve())
    return value


def _localize_config(cfg: dict[str, Any], src_dir: Path, copy_root: Path, src_root: Path) -> bool:
    """Make one task config's data paths absolute; True when anything changed."""
    changed = False
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                new = _absolute(kwargs[key], src_dir)
                changed |= new != kwargs[key]
                kwargs[key] = new
    path = cfg.get("dataset_path")
    if _is_local_relative(path) and path not in LOCAL_DATASET_BUILDERS:
        # A hub id (`cais/mmlu`) looks relative too: only rewrite what exists on disk.
        candidate = (src_dir / path).resolve()
        if candidate.exists():
            cfg["dataset_path"] = str(candidate)
            changed = True
    includes = cfg.get("include")
    if includes is not None:
        resolved = []
        for inc in includes if isinstance(includes, list) else [includes]:
            target = (src_dir / inc).resolve() if _is_local_relative(inc) else Path(inc)
            # An include inside the copied tree must point at the copy, whose paths we fix.
            if target.is_relative_to(src_root):
                target = copy_root / target.relative_to(src_root)
            resolved.append(str(target))
        new_inc: Any = resolved if isinstance(includes, list) else resolved[0]
        changed |= new_inc != includes
        cfg["include"] = new_inc
    return changed


def localize_task_dirs(paths: Sequence[str | Path], dest: Path) -> list[Path]:
    """Copy task folders (or single YAMLs) under `dest` with their data paths made absolute.

    Relative `dataset_kwargs.data_files`/`data_dir`, an on-disk `dataset_path` and `include:`
    are resolved against the folder of the YAML that names them. Files that need no change
    are copied byte for byte (comments kept). Returns the folders to pass to `TaskManager`.
    """
    out: list[Path] = []
    dest.mkdir(parents=True, exist_ok=True)
    for i, given in enumerate(paths):
        src = Path(given).expanduser().resolve()
        if not src.exists():
            raise UserInputError(f"{given}: task path does not exist")
        target = dest / f"{i}_{src.stem}"
        if target.exists():
            shutil.rmtree(target)
        if src.is_file():
            target.mkdir(parents=True)
            shutil.copy2(src, target / src.name)
            src_root = src.parent
        else:
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            src_root = src
        for copied in sorted(target.rglob("*")):
            if not (copied.suffix in _YAML_SUFFIXES or copied.name.endswith("_yaml")):
                continue
            original = src_root / copied.relative_to(target)
            try:
                cfg = yaml.load(copied.read_text(encoding="utf-8"), Loader=_TagLoader)  # noqa: S506
            except yaml.YAMLError:
                continue  # not ours to judge: lm-eval reports broken YAMLs when it loads them
            if isinstance(cfg, dict) and _localize_config(cfg, original.parent, target, src_root):
                text = yaml.dump(cfg, Dumper=_TagDumper, sort_keys=False, allow_unicode=True)
                copied.write_text(text, encoding="utf-8")
        out.append(target)
    return out


def build_task_manager(
    include_paths: Sequence[Path],
    task_names: Sequence[str],
    shown_as: Sequence[str | Path] | None = None,
) -> Any:
    """An lm-eval `TaskManager` that knows every name in `task_names`.

    Indexing lm-eval's built-in tasks costs tens of seconds, so they are left out when the
    include folders define every requested name. An unknown name is a user mistake; the
    message names `shown_as` (the user's folders, not their localized copies).
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    missing = [n for n in task_names if n not in manager.all_tasks]
    if missing:
        manager = TaskManager(include_path=paths or None, include_defaults=True)
        missing = [n for n in task_names if n not in manager.all_tasks]
    if missing:
        shown = include_paths if shown_as is None else shown_as
        where = f" nor in {', '.join(map(str, shown))}" if shown else ""
        raise UserInputError(
            f"unknown lm-eval task(s) {', '.join(missing)}: not built into lm-eval{where}"
        )
    return manager


def tasks_are_local(manager: Any, task_names: Sequence[str]) -> bool:
    """True when every named task reads local files, so the hub can be switched off."""
    index = manager.task_index
    for name in task_names:
        entry = index.get(name)
        cfg = getattr(entry, "cfg", None) or {}
        dataset_path = cfg.get("dataset_path")
        if dataset_path is None or getattr(entry, "yaml_path", None) is None:
            return False
        if dataset_path not in LOCAL_DATASET_BUILDERS and not Path(dataset_path).is_absolute():
            return False
    return True


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Switch the Hugging Face hub off for `datasets` and `huggingface_hub` for a block.

    Both libraries read HF_HUB_OFFLINE/HF_DATASETS_OFFLINE once at import, so setting the
    environment alone does nothing in a process that already imported them: their module
    constants are set too, and everything is restored afterwards.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in keys})
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def hushed(enabled: bool = True) -> Iterator[None]:
    """Keep lm-eval's progress bars and warnings out of a study's output for a block.

    Its bars go to stderr (captured here) and its per-call warnings about an in-memory
    model through the `lm_eval` logger (raised to ERROR). If the block fails, what it
    printed is written out before the error goes on, so nothing needed for debugging is lost.
    """
    if not enabled:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    captured = io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        logger.setLevel(level)


# --- evaluation -------------------------------------------------------------------------


def _as_requests(tasks: Sequence[TaskRequest | str]) -> list[TaskRequest]:
    requests = [TaskRequest(t) if isinstance(t, str) else t for t in tasks]
    if not requests:
        raise UserInputError("no tasks to evaluate")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise UserInputError(f"a task is named twice in one evaluation: {', '.join(names)}")
    for r in requests:
        if r.limit is not None and r.limit < 1:
            raise UserInputError(f"task {r.name}: limit must be >= 1")
    return requests


def _unwrap(model: Any) -> Any:
    """The module lm-eval should call: Fabric's wrapper is peeled off, peft's is kept."""
    from lightning.fabric.wrappers import is_wrapped

    return model.module if is_wrapped(model) else model


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _n_examples(out: dict[str, Any], name: str) -> int:
    n_samples = out.get("n-samples", {})
    if name in n_samples:
        return int(n_samples[name]["effective"])
    return sum(_n_examples(out, child) for child in out.get("group_subtasks", {}).get(name, []))


def _task_result(out: dict[str, Any], request: TaskRequest) -> TaskResult:
    """Turn lm-eval's result dict for one task/group into a `TaskResult`."""
    res = out["results"].get(request.name)
    if res is None:
        raise UserInputError(f"lm-eval returned no result for task {request.name}")
    keys = [k for k in res if "," in k and "_stderr," not in k and _number(res[k]) is not None]
    if request.metric:
        want = request.metric
        matches = [k for k in keys if k == want or k.split(",")[0] == want]
        if not matches:
            names = ", ".join(k.split(",")[0] for k in keys)
            raise UserInputError(f"task {request.name}: no metric {want!r} (it reports {names})")
        key = matches[0]
    else:
        if not keys:
            raise UserInputError(f"task {request.name}: lm-eval reported no numeric metric")
        key = keys[0]
    name, _, flt = key.partition(",")
    hib = out.get("higher_is_better", {}).get(request.name, {}).get(name, True)
    return TaskResult(
        task=request.name,
        metric=key,
        value=float(res[key]),
        stderr=_number(res.get(f"{name}_stderr,{flt}")),
        n_examples=_n_examples(out, request.name),
        higher_is_better=bool(hib),
        metrics={k: v for k in res if "," in k if (v := _number(res[k])) is not None},
    )


def _load_tasks(manager: Any, names: list[str]) -> Any:
    """Build lm-eval's task objects (which loads their datasets), with one-line failures."""
    try:
        return manager.load(names)
    except FileNotFoundError as e:
        raise UserInputError(f"task {', '.join(names)}: data file not found: {e}") from e
    except ConnectionError as e:
        raise BudgetuneError(
            f"task {', '.join(names)}: dataset unavailable offline or unreachable: {e}"
        ) from e


def _run(
    lm: Any,
    requests: list[TaskRequest],
    manager: Any,
    offline: bool,
    bootstrap_iters: int,
) -> list[TaskResult]:
    """Run lm-eval's evaluation core once per distinct (limit, few-shot): both are per call.

    This is `lm_eval.simple_evaluate` minus two things a trial must not pay for: collecting
    environment info (pip/git subprocesses, 1.5-3 s a call, a quarter of a quickstart
    trial's eval) and reseeding the process-wide random generators mid-study. Task setup is
    simple_evaluate's: the few-shot count (default 0) and its sampler seed (1234).
    """
    import lm_eval

    by_setting: dict[tuple[int | None, int | None], list[TaskRequest]] = {}
    for r in requests:
        by_setting.setdefault((r.limit, r.num_fewshot), []).append(r)
    results: dict[str, TaskResult] = {}
    with hub_offline(offline):
        for (limit, num_fewshot), group in by_setting.items():
            loaded = _load_tasks(manager, [r.name for r in group])
            for task in loaded["tasks"].values():
                default_shots = task.get_config("num_fewshot")
                if num_fewshot is not None and default_shots != 0:
                    task.set_config(key="num_fewshot", value=num_fewshot)
                elif default_shots is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            out = lm_eval.evaluate(
                lm=lm,
                task_dict=loaded,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
            )
            for r in group:
                results[r.name] = _task_result(out, r)
    return [results[r.name] for r in requests]


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskRequest | str],
    *,
    include_paths: Sequence[str | Path] = (),
    task_manager: Any = None,
    batch_size: int = 8,
    offline: bool | None = None,
    bootstrap_iters: int = 1000,
    quiet: bool = False,
) -> EvalReport:
    """Score an in-memory model on lm-eval tasks, without merging or writing weights.

    `model` may be a peft model (its adapter stays unmerged), a Fabric-wrapped module or a
    plain causal LM; it is put in eval mode for the call and its training mode restored after.
    The tokenizer is copied so lm-eval's pad-token fix-ups never leak into training.

    Pass a prepared `task_manager` (see `build_task_manager`) to pay its indexing once per
    process; otherwise `include_paths` are localized into a temporary folder for this call.
    `offline=None` switches the hub off exactly when every task reads local files.
    `quiet=True` keeps lm-eval's progress bars and warnings out of the output (`hushed`).
    """
    requests = _as_requests(tasks)
    start = time.perf_counter()  # lm-eval's first import (seconds) is part of the cost
    from lm_eval.models.huggingface import HFLM

    net = _unwrap(model)
    was_training = net.training
    try:
        with TemporaryDirectory(prefix="budgetune-tasks-") as tmp:
            manager = task_manager
            if manager is None:
                dirs = localize_task_dirs(include_paths, Path(tmp)) if include_paths else []
                manager = build_task_manager(dirs, [r.name for r in requests], include_paths)
            if offline is None:
                offline = tasks_are_local(manager, [r.name for r in requests])
            with hushed(quiet):
                lm = HFLM(pretrained=net, tokenizer=copy.deepcopy(tokenizer),
                          batch_size=batch_size)  # fmt: skip
                results = _run(lm, requests, manager, offline, bootstrap_iters)
    finally:
        net.train(was_training)
    return EvalReport(tasks=results, seconds=time.perf_counter() - start)


def evaluate_pretrained(
    model_dir: str | Path,
    tasks: Sequence[TaskRequest | str],
    *,
    include_paths: Sequence[str | Path] = (),
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    offline: bool | None = None,
    bootstrap_iters: int = 1000,
) -> EvalReport:
    """Score an exported Hugging Face folder the way `lm_eval --model hf` loads it.

    The folder path goes to lm-eval's own `HFLM` loader (weights, tokenizer, dtype, device),
    so the figures match what a user gets from `lm_eval --model hf --model_args
    pretrained=<dir>`; only the task folders are localized first.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{model_dir}: not an exported model folder (no config.json)")
    requests = _as_requests(tasks)
    start = time.perf_counter()
    import torch
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with TemporaryDirectory(prefix="budgetune-tasks-") as tmp:
        dirs = localize_task_dirs(include_paths, Path(tmp)) if include_paths else []
        manager = build_task_manager(dirs, [r.name for r in requests], include_paths)
        if offline is None:
            offline = tasks_are_local(manager, [r.name for r in requests])
        with hub_offline(offline):
            lm = HFLM(pretrained=str(folder), device=device, dtype=dtype, batch_size=batch_size)
        results = _run(lm, requests, manager, offline, bootstrap_iters)
    return EvalReport(tasks=results, seconds=time.perf_counter() - start)
