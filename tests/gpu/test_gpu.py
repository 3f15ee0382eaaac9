"""GPU paths: bf16-true, 4-bit nf4 base weights, recovery from a real CUDA OOM, MFU script.

Run where CUDA is present: `pytest -m gpu tests/gpu`. Skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.errors import OutOfMemory
from budgetune.engine.train import Worker

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "studies" / "quickstart"


def _config(tmp_path: Path, model: str, precision: str, **kw) -> RunConfig:
    data = QUICK / "data"
    base = dict(
        model=model,
        sources=[SourceSpec("alpaca", str(data / "alpaca.json"), "alpaca")],
        val=SourceSpec("val", str(data / "val.jsonl"), "alpaca"),
        out_dir=tmp_path / "run", precision=precision, max_steps=20, warmup_steps=2,
        global_batch=8, micro_batch=8, eval_interval=10, max_seq_length=256,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    return RunConfig(**(base | kw))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_run_lowers_loss(tmp_path: Path, precision: str) -> None:
    worker = Worker(str(QUICK / "model"), precision=precision, quiet=True)
    result = worker.run(_config(tmp_path, str(QUICK / "model"), precision, learning_rate=3e-3))
    assert result.curve[-1].metrics["val_loss"] < result.curve[0].metrics["val_loss"]
    assert next(worker.model.parameters()).is_cuda


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_base_run(tmp_path: Path) -> None:
    worker = Worker(str(QUICK / "model"), precision="bf16-true", quantize="nf4", quiet=True)
    config = _config(tmp_path, str(QUICK / "model"), "bf16-true", quantize="nf4")
    result = worker.run(config)
    assert result.metrics["val_loss"] == pytest.approx(result.curve[-1].metrics["val_loss"])
    # the frozen base is stored in 4 bits: its linear weights are bitsandbytes Params4bit
    assert any(type(p).__name__ == "Params4bit" for p in worker.model.parameters())


def _big_model(folder: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(QUICK / "model").save_pretrained(folder)
    torch.cuda.empty_cache()
    return str(folder)


_FRESH = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_gpu import _config
from budgetune.engine.train import Worker
tmp = Path({tmp!r})
w = Worker({model!r}, precision="bf16-true", quiet=True)
torch.cuda.reset_peak_memory_stats()
w.run(_config(tmp, {model!r}, "bf16-true", micro_batch=1, global_batch=1, max_steps=4))
print(json.dumps({{"peak": torch.cuda.max_memory_allocated()}}))
"""


def test_cuda_oom_then_good_run_has_fresh_peak(tmp_path: Path) -> None:
    model = _big_model(tmp_path / "big")
    worker = Worker(model, precision="bf16-true", quiet=True)
    huge = _config(tmp_path / "a", model, "bf16-true", micro_batch=512, global_batch=512,
                   max_seq_length=2048, max_steps=2)
    with pytest.raises(OutOfMemory) as info:
        worker.run(huge)
    assert info.value.micro_batch == 512 and info.value.peak_memory_bytes > 0
    torch.cuda.reset_peak_memory_stats()
    worker.run(_config(tmp_path / "b", model, "bf16-true", micro_batch=1, global_batch=1,
                       max_steps=4))
    after_oom = torch.cuda.max_memory_allocated()
    code = _FRESH.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / "c"), model=model)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    # the OOM left nothing behind: the next run peaks where a fresh process does (5% slack)
    assert after_oom <= fresh * 1.05


def test_mfu_script_prints_figures() -> None:
    script = Path(__file__).with_name("throughput_mfu.py")
    out = subprocess.run([sys.executable, str(script), "--layers", "2", "--steps", "4"],
                         capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout[out.stdout.index("{"):])
    assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
