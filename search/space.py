"""The search space: which hyperparameters a study searches, and how a sample becomes a run.

A `[search]` entry is either a plain value (fixed: never shown to Optuna) or a table:
`{ choices = [...] }` (categorical), `{ low = ..., high = ..., log = true, step = ... }`
(int when both bounds are ints, else float). `lora_alpha` may also be `{ ratio = 2.0 }`:
alpha = ratio * rank, the Lit-GPT habit of scaling alpha with rank so the update size
(alpha / r) stays put. `[search.mix]` has one entry per source (a weight >= 0, fixed or a
range); sampled weights are normalized into the mixture, and if every weight of a sample
is zero (only possible at range endpoints) the mixture falls back to uniform over the
searched sources, so a mixture with no weight never reaches the engine.

Optuna parameter names (what `trial.params`, optuna-dashboard and reports see): `lora_rank`,
`lora_alpha`, `lora_dropout`, `lora_targets`, `lr`, `micro_batch`, `global_batch`,
`warmup_steps`, `weight_decay`, `mix.<source>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from budgetune.engine.config import TARGETS


@dataclass(frozen=True)
class Fixed:
    """A parameter the study does not search."""

    value: Any


@dataclass(frozen=True)
class Choice:
    """A categorical parameter."""

    choices: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A numeric range; `integer` ranges use `suggest_int`."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False


@dataclass(frozen=True)
class AlphaRatio:
    """lora_alpha = ratio * lora_rank."""

    ratio: float


ParamSpec = Fixed | Choice | Range | AlphaRatio


@dataclass(frozen=True)
class _Rule:
    """What values a parameter accepts, and where it goes in a `RunConfig`."""

    kind: type
    check: str
    """`pos` (> 0), `nonneg` (>= 0), `unit` ([0, 1)), `targets`."""
    default: Any


# Defaults are Lit-GPT's 2023 `finetune/lora.py` values (same as RunConfig's).
RULES: dict[str, _Rule] = {
    "lora_rank": _Rule(int, "pos", 8),
    "lora_alpha": _Rule(float, "pos", 16.0),
    "lora_dropout": _Rule(float, "unit", 0.05),
    "lora_targets": _Rule(str, "targets", "attention"),
    "lr": _Rule(float, "pos", 3e-4),
    "micro_batch": _Rule(int, "pos", 4),
    "global_batch": _Rule(int, "pos", 128),
    "warmup_steps": _Rule(int, "nonneg", 100),
    "weight_decay": _Rule(float, "nonneg", 0.01),
}
MIX_PREFIX = "mix."


def _value_problem(key: str, rule: _Rule, value: Any) -> str | None:
    """Why `value` is not acceptable for the parameter, or None."""
    if rule.kind is str:
        if not isinstance(value, str):
            return f"{key} must be a string"
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key} must be a number"
    elif rule.kind is int and not float(value).is_integer():
        return f"{key} must be an integer"
    if rule.check == "pos" and value <= 0:
        return f"{key} must be > 0"
    if rule.check == "nonneg" and value < 0:
        return f"{key} must be >= 0"
    if rule.check == "unit" and not 0 <= value < 1:
        return f"{key} must be in [0, 1)"
    if rule.check == "targets" and value not in TARGETS:
        return f"{key} {value!r} is unknown (choose {' or '.join(TARGETS)})"
    return None


def parse_param(key: str, raw: Any, rule: _Rule, problems: list[str]) -> ParamSpec | None:
    """One `[search]` entry -> its spec; problems are appended with their key path."""
    if not isinstance(raw, dict):
        p = _value_problem(key, rule, raw)
        if p:
            problems.append(p)
            return None
        return Fixed(rule.kind(raw))
    allowed = {"choices"} | ({"low", "high", "log", "step"} if rule.kind is not str else set())
    if key == "search.lora_alpha":
        allowed |= {"ratio"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        problems.append(
            f"{key}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
        return None
    if "ratio" in raw:
        if len(raw) > 1:
            problems.append(f"{key}: ratio cannot be combined with other keys")
            return None
        r = raw["ratio"]
        if isinstance(r, bool) or not isinstance(r, int | float) or r <= 0:
            problems.append(f"{key}.ratio must be a number > 0")
            return None
        return AlphaRatio(float(r))
    if "choices" in raw:
        if len(raw) > 1:
            problems.append(f"{key}: choices cannot be combined with low/high")
            return None
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            problems.append(f"{key}.choices must be a non-empty list")
            return None
        before = len(problems)
        for i, c in enumerate(choices):
            p = _value_problem(f"{key}.choices[{i}]", rule, c)
            if p:
                problems.append(p)
        if len(problems) > before:
            return None
        if len(set(choices)) != len(choices):
            problems.append(f"{key}.choices has duplicates")
            return None
        return Choice(tuple(rule.kind(c) for c in choices))
    return _parse_range(key, raw, rule, problems)


def _parse_range(key: str, raw: dict[str, Any], rule: _Rule, problems: list[str]) -> Range | None:
    if "low" not in raw or "high" not in raw:
        problems.append(f"{key} needs choices, or low and high (or a plain value to fix it)")
        return None
    before = len(problems)
    for bound in ("low", "high"):
        p = _value_problem(f"{key}.{bound}", rule, raw[bound])
        if p:
            problems.append(p)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{key}.log must be true or false")
    step = raw.get("step")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int | float) or step <= 0
    ):
        problems.append(f"{key}.step must be a number > 0")
    if len(problems) > before:
        return None
    low, high = raw["low"], raw["high"]
    if low > high:
        problems.append(f"{key}.low must be <= {key}.high")
        return None
    if log and low <= 0:
        problems.append(f"{key}.low must be > 0 with log = true")
        return None
    if log and step is not None:
        problems.append(f"{key}: step cannot be used with log = true")
        return None
    integer = rule.kind is int
    return Range(float(low), float(high), bool(log), None if step is None else float(step), integer)


def _suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    if isinstance(spec, Fixed):
        return spec.value
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, list(spec.choices))
    assert isinstance(spec, Range)
    if spec.integer:
        step = int(spec.step or 1)
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


def spec_values(spec: ParamSpec) -> list[Any] | None:
    """Every value a spec can take when that set is finite (fixed or choices), else None."""
    if isinstance(spec, Fixed):
        return [spec.value]
    if isinstance(spec, Choice):
        return list(spec.choices)
    if isinstance(spec, Range) and spec.integer and not spec.log:
        step = int(spec.step or 1)
        return list(range(int(spec.low), int(spec.high) + 1, step))
    return None


@dataclass
class SearchSpace:
    """The `[search]` section: every parameter (searched or fixed) plus the mixture weights."""

    params: dict[str, ParamSpec] = field(default_factory=dict)
    """By Optuna name; parameters the study file does not name are absent (train defaults apply)."""
    mix: dict[str, ParamSpec] = field(default_factory=dict)
    """By source name; empty means the mixture is not searched (proportional to source size)."""

    @property
    def searched(self) -> list[str]:
        """Optuna names of the parameters that are actually searched."""
        names = [n for n, s in self.params.items() if isinstance(s, Choice | Range)]
        return names + [
            MIX_PREFIX + n for n, s in self.mix.items() if isinstance(s, Choice | Range)
        ]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one configuration; fixed values are included but never shown to Optuna.

        Returns every named parameter (fixed or searched, by Optuna name) plus `weights`, the
        normalized mixture (absent when the mix is not searched).
        """
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            if not isinstance(spec, AlphaRatio):
                out[name] = _suggest(trial, name, spec)
        alpha = self.params.get("lora_alpha")
        if isinstance(alpha, AlphaRatio):
            out["lora_alpha"] = alpha.ratio * out["lora_rank"]
        if self.mix:
            raw = {src: float(_suggest(trial, MIX_PREFIX + src, s)) for src, s in self.mix.items()}
            out.update({MIX_PREFIX + k: v for k, v in raw.items()})
            out["weights"] = normalize_mix(
                raw, [s for s, spec in self.mix.items() if not isinstance(spec, Fixed)]
            )
        return out


