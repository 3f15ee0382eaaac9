"""Study files: one TOML file says everything about a budgeted search.

`load_study(path)` reads and validates a study file into a typed `Study`; every problem is
reported in ONE `UserInputError` with its key path (`search.lr.low must be > 0`), and
unknown keys are errors, never silently ignored. Relative paths are resolved against the
study file's folder, so a study runs the same from any working directory; the raw text and
that folder are what the driver snapshots into storage (`load_study_text` re-reads a
snapshot on resume).

Sections: `[study]` name, seed, run_dir, storage, backend, max_trials, patience;
`[model]` name, precision, quantize; `[data]` max_seq_length, mask_prompt,
`[[data.sources]]`, `[data.validation]`; `[train]` fixed RunConfig defaults (the
"default configuration", also what `budgetune train` runs); `[search]` (see `space.py`);
`[budget]`; `[sampler]`; `[pruner]`; `[eval]` (owned by `search/evaluation.py`);
`[fake]` (settings of the fake backend, only with `backend = "fake"`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgetune.engine.config import PRECISIONS, SCHEMAS, LoraSettings, RunConfig, SourceSpec
from budgetune.engine.errors import UserInputError
from budgetune.search.space import RULES, SearchSpace, parse_space, run_overrides

SECTIONS = (
    "study",
    "model",
    "data",
    "train",
    "search",
    "budget",
    "sampler",
    "pruner",
    "eval",
    "fake",
)
BACKENDS = ("engine", "fake")
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "successive-halving", "median", "none")
# RunConfig fields a study fixes elsewhere (model/data sections) or the driver sets per run.
_NOT_IN_TRAIN = {"model", "sources", "val", "out_dir", "weights", "precision", "quantize", "lora"}


@dataclass
class ModelSpec:
    name: str
    """Local folder (resolved) or hub id of the base model."""
    precision: str = "32-true"
    quantize: str | None = None


@dataclass
class DataSpec:
    sources: list[SourceSpec]
    validation: SourceSpec
    max_seq_length: int = 2048
    mask_prompt: bool = False


@dataclass
class BudgetSpec:
    """GPU-seconds: how the total splits into search and final run (rules in `ledger.py`)."""

    total_s: float
    """Everything the study may spend: trials, their evals, the final run, driver overhead."""
    trial_s: float
    """Configured allowance of one trial (setup + training + its short-horizon eval)."""
    final_share: float = 0.6
    """Fraction of the total reserved for the final run (it also gets whatever search leaves).
    0.6 by default: on the replayed quickstart curves (tests/benchmarks/
    bench_search_policies.py) the final run's length moved the final quality far more than
    more trials did; 0.3 left the default policy no better than random search."""
    min_trial_s: float | None = None
    """A trial is started only if it can get at least this much (default: trial_s / 2)."""
    margin_s: float | None = None
    """Search-share slack for driver overhead and one-step overruns (default: 1%, >= 1 s)."""
    trial_eval_s: float = 0.0
    """Expected seconds of a trial's short-horizon eval after training (kept out of its horizon)."""
    trial_setup_s: float = 0.0
    """Expected seconds to set up a trial before training (kept out of its horizon)."""
    final_tail_s: float | None = None
    """Seconds kept after the final run's training for its eval, merge and export (default 2%)."""

    @property
    def final_reserve_s(self) -> float:
        return self.total_s * self.final_share

    @property
    def search_s(self) -> float:
        return self.total_s - self.final_reserve_s

    @property
    def min_trial(self) -> float:
        return self.trial_s / 2 if self.min_trial_s is None else self.min_trial_s

    @property
    def margin(self) -> float:
        return max(1.0, 0.01 * self.total_s) if self.margin_s is None else self.margin_s

    @property
    def final_tail(self) -> float:
        return 0.02 * self.total_s if self.final_tail_s is None else self.final_tail_s


@dataclass
class SamplerSpec:
    kind: str = "tpe"
    n_startup_trials: int = 5
    multivariate: bool = True


@dataclass
class PrunerSpec:
    """Intermediate values are validation losses at optimizer steps (the engine's evals)."""

    kind: str = "hyperband"
    min_resource: int | None = None
    """Optimizer steps before the first pruning decision (default: the eval interval)."""
    reduction_factor: int = 3
    n_startup_trials: int = 3
    """median: trials that complete before it prunes anything."""
    n_warmup_steps: int = 0
    """median: optimizer steps of a trial before it may be pruned."""


