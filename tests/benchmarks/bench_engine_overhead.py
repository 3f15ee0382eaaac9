"""Per-run overhead of the engine: a one-minute run against a bare PyTorch loop, same work.

    python tests/benchmarks/bench_engine_overhead.py [--seconds 60] [--eval-interval 10]

One `Worker` on the shipped quickstart model (loaded once, warmed by a 2-step run, as in a
search where every trial after the first finds the model loaded and the data cached), then:

- engine: `Worker.run` with `max_seconds` (the quickstart's batch sizes, all four sources,
  an eval every `--eval-interval` steps, a checkpoint at every eval);
- bare loop (the baseline): a fresh adapter on the same base, the same batches from the same
  sampler, forward/backward/clip/AdamW for the same number of optimizer steps and the same
  number of validation passes, nothing else -- no checkpoints, logging, callbacks or guards.

Printed: the engine's own accounting (train, eval, overhead seconds; goal: overhead < 2% of
the run), whether it kept its allowance, and the ratio engine time / bare-loop time for the
same steps (the whole price of the engine's bookkeeping, checkpoints included). The two
alternate nothing: on a shared machine, rerun and compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "studies" / "quickstart"
SOURCES = [("dolly", "dolly.jsonl", "dolly"), ("alpaca", "alpaca.json", "alpaca"),
           ("oasst", "oasst.jsonl", "oasst1"), ("flan", "flan.jsonl", "flan")]  # fmt: skip


def make_config(tmp: Path, name: str, **horizon: float):
    from budgetune.engine.config import RunConfig, SourceSpec

    return RunConfig(
        model=str(QUICK / "model"),
        sources=[SourceSpec(n, str(QUICK / "data" / f), s) for n, f, s in SOURCES],
        val=SourceSpec("val", str(QUICK / "data" / "val.jsonl"), "alpaca"),
        out_dir=tmp / name, global_batch=16, micro_batch=4, warmup_steps=10,
        learning_rate=3e-3, eval_examples=32, max_seq_length=128, cache_dir=tmp / "cache",
        seed=0, **horizon,
    )  # fmt: skip


def bare_loop(worker, config, n_steps: int, n_evals: int) -> float:
    """The same optimizer steps and validation passes as a plain loop; returns its seconds."""
    from budgetune.engine.data import (
        MixtureSampler,
        pad_id_for,
        prepare_data,
        validation_batches,
    )

    worker.drop_adapter()
    start = time.perf_counter()
    train, val = prepare_data(config, worker.tokenizer)
    pad = pad_id_for(worker.tokenizer)
    sampler = MixtureSampler(train, config.weights, config.micro_batch, pad, config.seed)
    val_batches = validation_batches(val, config.micro_batch, pad,
                                     max_examples=config.eval_examples)  # fmt: skip
    model = worker.attach_adapter(config.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)  # fmt: skip
    evals_done = 0
    for step in range(1, n_steps + 1):
        for _ in range(config.grad_accum):
            loss = model(**sampler.next_batch()).loss
            (loss / config.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if evals_done < n_evals and (step % config.eval_interval == 0 or step == n_steps):
            model.eval()
            with torch.no_grad():
                for batch in val_batches:
                    model(**batch)
            model.train()
            evals_done += 1
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--eval-interval", type=int, default=10)
    args = parser.parse_args()
    from budgetune.engine.train import Worker

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        worker = Worker(str(QUICK / "model"), quiet=True)
        worker.run(make_config(tmp, "warmup", max_steps=2, eval_interval=2))
        config = make_config(tmp, "engine", max_seconds=args.seconds,
                             eval_interval=args.eval_interval)  # fmt: skip
        result = worker.run(config)
        m = result.metrics
        n_evals = len(result.curve) + 1  # plus the validation before the first step
        bare_s = bare_loop(worker, config, result.step, n_evals)

    print(f"torch threads: {torch.get_num_threads()}")
    print(f"engine run: {result.step}/{int(m['total_steps'])} steps, {n_evals} evals, "
          f"{result.elapsed_s:.2f}s of a {args.seconds:.0f}s allowance "
          f"({'kept' if result.elapsed_s <= args.seconds else 'EXCEEDED'})")  # fmt: skip
    print(f"  train {m['train_s']:.2f}s  eval {m['eval_s']:.2f}s  overhead {m['overhead_s']:.2f}s"
          f" = {100 * m['overhead_fraction']:.2f}% of the run (goal < 2%: "
          f"{'met' if m['overhead_fraction'] < 0.02 else 'NOT met'})")  # fmt: skip
    print(f"bare loop (baseline), same steps and evals: {bare_s:.2f}s")
    print(f"ratio engine / bare loop: {result.elapsed_s / bare_s:.3f}")


if __name__ == "__main__":
    main()
