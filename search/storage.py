"""A study's Optuna storage: open it, snapshot the study file into it, load it back.

The storage is an Optuna `RDBStorage` (SQLite in the run directory by default, any
SQLAlchemy URL otherwise), with heartbeats on so a later multi-worker driver can tell a dead
worker from a slow one. At launch the study file's raw TOML text, the folder its relative
paths resolve against, and the resolved run directory and storage URL go into study user
attributes (`budgetune.*`), so `budgetune resume <run dir | URL>` needs nothing else.
Sampler and pruner are rebuilt from that snapshot on every (re)start: Optuna does not
persist them.
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.pruners import BasePruner

from budgetune.engine.errors import UserInputError
from budgetune.search.ledger import tune_sqlite
from budgetune.search.study import Study, load_study_text

TEXT_KEY = "budgetune.study_toml"
DIR_KEY = "budgetune.study_dir"
RUN_DIR_KEY = "budgetune.run_dir"
FILE_KEY = "budgetune.study_file"
HEARTBEAT_S = 60
GRACE_S = 600


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at `url`; a SQLite file's folder is created first."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except Exception as e:  # a bad URL, an unreachable server, a missing driver
        raise UserInputError(f"storage {url}: cannot open ({type(e).__name__}: {e})") from None
    if url.startswith("sqlite"):
        tune_sqlite(storage.engine)
    return storage


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    if study.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=study.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate is "experimental" in Optuna's terms
        # constant_liar: trials running on other workers count as bad ones, so workers
        # sharing the study do not all sample the same promising point
        return optuna.samplers.TPESampler(
            seed=study.seed,
            n_startup_trials=study.sampler.n_startup_trials,
            multivariate=study.sampler.multivariate,
            warn_independent_sampling=False,
            constant_liar=True,
        )


def make_pruner(study: Study) -> BasePruner:
    """Steps are optimizer steps; the first rung defaults to the eval interval."""
    p = study.pruner
    min_resource = p.min_resource or int(study.train.get("eval_interval", 100))
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource="auto", reduction_factor=p.reduction_factor
        )
    if p.kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=p.reduction_factor
        )
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    return optuna.pruners.NopPruner()


def _same_file(a: str, b: str) -> bool:
    """Two study files are the same if they parse to the same TOML (comments don't count)."""
    try:
        return tomllib.loads(a) == tomllib.loads(b)
    except tomllib.TOMLDecodeError:
        return a == b


def create_or_load(study: Study, storage: optuna.storages.RDBStorage) -> optuna.Study:
    """Create the study and snapshot its file, or load it if the SAME file launched it."""
    names = optuna.get_all_study_names(storage)
    kwargs = {"sampler": make_sampler(study), "pruner": make_pruner(study)}
    if study.name in names:
        ostudy = optuna.load_study(study_name=study.name, storage=storage, **kwargs)
        snap = ostudy.user_attrs.get(TEXT_KEY)
        if snap is None or not _same_file(snap, study.text):
            where = ostudy.user_attrs.get(RUN_DIR_KEY, study.storage)
            raise UserInputError(
                f"study {study.name!r} already exists in {study.storage} with a different "
                f"study file; continue it with `budgetune resume {where}`, or give this "
                "file a new [study] name"
            )
        return ostudy
    ostudy = optuna.create_study(
        storage=storage, study_name=study.name, direction="minimize", **kwargs
    )
    ostudy.set_user_attr(TEXT_KEY, study.text)
    ostudy.set_user_attr(DIR_KEY, str(study.study_dir))
    ostudy.set_user_attr(RUN_DIR_KEY, str(study.run_dir))
    ostudy.set_user_attr(FILE_KEY, str(study.path) if study.path else "")
    return ostudy


def resolve_target(target: str) -> str:
    """A run directory or a storage URL -> the storage URL."""
    if "://" in target:
        return target
    path = Path(target).expanduser()
    db = path / "study.db"
    if path.is_dir() and db.exists():
        return f"sqlite:///{db.resolve()}"
    if path.is_file() and path.suffix == ".db":
        return f"sqlite:///{path.resolve()}"
    raise UserInputError(f"{target}: not a run directory with a study.db, nor a storage URL")


def load_from_storage(target: str, name: str | None = None) -> tuple[Study, optuna.Study]:
    """The study snapshotted in the storage at `target` (a run dir or URL), and its Optuna study."""
    url = resolve_target(target)
    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise UserInputError(f"{target}: name the study with --study (studies: {listed})")
        name = names[0]
    elif name not in names:
        raise UserInputError(f"{target}: no study named {name!r} (studies: {', '.join(names)})")
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    if TEXT_KEY not in attrs:
        raise UserInputError(f"{target}: study {name!r} was not launched by budgetune")
    study = load_study_text(
        attrs[TEXT_KEY],
        Path(attrs[DIR_KEY]),
        source=f"{target} (study {name!r})",
        run_dir=Path(attrs[RUN_DIR_KEY]),
        storage=url,
        path=Path(attrs[FILE_KEY]) if attrs.get(FILE_KEY) else None,
    )
    ostudy = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(study), pruner=make_pruner(study)
    )
    return study, ostudy