@dataclass
class FakeSpec:
    """The fake backend: simulated learning curves, for driver tests and budget dry runs."""

    clock: str = "virtual"
    """`virtual` (instant) or `real` (sleeps, so a process can be interrupted mid-trial)."""
    step_s: float = 0.05
    """Seconds of one optimizer step at micro_batch 1, rank 8."""
    memory_limit: float = 0.0
    """OOM when micro_batch * rank * max_seq_length exceeds this (0: never)."""
    diverge_lr: float = 0.0
    """Diverge when lr exceeds this (0: never)."""
    setup_s: float = 0.0
    """Seconds of setup before each trial's training."""


@dataclass
class Study:
    """A validated study file (see the module docstring for its sections)."""

    name: str
    seed: int
    text: str
    """The raw TOML text, snapshotted into storage at launch."""
    study_dir: Path
    """Folder relative paths were resolved against."""
    run_dir: Path
    storage: str
    """SQLAlchemy URL of the Optuna storage (default: SQLite in the run directory)."""
    model: ModelSpec
    data: DataSpec
    train: dict[str, Any]
    """Fixed RunConfig field values (the default configuration); `lora` is a dict."""
    space: SearchSpace
    budget: BudgetSpec
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    backend: str = "engine"
    max_trials: int | None = None
    patience: int | None = None
    """Stop searching after this many finished trials without a new best (None: never)."""
    eval: Any = None
    """Parsed `[eval]` section (`search/evaluation.py`), or None: objective = validation loss."""
    fake: FakeSpec = field(default_factory=FakeSpec)
    path: Path | None = None

    def run_config(
        self, out_dir: Path, params: dict[str, Any] | None = None, **horizon: Any
    ) -> RunConfig:
        """A RunConfig: the `[train]` defaults, then sampled `params`, then the horizon given.

        `params` are by Optuna name (see `space.py`); `horizon` is one of max_steps,
        max_tokens, max_seconds and replaces any horizon `[train]` sets.
        """
        values = dict(self.train)
        lora = dict(values.pop("lora", {}))
        over = run_overrides(params or {})
        lora.update(over.pop("lora", {}))
        values.update(over)
        if horizon:
            for k in ("max_steps", "max_tokens", "max_seconds"):
                values.pop(k, None)
            values.update(horizon)
        return RunConfig(
            model=self.model.name,
            sources=[dataclasses.replace(s) for s in self.data.sources],
            val=dataclasses.replace(self.data.validation),
            out_dir=Path(out_dir),
            precision=self.model.precision,
            quantize=self.model.quantize,
            max_seq_length=self.data.max_seq_length,
            mask_prompt=self.data.mask_prompt,
            seed=values.pop("seed", self.seed),
            lora=LoraSettings(**lora),
            **values,
        )

    def default_params(self) -> dict[str, Any]:
        """The default configuration by Optuna name (what `[train]` fixes), for comparisons."""
        cfg = self.run_config(self.run_dir / "default", max_steps=1)
        return {
            "lora_rank": cfg.lora.r,
            "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout,
            "lora_targets": cfg.lora.targets,
            "lr": cfg.learning_rate,
            "micro_batch": cfg.micro_batch,
            "global_batch": cfg.global_batch,
            "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay,
        }


def load_study(
    path: str | Path, *, run_dir: Path | None = None, storage: str | None = None
) -> Study:
    """Read and validate a study file; `run_dir`/`storage` override the file's values."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such study file") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror})") from None
    return load_study_text(
        text, path.resolve().parent, source=str(path), run_dir=run_dir, storage=storage, path=path
    )


def load_study_text(
    text: str,
    study_dir: Path,
    *,
    source: str = "study",
    run_dir: Path | None = None,
    storage: str | None = None,
    path: Path | None = None,
) -> Study:
    """Validate study TOML text; relative paths resolve against `study_dir`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{source}: not valid TOML ({e})") from None
    problems: list[str] = []
    study = _parse(raw, text, Path(study_dir), problems, run_dir, storage)
    if problems or study is None:
        raise UserInputError(f"{source}: " + "; ".join(problems))
    study.path = path
    return study


def _table(
    raw: dict[str, Any], key: str, allowed: set[str], problems: list[str], prefix: str = ""
) -> dict[str, Any]:
    """A sub-table, with every unknown key reported by its path."""
    value = raw.get(key, {})
    where = f"{prefix}{key}"
    if not isinstance(value, dict):
        problems.append(f"{where} must be a table")
        return {}
    for k in value:
        if k not in allowed:
            problems.append(f"{where}.{k} is not a known key (known: {', '.join(sorted(allowed))})")
    return value


