"""Throughput and MFU of the engine's LoRA training on a 1B-class model with random weights.

Run on a CUDA machine:  python tests/gpu/throughput_mfu.py [--layers 22] [--micro-batch 4]

The model has TinyLlama-1.1B's shape with random weights, so nothing is downloaded. MFU counts
4 x params FLOPs per token: a forward pass (2 x params) and the backward pass's input
gradients (2 x params); frozen base weights get no weight gradients, and the LoRA weights'
own gradients are negligible at rank 8. Attention's sequence-length term is left out, as in
the usual 6N rule it replaces, so the figure is slightly conservative at long sequences.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), by substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "A10G": 70e12,
}


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def write_model(folder: Path, layers: int) -> int:
    """Save a random-weight 1B-class Llama with the quickstart tokenizer; return its size."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, torch_dtype="bfloat16",
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer_dir = Path(__file__).resolve().parents[2] / "studies" / "quickstart" / "model"
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n_params


def write_data(folder: Path, n: int, words: int) -> Path:
    """Long alpaca-schema rows so micro-batches are full 2048-token sequences."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    path = folder / "long.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"instruction": "Continue.", "input": text, "output": text}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()

    from budgetune.engine.config import LoraSettings, RunConfig, SourceSpec
    from budgetune.engine.train import Worker

    name = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        n_params = write_model(tmp_path / "model", args.layers)
        data = write_data(tmp_path, 400, 1500)
        source = SourceSpec(name="long", path=str(data), schema="alpaca")
        worker = Worker(str(tmp_path / "model"), precision="bf16-true", quiet=True)
        config = RunConfig(
            model=str(tmp_path / "model"), sources=[source], val=source, out_dir=tmp_path / "run",
            precision="bf16-true", lora=LoraSettings(r=8, alpha=16), micro_batch=args.micro_batch,
            global_batch=args.micro_batch * 4, max_seq_length=args.seq, max_steps=args.steps,
            warmup_steps=2, eval_interval=args.steps, eval_batches=2, cache_dir=tmp_path / "cache",
        )  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        result = worker.run(config, resume=False)
    tokens_per_s = result.metrics["tokens_per_s"]
    peak = peak_flops(name)
    mfu = 4 * n_params * tokens_per_s / peak if peak else float("nan")
    print(json.dumps({
        "device": name,
        "params": n_params,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "tokens_per_s": round(tokens_per_s, 1),
        "nonpad_tokens_per_s": round(result.metrics.get("nonpad_tokens_per_s", 0.0), 1),
        "mfu": round(mfu, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