def normalize_mix(raw: dict[str, float], searched: list[str]) -> dict[str, float]:
    """Weights -> a mixture summing to 1; all-zero falls back to uniform over searched sources."""
    total = sum(raw.values())
    if total > 0:
        return {k: v / total for k, v in raw.items()}
    pool = searched or list(raw)
    return {k: (1.0 / len(pool) if k in pool else 0.0) for k in raw}


def run_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters -> RunConfig field overrides (`lora` as a dict of LoraSettings fields)."""
    lora_map = {
        "lora_rank": "r",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "lora_targets": "targets",
    }
    plain = {"lr": "learning_rate", "micro_batch": "micro_batch", "global_batch": "global_batch",
             "warmup_steps": "warmup_steps", "weight_decay": "weight_decay"}  # fmt: skip
    out: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for name, value in params.items():
        if name in lora_map:
            lora[lora_map[name]] = value
        elif name in plain:
            out[plain[name]] = value
    if lora:
        out["lora"] = lora
    if "weights" in params:
        out["weights"] = dict(params["weights"])
    return out


def parse_space(
    raw: Any, source_names: list[str], defaults: dict[str, Any], problems: list[str]
) -> SearchSpace:
    """The `[search]` table -> SearchSpace, collecting every problem with its key path.

    `defaults` holds the study's fixed values by Optuna name (from `[train]`), used where a
    searched value depends on one the study does not search (alpha ratio, batch divisibility).
    """
    space = SearchSpace()
    if raw is None:
        return space
    if not isinstance(raw, dict):
        problems.append("search must be a table")
        return space
    for key, value in raw.items():
        if key == "mix":
            space.mix = _parse_mix(value, source_names, problems)
        elif key in RULES:
            spec = parse_param(f"search.{key}", value, RULES[key], problems)
            if spec is not None:
                space.params[key] = spec
        else:
            known = ", ".join([*RULES, "mix"])
            problems.append(f"search.{key} is not a known parameter (known: {known})")
    if isinstance(space.params.get("lora_alpha"), AlphaRatio) and "lora_rank" not in space.params:
        space.params["lora_rank"] = Fixed(defaults["lora_rank"])
    _check_batches(space, defaults, problems)
    return space


def _parse_mix(raw: Any, source_names: list[str], problems: list[str]) -> dict[str, ParamSpec]:
    if not isinstance(raw, dict):
        problems.append("search.mix must be a table with one weight per source")
        return {}
    rule = _Rule(float, "nonneg", 1.0)
    mix: dict[str, ParamSpec] = {}
    for name, value in raw.items():
        if name not in source_names:
            problems.append(
                f"search.mix.{name} names no source (sources: {', '.join(source_names)})"
            )
            continue
        spec = parse_param(f"search.mix.{name}", value, rule, problems)
        if spec is not None:
            mix[name] = spec
    for name in source_names:
        if name not in raw:
            problems.append(
                f"search.mix.{name} is missing (give every source a weight, 0 to leave it out)"
            )
    if mix and all(isinstance(s, Fixed) and s.value == 0 for s in mix.values()):
        problems.append("search.mix gives every source weight 0: no data to train on")
    for name, spec in mix.items():
        if isinstance(spec, Range) and spec.high <= 0:
            problems.append(f"search.mix.{name}.high must be > 0")
    return mix


def _check_batches(space: SearchSpace, defaults: dict[str, Any], problems: list[str]) -> None:
    """Every micro-batch the space can sample must divide every global batch it can sample."""
    micro = spec_values(space.params.get("micro_batch", Fixed(defaults["micro_batch"])))
    glob = spec_values(space.params.get("global_batch", Fixed(defaults["global_batch"])))
    if micro is None or glob is None:
        problems.append(
            "search.micro_batch and search.global_batch must be choices or fixed values"
        )
        return
    bad = sorted({(g, m) for g in glob for m in micro if g < m or g % m})
    if bad:
        g, m = bad[0]
        problems.append(
            f"search.global_batch ({g}) must be a multiple of every search.micro_batch choice ({m})"
        )
