"""Engine throughput: `budgetune train` against Hugging Face Trainer + peft, same everything.

    python tests/benchmarks/bench_engine_throughput.py [--steps 40] [--micro-batch 8]

Both sides train the shipped quickstart model with the same LoRA (r 8, alpha 16, query+value),
the same tokenized examples (our cache, so tokenization is identical and outside the timing),
the same optimizer settings, micro-batch and gradient accumulation, on this machine, each in
its own fresh process so peak memory is comparable. The baseline is what a user gets from
Trainer out of the box: a shuffled dataset padded per batch by DataCollatorForSeq2Seq.

Printed: non-padding tokens per second of each, their ratio (goal >= 1.3x), and each process's
peak resident memory (goal: ours no higher). The timed span is the training call itself
(`Worker.run` / `Trainer.train`); model loading is outside it on both sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "studies" / "quickstart"
SOURCES = [("dolly", "dolly.jsonl", "dolly"), ("alpaca", "alpaca.json", "alpaca"),
           ("oasst", "oasst.jsonl", "oasst1"), ("flan", "flan.jsonl", "flan")]


def _specs():
    from budgetune.engine.config import SourceSpec

    train = [SourceSpec(n, str(QUICK / "data" / f), s) for n, f, s in SOURCES]
    return train, SourceSpec("val", str(QUICK / "data" / "val.jsonl"), "alpaca")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_budgetune(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    from budgetune.engine.config import LoraSettings, RunConfig
    from budgetune.engine.train import Worker

    train, val = _specs()
    worker = Worker(str(QUICK / "model"), quiet=True)
    config = RunConfig(
        model=str(QUICK / "model"), sources=train, val=val, out_dir=tmp / "run",
        lora=LoraSettings(r=8, alpha=16, dropout=0.05), learning_rate=3e-4,
        weight_decay=0.01, warmup_steps=5, micro_batch=args.micro_batch,
        global_batch=args.micro_batch * args.accum, max_seq_length=args.seq,
        max_steps=args.steps, eval_interval=args.steps, eval_batches=1,
        cache_dir=tmp / "cache", seed=0,
    )  # fmt: skip
    worker.run(config, resume=False)  # warm-up run: caches built, kernels touched
    config.out_dir = tmp / "run2"
    t = time.perf_counter()
    result = worker.run(config, resume=False)
    seconds = time.perf_counter() - t
    return {"nonpad_tokens": result.tokens_seen, "seconds": seconds,
            "padding_fraction": result.metrics.get("padding_fraction", float("nan"))}


def run_hf_trainer(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )  # fmt: skip

    from budgetune.engine.data import pad_id_for, tokenize_source

    tokenizer = AutoTokenizer.from_pretrained(QUICK / "model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_id_for(tokenizer)
    train, _ = _specs()
    rows = []
    for spec in train:
        src = tokenize_source(spec, tokenizer, args.seq, cache_dir=tmp / "cache")
        rows += [{"input_ids": i.tolist(), "labels": lab.tolist()}
                 for i, lab in zip(src.input_ids, src.labels)]
    counted = {"nonpad": 0, "slots": 0}
    base = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = base(features)
        counted["nonpad"] += int(batch["attention_mask"].sum())
        counted["slots"] += batch["attention_mask"].numel()
        return batch

    model = AutoModelForCausalLM.from_pretrained(QUICK / "model", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accum, learning_rate=3e-4, weight_decay=0.01,
        warmup_steps=5, lr_scheduler_type="cosine", max_steps=args.steps, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        remove_unused_columns=False,
    )  # fmt: skip
    warm = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
    warm.train()  # warm-up, as on our side
    counted.update(nonpad=0, slots=0)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {"nonpad_tokens": counted["nonpad"], "seconds": seconds,
            "padding_fraction": 1 - counted["nonpad"] / max(1, counted["slots"])}


def child(side: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_budgetune if side == "budgetune" else run_hf_trainer
        out = fn(args, Path(tmp))
    out["nonpad_tokens_per_s"] = out["nonpad_tokens"] / out["seconds"]
    out["peak_rss_bytes"] = _peak_rss()
    print("RESULT " + json.dumps(out))


def measure(side: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--accum", str(args.accum),
           "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", choices=["budgetune", "hf"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.side:
        child(args.side, args)
        return
    ours, hf = measure("budgetune", args), measure("hf", args)
    print(f"{'':28}{'budgetune':>14}{'HF Trainer':>14}")
    for key, fmt in [("nonpad_tokens_per_s", "{:14.1f}"), ("padding_fraction", "{:14.3f}"),
                     ("seconds", "{:14.2f}"), ("nonpad_tokens", "{:14.0f}")]:
        print(f"{key:28}" + fmt.format(ours[key]) + fmt.format(hf[key]))
    print(f"{'peak_rss_mib':28}{ours['peak_rss_bytes'] / 2**20:14.1f}"
          f"{hf['peak_rss_bytes'] / 2**20:14.1f}")
    ratio = ours["nonpad_tokens_per_s"] / hf["nonpad_tokens_per_s"]
    mem = ours["peak_rss_bytes"] / hf["peak_rss_bytes"]
    print(f"throughput ratio (budgetune / HF Trainer, non-padding tokens/s): {ratio:.2f}x "
          f"(goal >= 1.3x)")
    print(f"peak memory ratio (budgetune / HF Trainer): {mem:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
