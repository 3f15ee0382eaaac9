"""Record learning curves of the real engine over a grid, for the replay backend.

Run: ``python -m budgetune.search.record_curves --out tests/benchmarks/data/quickstart_curves.csv``
(defaults: the quickstart study, 3 ranks x 3 learning rates x 2 micro-batches x 2 mixtures
x 2 seeds, each at horizons of 120 and 30 steps with an eval every 4: the shipped recording;
15 minutes with `--shard 0/2` and `--shard 1/2` side by side on two CPU cores).

Each grid point is one engine run of the study's default configuration (`[train]`) with the
grid's rank, learning rate, micro-batch and mixture, trained with a steps horizon and
validated every `--eval-interval` steps; every validation pass becomes a row of the curves
format (`search/curves.py`), plus a step-0 row with the base model's loss. `lora_alpha`
follows the study's search space (`ratio` x rank, or its fixed value) and is not a column,
so the mapping rule weighs rank once. Mixtures: `default` (the engine's own: proportional
to source size), `uniform`, or explicit weights such as `dolly=2/alpaca=1`.

Time: `elapsed_s` is the process CPU time the run used, with torch on one thread, counted
from the start of the run's setup. The recording machines are shared, so wall time would
also measure the neighbours; one thread's CPU time is what the run costs on a quiet core.
Even CPU time varies with the neighbours' load (caches, memory bandwidth: +-20% between
identical runs here), so the written file replaces each run's times by the median, step by
step, over the runs that do the same work: same rank, micro-batch, mixture and horizon (the
learning rate and the seed change the numbers, not the work). `--raw-time` keeps them.

If the study has an `[eval]` section and `--score` is given, the trial objective
(`search/evaluation.py`) of each run's final model is recorded in `score` on its last row.
Runs are written one file each under `--work-dir/parts` as they finish, so an interrupted
recording continues where it stopped; the output is assembled from them at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from budgetune.engine.errors import Diverged, OutOfMemory, UserInputError
from budgetune.engine.events import EvalEvent
from budgetune.search.curves import load_curves
from budgetune.search.space import MIX_PREFIX, AlphaRatio, Fixed
from budgetune.search.study import Study, load_study


@dataclass
class Grid:
    """The configurations to record; every combination is one run per seed and horizon."""

    ranks: list[int]
    lrs: list[float]
    micro_batches: list[int]
    mixes: list[str]
    """`default`, `uniform`, or `name=w/name=w`."""
    seeds: list[int]
    horizons: list[int]
    """Optimizer steps; each configuration and seed is recorded once per horizon."""
    eval_interval: int = 5


@dataclass(frozen=True)
class Point:
    rank: int
    lr: float
    micro_batch: int
    mix: str
    seed: int
    horizon: int

    @property
    def run_id(self) -> str:
        mix = self.mix.replace("/", "+").replace("=", "")
        return f"r{self.rank}-lr{self.lr:g}-mb{self.micro_batch}-{mix}-s{self.seed}-h{self.horizon}"


def grid_points(grid: Grid) -> list[Point]:
    """Every run of the grid, longest horizon first within a configuration and seed."""
    return [
        Point(r, lr, mb, mix, seed, h)
        for r, lr, mb, mix, seed, h in itertools.product(
            grid.ranks, grid.lrs, grid.micro_batches, grid.mixes, grid.seeds,
            sorted(grid.horizons, reverse=True),
        )
    ]  # fmt: skip


def mix_weights(mix: str, sources: list[str]) -> dict[str, float] | None:
    """A grid mixture name -> RunConfig weights (None: the engine's size-proportional mix)."""
    if mix == "default":
        return None
    if mix == "uniform":
        return {s: 1.0 for s in sources}
    weights: dict[str, float] = {}
    for part in mix.split("/"):
        name, _, value = part.partition("=")
        if name not in sources:
            raise UserInputError(f"--mixes {mix}: {name!r} is not a source ({', '.join(sources)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserInputError(f"--mixes {mix}: weight of {name} is not a number") from None
    return {s: weights.get(s, 0.0) for s in sources}


def _alpha(study: Study, rank: int) -> float | None:
    spec = study.space.params.get("lora_alpha")
    if isinstance(spec, AlphaRatio):
        return spec.ratio * rank
    if isinstance(spec, Fixed):
        return float(spec.value)
    return None


def record_run(worker: Any, study: Study, grid: Grid, point: Point, run_dir: Path,
               evaluator: Any = None) -> pd.DataFrame:  # fmt: skip
    """Train one grid point and return its rows in the curves format."""
    import torch

    from budgetune.engine.data import MixtureSampler, pad_id_for, prepare_data

    sources = [s.name for s in study.data.sources]
    params: dict[str, Any] = {"lora_rank": point.rank, "lr": point.lr,
                              "micro_batch": point.micro_batch}  # fmt: skip
    alpha = _alpha(study, point.rank)
    if alpha is not None:
        params["lora_alpha"] = alpha
    weights = mix_weights(point.mix, sources)
    if weights is not None:
        params["weights"] = weights
    config = study.run_config(run_dir, params, max_steps=point.horizon)
    config = dataclasses.replace(config, eval_interval=grid.eval_interval, seed=point.seed)
    train, _ = prepare_data(config, worker.tokenizer)
    mixture = MixtureSampler(
        train, config.weights, config.micro_batch, pad_id_for(worker.tokenizer), config.seed
    ).mixture
    events: list[tuple[EvalEvent, float]] = []
    start = time.process_time()

    def on_eval(event: EvalEvent) -> None:
        events.append((event, time.process_time() - start))

    torch.set_num_threads(1)
    status, peak = "completed", 0.0
    try:
        result = worker.run(config, callbacks=[on_eval], resume=False)
        peak = float(result.metrics.get("peak_memory_bytes", 0.0))
    except Diverged as e:
        status = "diverged"
        events.append((EvalEvent(e.step, 0, 0.0, {"val_loss": float(e.loss)}),
                       time.process_time() - start))  # fmt: skip
    except OutOfMemory as e:
        status, peak = "oom", float(e.peak_memory_bytes)
    base = {"run_id": point.run_id, "seed": point.seed, "lora_rank": point.rank, "lr": point.lr,
            "micro_batch": point.micro_batch,
            **{MIX_PREFIX + s: float(mixture.get(s, 0.0)) for s in sources},
            "mix_default": int(weights is None), "horizon_steps": point.horizon,
            "status": status}  # fmt: skip
    rows = [{**base, "step": 0, "tokens_seen": 0, "elapsed_s": 0.0,
             "val_loss": _initial_loss(run_dir) if status != "oom" else float("nan")}]  # fmt: skip
    if status == "oom":
        rows[0]["elapsed_s"] = time.process_time() - start
    last_tokens = 0
    for ev, cpu_s in events:
        last_tokens = max(last_tokens, ev.tokens_seen)  # a divergence event has no token count
        rows.append({**base, "step": ev.step, "tokens_seen": last_tokens, "elapsed_s": cpu_s,
                     "val_loss": ev.metrics.get("val_loss", float("nan")),
                     "train_loss": ev.metrics.get("train_loss", float("nan"))})  # fmt: skip
    for r in rows:
        r["peak_memory_bytes"] = peak
    if evaluator is not None and status == "completed":
        rows[-1]["score"] = float(
            evaluator.score_trial(worker.model, worker.tokenizer, rows[-1]["val_loss"]).value
        )
    return pd.DataFrame(rows)


def _initial_loss(run_dir: Path) -> float:
    """The engine's step-0 validation loss, from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "initial":
                return float(rec["val_loss"])
    return float("nan")


def record(study: Study, grid: Grid, out: Path, work_dir: Path, score: bool = False,
           log: Any = print, shard: tuple[int, int] = (0, 1),
           smooth: bool = True) -> pd.DataFrame | None:  # fmt: skip
    """Record every grid point not yet recorded under `work_dir`, then write `out`.

    `shard=(i, n)` records every n-th configuration-and-seed from the i-th, so n processes
    share a grid; whichever finds every point recorded writes `out` (the others return None).
    """
    from budgetune.engine.model import Worker

    parts = work_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    points = grid_points(grid)
    worker: Any = None
    evaluator: Any = None
    for i, point in enumerate(points):
        part = parts / f"{point.run_id}.csv"
        # Shards split by configuration and seed, so each gets every horizon's share.
        if part.exists() or (i // len(grid.horizons)) % shard[1] != shard[0]:
            continue
        if worker is None:
            worker = Worker(study.model.name, precision=study.model.precision,
                            quantize=study.model.quantize, quiet=True)  # fmt: skip
            if score and study.eval is not None:
                from budgetune.search.evaluation import Evaluator

                evaluator = Evaluator(study.eval, work_dir / "eval")
        run_dir = work_dir / "runs" / point.run_id
        t = time.perf_counter()
        rows = record_run(worker, study, grid, point, run_dir, evaluator)
        tmp = part.with_suffix(".tmp")
        rows.to_csv(tmp, index=False)
        tmp.replace(part)
        shutil.rmtree(run_dir, ignore_errors=True)
        last = rows.iloc[-1]
        log(f"[{i + 1}/{len(points)}] {point.run_id}: {last['status']}, step {last['step']}, "
            f"val_loss {last['val_loss']:.4f}, {last['elapsed_s']:.1f} cpu-s "
            f"({time.perf_counter() - t:.0f} s wall)")  # fmt: skip
    if not all((parts / f"{p.run_id}.csv").exists() for p in points):
        log("other shards are still recording; the last one to finish writes the file")
        return None
    table = pd.concat([pd.read_csv(parts / f"{p.run_id}.csv") for p in points], ignore_index=True)
    if smooth:
        table = smooth_time(table)
    write_curves(table, out)
    return table


def smooth_time(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's elapsed_s -> the per-step median over runs doing the same work (docstring).

    The pointwise median of non-decreasing series is non-decreasing, so the result is still a
    valid curves table. Steps only some runs of a group reached (a divergence) keep their own
    medians over the runs that reached them.
    """
    work = [c for c in table.columns if c in ("lora_rank", "micro_batch", "horizon_steps")
            or c.startswith(MIX_PREFIX)]  # fmt: skip
    out = table.copy()
    out["elapsed_s"] = table.groupby([*work, "step"])["elapsed_s"].transform("median")
    return out


def write_curves(table: pd.DataFrame, out: Path) -> None:
    """Write a curves table (CSV with 6 significant digits, or Parquet) and check it loads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False, float_format="%.6g")
    load_curves(out)


def _list(kind: type, text: str, flag: str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise UserInputError(f"{flag} {text}: expected comma-separated {kind.__name__}s") from None


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(prog="python -m budgetune.search.record_curves",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="curves file (.csv or .parquet)")
    p.add_argument("--study", type=Path, default=here / "studies" / "quickstart.toml")
    p.add_argument("--work-dir", type=Path, default=Path("runs/record_curves"))
    p.add_argument("--ranks", default="4,8,32")
    p.add_argument("--lrs", default="3e-4,3e-3,3e-2")
    p.add_argument("--micro-batches", default="4,16")
    p.add_argument("--mixes", default="default,uniform")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--horizons", default="120,30", help="optimizer steps, comma-separated")
    p.add_argument("--eval-interval", type=int, default=4)
    p.add_argument("--score", action="store_true", help="record the study's [eval] objective")
    p.add_argument("--shard", default="0/1", help="i/n: record every n-th run from the i-th")
    p.add_argument("--raw-time", action="store_true", help="keep each run's own CPU times")
    a = p.parse_args(argv)
    try:
        study = load_study(a.study)
        grid = Grid(
            ranks=_list(int, a.ranks, "--ranks"), lrs=_list(float, a.lrs, "--lrs"),
            micro_batches=_list(int, a.micro_batches, "--micro-batches"),
            mixes=[m for m in a.mixes.split(",") if m], seeds=_list(int, a.seeds, "--seeds"),
            horizons=_list(int, a.horizons, "--horizons"), eval_interval=a.eval_interval,
        )  # fmt: skip
        for m in grid.mixes:
            mix_weights(m, [s.name for s in study.data.sources])
        i, _, n = a.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise UserInputError(f"--shard {a.shard}: expected i/n with 0 <= i < n")
        table = record(study, grid, a.out, a.work_dir, a.score, shard=(int(i), int(n)),
                       smooth=not a.raw_time)  # fmt: skip
    except UserInputError as e:
        print(f"record_curves: error: {e}", file=sys.stderr)
        sys.exit(2)
    if table is not None:
        print(f"wrote {a.out}: {table['run_id'].nunique()} runs, {len(table)} rows")


if __name__ == "__main__":
    main()