def _typed(
    t: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    problems: list[str],
    default: Any,
) -> Any:
    """t[key] if it has the right type (ints accepted for floats), else a problem and default."""
    if key not in t:
        return default
    v = t[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, bool) and bool not in kinds:
        problems.append(f"{where}.{key} must be {kinds[0].__name__}")
        return default
    if not isinstance(v, kinds):
        problems.append(f"{where}.{key} must be {' or '.join(k.__name__ for k in kinds)}")
        return default
    return v


def _resolve(value: str, study_dir: Path) -> str:
    """A path relative to the study's folder; hub ids (`org/name` that is no local path) pass."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = study_dir / p
    # A hub id is `org/name`; a path starts with ./, names a file type, or starts in a folder
    # that exists beside the study file (the file itself may not be built yet).
    looks_local = (
        value.startswith((".", "~"))
        or p.suffix.lower() in {".json", ".jsonl", ".parquet", ".csv", ".txt"}
        or (study_dir / p.parts[0]).exists()
    )
    return str(local.resolve()) if looks_local else value


def _parse(
    raw: dict[str, Any], text: str, study_dir: Path, problems: list[str],
    run_dir: Path | None, storage: str | None,
) -> Study | None:  # fmt: skip
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key} is not a known section (known: {', '.join(SECTIONS)})")
    st = _table(
        raw,
        "study",
        {"name", "seed", "run_dir", "storage", "backend", "max_trials", "patience"},
        problems,
    )
    name = _typed(st, "name", str, "study", problems, "")
    if not name:
        problems.append("study.name is required")
    seed = _typed(st, "seed", int, "study", problems, 0)
    backend = _typed(st, "backend", str, "study", problems, "engine")
    if backend not in BACKENDS:
        problems.append(f"study.backend {backend!r} is unknown (choose {' or '.join(BACKENDS)})")
    max_trials = _typed(st, "max_trials", int, "study", problems, None)
    if max_trials is not None and max_trials < 1:
        problems.append("study.max_trials must be >= 1")
    patience = _typed(st, "patience", int, "study", problems, None)
    if patience is not None and patience < 1:
        problems.append("study.patience must be >= 1")
    # An explicit run_dir is relative to the study file; none given means ./runs/<name>.
    if run_dir is not None:
        rd = Path(run_dir)
    elif "run_dir" in st:
        rd = study_dir / Path(_typed(st, "run_dir", str, "study", problems, name)).expanduser()
    else:
        rd = Path.cwd() / "runs" / name
    rd = rd.resolve()
    url = (
        storage
        or _typed(st, "storage", str, "study", problems, "")
        or f"sqlite:///{rd / 'study.db'}"
    )

    model = _parse_model(raw, study_dir, problems)
    data = _parse_data(raw, study_dir, problems)
    train = _parse_train(raw, problems)
    defaults = _train_defaults(train)
    space = parse_space(
        raw.get("search"), [s.name for s in data.sources] if data else [], defaults, problems
    )
    budget = _parse_budget(raw, problems)
    sampler = _parse_sampler(raw, problems)
    pruner = _parse_pruner(raw, problems)
    fake = _parse_fake(raw, backend, problems)
    ev = _parse_eval(raw, study_dir, problems)
    if model is None or data is None or budget is None:
        return None
    study = Study(
        name=name, seed=seed, text=text, study_dir=study_dir, run_dir=rd, storage=url,
        model=model, data=data, train=train, space=space, budget=budget, sampler=sampler,
        pruner=pruner, backend=backend, max_trials=max_trials, patience=patience, eval=ev,
        fake=fake,
    )  # fmt: skip
    if not problems:
        try:  # [train] + the data/model sections must make a valid RunConfig.
            study.run_config(rd / "check", **({} if _has_horizon(train) else {"max_steps": 1}))
        except UserInputError as e:
            problems.append(f"train: {e}")
        except TypeError as e:
            problems.append(f"train: {e}")
    return study


def _has_horizon(train: dict[str, Any]) -> bool:
    return any(train.get(k) is not None for k in ("max_steps", "max_tokens", "max_seconds"))


def _parse_model(raw: dict[str, Any], study_dir: Path, problems: list[str]) -> ModelSpec | None:
    t = _table(raw, "model", {"name", "precision", "quantize"}, problems)
    name = _typed(t, "name", str, "model", problems, "")
    if not name:
        problems.append("model.name is required (a local folder or a hub id)")
        return None
    precision = _typed(t, "precision", str, "model", problems, "32-true")
    if precision not in PRECISIONS:
        problems.append(
            f"model.precision {precision!r} is unknown (choose one of {', '.join(PRECISIONS)})"
        )
    quantize = _typed(t, "quantize", str, "model", problems, None)
    if quantize not in (None, "nf4"):
        problems.append(f"model.quantize {quantize!r} is unknown (only 'nf4')")
    return ModelSpec(_resolve(name, study_dir), precision, quantize)


def _parse_source(
    t: Any, where: str, study_dir: Path, problems: list[str], default_name: str
) -> SourceSpec | None:
    if not isinstance(t, dict):
        problems.append(f"{where} must be a table")
        return None
    for k in t:
        if k not in {"name", "path", "schema", "split", "limit"}:
            problems.append(
                f"{where}.{k} is not a known key (known: limit, name, path, schema, split)"
            )
    name = _typed(t, "name", str, where, problems, default_name)
    path = _typed(t, "path", str, where, problems, "")
    schema = _typed(t, "schema", str, where, problems, "")
    if not path:
        problems.append(f"{where}.path is required (a local file or a hub dataset id)")
    if schema not in SCHEMAS:
        problems.append(f"{where}.schema {schema!r} is unknown (choose {', '.join(SCHEMAS)})")
    limit = _typed(t, "limit", int, where, problems, None)
    if limit is not None and limit < 1:
        problems.append(f"{where}.limit must be >= 1")
    split = _typed(t, "split", str, where, problems, "train")
    if not name or not path:
        return None
    return SourceSpec(
        name=name, path=_resolve(path, study_dir), schema=schema, split=split, limit=limit
    )  # type: ignore[arg-type]


def _parse_data(raw: dict[str, Any], study_dir: Path, problems: list[str]) -> DataSpec | None:
    t = _table(raw, "data", {"sources", "validation", "max_seq_length", "mask_prompt"}, problems)
    sources_raw = t.get("sources", [])
    if not isinstance(sources_raw, list) or not sources_raw:
        problems.append("data.sources must list at least one [[data.sources]] table")
        sources_raw = []
    sources = [
        s for i, r in enumerate(sources_raw)
        if (s := _parse_source(r, f"data.sources[{i}]", study_dir, problems, "")) is not None
    ]  # fmt: skip
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        problems.append("data.sources names must be unique")
    if "validation" not in t:
        problems.append("data.validation is required (the fixed validation set)")
        return None
    val = _parse_source(t["validation"], "data.validation", study_dir, problems, "val")
    msl = _typed(t, "max_seq_length", int, "data", problems, 2048)
    if msl < 8:
        problems.append("data.max_seq_length must be >= 8")
    mask = _typed(t, "mask_prompt", bool, "data", problems, False)
    if val is None:
        return None
    return DataSpec(sources, val, msl, mask)


def _parse_train(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _NOT_IN_TRAIN}
    t = _table(raw, "train", set(fields) | {"lora"}, problems)
    out: dict[str, Any] = {}
    for k, v in t.items():
        if k == "lora":
            lora_fields = {f.name for f in dataclasses.fields(LoraSettings)}
            lt = _table(t, "lora", lora_fields, problems, prefix="train.")
            out["lora"] = {k2: v2 for k2, v2 in lt.items() if k2 in lora_fields}
        elif k in fields:
            out[k] = str(v) if k == "cache_dir" else v
    return out


def _train_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """Fixed values by Optuna name, from `[train]` or RunConfig's own defaults."""
    lora = train.get("lora", {})
    return {
        "lora_rank": lora.get("r", RULES["lora_rank"].default),
        "micro_batch": train.get("micro_batch", RULES["micro_batch"].default),
        "global_batch": train.get("global_batch", RULES["global_batch"].default),
    }


