"""The engine's CLI commands: `budgetune train | prepare | generate | merge`.

`search/cli.py` parses arguments and calls these; each does one thing with the engine and
prints where its outputs went. A run with fixed hyperparameters reads the same study file a
search does: the `[train]` table is the default configuration, `key=value` overrides change it
(`lr=1e-3 r=16 weights.dolly=2`), and the horizon defaults to the study's `max_steps`.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from pathlib import Path
from typing import Any

from rich.console import Console

from budgetune.engine.config import LoraSettings, RunConfig
from budgetune.engine.errors import UserInputError

ALIASES: dict[str, str] = {
    "lr": "learning_rate",
    "r": "lora.r",
    "rank": "lora.r",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "targets": "lora.targets",
}
"""Short override names -> RunConfig field paths (`lora.<field>` for LoRA settings)."""
HORIZONS = ("max_steps", "max_tokens", "max_seconds")
_NOT_OVERRIDABLE = {"model", "sources", "val", "out_dir", "weights", "lora"}


def _console() -> Console:
    return Console(stderr=True, highlight=False)


def _field_type(cls: type, name: str) -> type:
    """The scalar type a dataclass field holds (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0] if args else str
    if typing.get_origin(hint) is typing.Literal:
        return str
    return hint if hint in (int, float, str, bool) else str


def _parse_value(key: str, raw: str, kind: type, optional: bool) -> Any:
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if kind is int:
            value = float(raw)
            if value != int(value):
                raise ValueError
            return int(value)
        return kind(raw)
    except ValueError:
        raise UserInputError(f"override {key}={raw!r}: not a valid {kind.__name__}") from None


