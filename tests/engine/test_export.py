"""Export: the merged folder is plain Hugging Face, scores like the in-memory model, generates."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from budgetune.engine.config import LoraSettings, RunConfig, SourceSpec
from budgetune.engine.export import generate_text, merge_adapter
from budgetune.engine.template import Example, format_prompt
from budgetune.engine.train import Worker

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "studies" / "quickstart" / "model"
DATA = ROOT / "studies" / "quickstart" / "data"
PROMPT = "What is 12 plus 12?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Worker, Path, Path]:
    """A worker after a short all-linear run with a large LR (so the adapter matters)."""
    tmp = tmp_path_factory.mktemp("export")
    config = RunConfig(
        model=str(MODEL), sources=[SourceSpec("alpaca", str(DATA / "alpaca.json"), "alpaca",
                                              limit=100)],
        val=SourceSpec("val", str(DATA / "val.jsonl"), "alpaca"), out_dir=tmp / "run",
        max_steps=3, global_batch=4, micro_batch=4, learning_rate=2e-2, warmup_steps=0,
        eval_interval=3, eval_examples=8, max_seq_length=128, cache_dir=tmp / "cache",
        lora=LoraSettings(r=4, alpha=8, targets="all-linear"),
    )  # fmt: skip
    worker = Worker(str(MODEL), quiet=True)
    worker.run(config)
    exported = worker.export_merged(tmp / "merged")
    return worker, tmp / "run", exported


def ids() -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(MODEL)
    return tok(format_prompt(Example(PROMPT, "", "")) + "24", return_tensors="pt").input_ids


def test_export_is_a_plain_hf_folder_with_provenance(trained) -> None:
    _, run_dir, exported = trained
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "budgetune.json"} <= names  # fmt: skip
    # Merged means no adapter: nothing in the folder would make a loader apply one.
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert not any("lora" in k for k in load_file(exported / "model.safetensors"))
    info = json.loads((exported / "budgetune.json").read_text())
    assert info["base_model"] == str(MODEL)
    assert info["lora"]["r"] == 4 and info["run_config"]["learning_rate"] == 2e-2
    assert info["run_dir"] == str(run_dir)


def test_exported_logits_equal_the_in_memory_merged_model(trained) -> None:
    worker, _, exported = trained
    x = ids()
    with torch.no_grad():
        merged_in_memory = copy.deepcopy(worker.model).merge_and_unload()
        expected = merged_in_memory(input_ids=x).logits
        live = worker.model(input_ids=x).logits
        loaded = AutoModelForCausalLM.from_pretrained(exported)
        got = loaded(input_ids=x).logits
        with worker.model.disable_adapter():
            base = worker.model(input_ids=x).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # The adapter is in the export (it differs from the base) and equals the unmerged model.
    assert not torch.allclose(got, base, atol=1e-3)
    assert torch.allclose(got, live, atol=1e-4)


def test_export_leaves_the_worker_base_untouched(trained) -> None:
    worker, _, _ = trained
    x = ids()
    with torch.no_grad():
        before = worker.model(input_ids=x).logits
    worker.export_merged(trained[1].parent / "merged-again")
    with torch.no_grad():
        after = worker.model(input_ids=x).logits
    # Bit for bit: the merge happened on a fresh copy, never in the live base.
    assert torch.equal(before, after)


def test_lm_eval_loads_the_export_and_scores_it_like_the_live_model(trained) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    worker, _, exported = trained
    lm = HFLM(pretrained=str(exported), device="cpu", batch_size=1, dtype="float32")
    context, continuation = format_prompt(Example(PROMPT, "", "")), "24"
    request = Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (score, _), = lm.loglikelihood([request], disable_tqdm=True)
    ctx_ids, cont_ids = lm._encode_pair(context, continuation)
    x = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(worker.model(input_ids=x).logits[0].float(), -1)
    positions = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    direct = sum(logprobs[p, t].item() for p, t in zip(positions, cont_ids))
    assert score == pytest.approx(direct, abs=1e-4)


def test_merge_from_a_run_dir_matches_the_worker_export(trained, tmp_path: Path) -> None:
    _, run_dir, exported = trained
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = merge_adapter(run_dir, tmp_path / "from-run")
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], seen
    a, b = load_file(out / "model.safetensors"), load_file(exported / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # The run's own config travels with it as provenance.
    assert json.loads((out / "budgetune.json").read_text())["run_config"]["max_steps"] == 3


def test_generate_greedy_matches_plain_transformers_on_the_export(trained) -> None:
    worker, _, exported = trained
    text = worker.generate(PROMPT, max_new_tokens=8)
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    enc = tok(format_prompt(Example(PROMPT, "", "")), return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert generate_text(model, tok, PROMPT, max_new_tokens=8) == text
    # Without the template the model sees a different prompt (and answers differently).
    raw = worker.generate(PROMPT, max_new_tokens=8, template=False)
    enc_raw = tok(PROMPT, return_tensors="pt")
    out_raw = model.generate(**enc_raw, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    assert raw == tok.decode(out_raw[0, enc_raw.input_ids.shape[1] :], skip_special_tokens=True)


def test_sampling_is_seeded_and_top_k_1_is_greedy(trained) -> None:
    worker, _, _ = trained
    torch.manual_seed(3)
    first = worker.generate(PROMPT, max_new_tokens=12, temperature=1.5)
    torch.manual_seed(3)
    assert worker.generate(PROMPT, max_new_tokens=12, temperature=1.5) == first
    greedy = worker.generate(PROMPT, max_new_tokens=12)
    assert worker.generate(PROMPT, max_new_tokens=12, temperature=0.7, top_k=1) == greedy