def _parse_budget(raw: dict[str, Any], problems: list[str]) -> BudgetSpec | None:
    names = {f.name for f in dataclasses.fields(BudgetSpec)}
    t = _table(raw, "budget", names, problems)
    if "total_s" not in t or "trial_s" not in t:
        problems.append("budget.total_s and budget.trial_s are required (GPU-seconds)")
        return None
    vals = {k: _typed(t, k, float, "budget", problems, None) for k in names if k in t}
    if any(v is None for v in vals.values()):
        return None
    b = BudgetSpec(**vals)
    n = len(problems)
    for k in ("total_s", "trial_s"):
        if getattr(b, k) <= 0:
            problems.append(f"budget.{k} must be > 0")
    if not 0 < b.final_share < 1:
        problems.append("budget.final_share must be in (0, 1)")
    for k in ("min_trial_s", "margin_s", "trial_eval_s", "trial_setup_s", "final_tail_s"):
        v = getattr(b, k)
        if v is not None and v < 0:
            problems.append(f"budget.{k} must be >= 0")
    if len(problems) > n:
        return None
    if b.min_trial > b.trial_s:
        problems.append("budget.min_trial_s must be <= budget.trial_s")
    if b.trial_eval_s + b.trial_setup_s >= b.min_trial:
        problems.append(
            "budget.trial_eval_s + budget.trial_setup_s must leave a trial time to train"
        )
    if b.search_s - b.margin < b.min_trial:
        problems.append(
            f"budget: the search share ({b.search_s:g} s minus margin {b.margin:g} s) cannot hold "
            f"one trial of budget.min_trial_s={b.min_trial:g} s"
        )
    if b.final_tail >= b.final_reserve_s:
        problems.append("budget.final_tail_s must be < the final reserve (total_s * final_share)")
    return b