def _is_optional(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`config` with `key=value` overrides applied; an unknown key is a user error naming it.

    Keys: any scalar RunConfig field (`micro_batch`, `max_seconds`, `seed`, ...), the aliases
    in `ALIASES`, `lora.<field>`, and `weights.<source>` (the rest of the mix keeps its
    weights; sources not named keep theirs, or 1.0 each when the study gave none). Giving a
    horizon replaces the study's.
    """
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - _NOT_OVERRIDABLE
    lora_fields = {f.name for f in dataclasses.fields(LoraSettings)}
    sources = [s.name for s in config.sources]
    top: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    weights: dict[str, float] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserInputError(f"override {item!r}: expected key=value")
        path = ALIASES.get(key, key)
        if path.startswith("weights."):
            name = path.removeprefix("weights.")
            if name not in sources:
                raise UserInputError(
                    f"override {key}: no source {name!r} (sources: {', '.join(sources)})"
                )
            weights[name] = _parse_value(key, raw, float, False)
        elif path.startswith("lora.") and path.removeprefix("lora.") in lora_fields:
            name = path.removeprefix("lora.")
            lora[name] = _parse_value(key, raw, _field_type(LoraSettings, name), False)
        elif path in run_fields:
            kind = _field_type(RunConfig, path)
            top[path] = _parse_value(key, raw, kind, _is_optional(RunConfig, path))
        else:
            raise UserInputError(
                f"override {key!r}: unknown key (use a RunConfig field, "
                f"{', '.join(ALIASES)}, lora.<field> or weights.<source>)"
            )
    if any(h in top for h in HORIZONS):
        for h in HORIZONS:
            top.setdefault(h, None)
    if weights:
        base = dict(config.weights) if config.weights else {n: 1.0 for n in sources}
        top["weights"] = base | weights
    if lora:
        top["lora"] = dataclasses.replace(config.lora, **lora)
    return dataclasses.replace(config, **top) if top else config


def build_run_config(study_path: Path, overrides: list[str], out_dir: Path | None) -> RunConfig:
    """The study's default configuration, overridden, with the study's horizon by default."""
    from budgetune.search.study import load_study

    study = load_study(study_path)
    if out_dir is None:
        out_dir = study.run_dir / "train" / time.strftime("%Y%m%d-%H%M%S")
    keys = {o.partition("=")[0].strip() for o in overrides}
    has_horizon = any(study.train.get(h) is not None for h in HORIZONS)
    if not has_horizon and not keys & set(HORIZONS):
        raise UserInputError(
            f"{study_path}: no horizon: set max_steps (or max_tokens/max_seconds) in [train] "
            "or give one, e.g. max_steps=100"
        )
    # A placeholder horizon keeps RunConfig valid until the overrides replace it.
    horizon = {} if has_horizon else {"max_steps": 1}
    config = study.run_config(Path(out_dir), **horizon)
    return apply_overrides(config, overrides)


def train(study: Path, overrides: list[str], out_dir: Path | None) -> None:
    """`budgetune train`: one run with fixed hyperparameters, resumable with the same --out-dir."""
    from budgetune.engine.train import run

    config = build_run_config(study, overrides, out_dir)
    console = _console()
    result = run(config)
    console.print(
        f"{result.status} after {result.step} steps ({result.elapsed_s:.1f} s): "
        f"val_loss {result.metrics.get('val_loss', float('nan')):.4f} "
        f"(from {result.metrics.get('initial_val_loss', float('nan')):.4f})"
    )
    n_long = int(result.metrics.get("n_prompt_too_long", 0))
    n_cut = int(result.metrics.get("n_truncated", 0))
    if n_long or n_cut:
        console.print(
            f"max_seq_length={config.max_seq_length}: {n_cut} examples truncated, "
            f"{n_long} dropped (prompt alone too long)"
        )
    print(f"run directory: {config.out_dir}")
    print(f"metrics:       {config.out_dir / 'metrics.jsonl'}")
    print(f"adapter:       {result.adapter_dir}")


def prepare(study_path: Path) -> None:
    """`budgetune prepare`: fetch the model and datasets, build the tokenized cache."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from budgetune.engine.data import default_cache_dir, tokenize_source
    from budgetune.engine.model import load_tokenizer, resolve_model_path
    from budgetune.search.study import load_study

    study = load_study(study_path)
    console = _console()
    specs = [*study.data.sources, study.data.validation]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    rows = []
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"model {study.model.name}", total=len(specs) + 1)
        path = resolve_model_path(study.model.name)
        tokenizer = load_tokenizer(path)
        bar.advance(task)
        cache_dir = study.train.get("cache_dir") or default_cache_dir()
        for spec in specs:
            bar.update(task, description=f"tokenizing {spec.name}")
            tok = tokenize_source(
                spec, tokenizer, study.data.max_seq_length, study.data.mask_prompt,
                Path(cache_dir),
            )  # fmt: skip
            rows.append((spec.name, len(tok), tok.n_tokens, tok.n_truncated, tok.n_prompt_too_long))
            bar.advance(task)
    print(f"model:  {path}")
    for name, n, n_tokens, n_cut, n_long in rows:
        note = f", {n_cut} truncated" if n_cut else ""
        note += f", {n_long} dropped (prompt longer than max_seq_length)" if n_long else ""
        print(f"data:   {name}: {n} examples, {n_tokens} tokens{note}")
    print(f"cache:  {Path(cache_dir)}")


def generate(
    model: str, prompt: str, adapter: Path | None, max_new_tokens: int, temperature: float,
    top_k: int | None, raw: bool,
) -> None:  # fmt: skip
    """`budgetune generate`: answer a prompt with an exported model, a base+adapter, or a run."""
    import torch

    from budgetune.engine.export import adapter_base, find_adapter, generate_text, load_with_adapter

    base = model
    local = Path(model).expanduser()
    if adapter is None and (
        (local / "adapter_config.json").is_file() or (local / "adapter").is_dir()
    ):
        adapter = local
    adapter_dir = find_adapter(adapter) if adapter is not None else None
    if adapter_dir is not None and adapter is local:
        base = adapter_base(adapter_dir)
    loaded, tokenizer = load_with_adapter(base, adapter_dir)
    if torch.cuda.is_available():
        loaded = loaded.to("cuda")
    text = generate_text(
        loaded, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, template=not raw,
    )  # fmt: skip
    print(text)


def merge(adapter: Path, out_dir: Path, base: str | None) -> None:
    """`budgetune merge`: merge an adapter (or a run's) into its base; save an HF folder."""
    from budgetune.engine.export import merge_adapter

    out = merge_adapter(adapter, out_dir, base)
    print(f"merged model: {out}")