def _parse_sampler(raw: dict[str, Any], problems: list[str]) -> SamplerSpec:
    t = _table(raw, "sampler", {"kind", "n_startup_trials", "multivariate"}, problems)
    s = SamplerSpec(
        kind=_typed(t, "kind", str, "sampler", problems, "tpe"),
        n_startup_trials=_typed(t, "n_startup_trials", int, "sampler", problems, 5),
        multivariate=_typed(t, "multivariate", bool, "sampler", problems, True),
    )
    if s.kind not in SAMPLERS:
        problems.append(f"sampler.kind {s.kind!r} is unknown (choose {' or '.join(SAMPLERS)})")
    if s.n_startup_trials < 0:
        problems.append("sampler.n_startup_trials must be >= 0")
    return s


def _parse_pruner(raw: dict[str, Any], problems: list[str]) -> PrunerSpec:
    names = {f.name for f in dataclasses.fields(PrunerSpec)}
    t = _table(raw, "pruner", names, problems)
    p = PrunerSpec(
        kind=_typed(t, "kind", str, "pruner", problems, "hyperband"),
        min_resource=_typed(t, "min_resource", int, "pruner", problems, None),
        reduction_factor=_typed(t, "reduction_factor", int, "pruner", problems, 3),
        n_startup_trials=_typed(t, "n_startup_trials", int, "pruner", problems, 3),
        n_warmup_steps=_typed(t, "n_warmup_steps", int, "pruner", problems, 0),
    )
    if p.kind not in PRUNERS:
        problems.append(f"pruner.kind {p.kind!r} is unknown (choose {', '.join(PRUNERS)})")
    if p.min_resource is not None and p.min_resource < 1:
        problems.append("pruner.min_resource must be >= 1")
    if p.reduction_factor < 2:
        problems.append("pruner.reduction_factor must be >= 2")
    if p.n_startup_trials < 0 or p.n_warmup_steps < 0:
        problems.append("pruner.n_startup_trials and pruner.n_warmup_steps must be >= 0")
    return p


def _parse_fake(raw: dict[str, Any], backend: str, problems: list[str]) -> FakeSpec:
    names = {f.name for f in dataclasses.fields(FakeSpec)}
    if "fake" in raw and backend != "fake":
        problems.append('fake is only allowed with study.backend = "fake"')
    t = _table(raw, "fake", names, problems)
    values = {}
    for k in names & set(t):
        kind = str if k == "clock" else float
        values[k] = _typed(t, k, kind, "fake", problems, getattr(FakeSpec, k))
    f = FakeSpec(**values)
    if f.clock not in ("virtual", "real"):
        problems.append("fake.clock must be virtual or real")
    if f.step_s <= 0:
        problems.append("fake.step_s must be > 0")
    return f


def _parse_eval(raw: dict[str, Any], study_dir: Path, problems: list[str]) -> Any:
    """`[eval]` belongs to `search/evaluation.py`; its problems join ours in the one error."""
    if "eval" not in raw:
        return None
    try:
        from budgetune.search.evaluation import EvalSettings
    except ImportError:
        problems.append("eval: this installation has no evaluation support (search/evaluation.py)")
        return None
    try:
        return EvalSettings.from_toml(raw["eval"], study_dir)
    except UserInputError as e:
        problems.append(str(e))
        return None
