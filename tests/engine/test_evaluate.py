"""Tests for engine/evaluate.py: lm-eval on in-memory and exported models, task localizing."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from budgetune.engine.errors import UserInputError
from budgetune.engine.evaluate import (
    TaskRequest,
    evaluate,
    evaluate_pretrained,
    hub_offline,
    hushed,
    localize_task_dirs,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "studies" / "quickstart"
COLORS = ["red", "blue", "green", "yellow"]


def _tiny_tokenizer() -> Any:
    """A byte-level BPE shaped like the quickstart's (BOS prepended, pad token set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = "what is the favourite color of plus red blue green yellow below instruction"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([words] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=512,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped quickstart model when it exists, else a tiny random Llama saved to disk."""
    if (QUICKSTART / "model" / "config.json").exists():
        return QUICKSTART / "model"
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped quickstart task YAMLs, over the shipped eval data or a synthetic copy of it.

    The YAMLs' data paths are relative to them (`../data/...`), so a copy of the tasks folder
    next to a `data/` folder of the same schema behaves exactly like the shipped one.
    """
    if (QUICKSTART / "data" / "heldout_mc.jsonl").exists():
        return QUICKSTART / "tasks"
    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(QUICKSTART / "tasks", root / "tasks")
    (root / "data").mkdir()
    rng = random.Random(0)
    for split in ("heldout", "holdout"):
        mc = [
            {"question": f"What is the favourite color of P{i}?", "choices": COLORS,
             "label": rng.randrange(4)}
            for i in range(30)
        ]  # fmt: skip
        qa = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(30)]
        for kind, rows in (("mc", mc), ("qa", qa)):
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (root / "data" / f"{split}_{kind}.jsonl").write_text(text)
    return root / "tasks"


def test_localize_makes_data_paths_absolute_and_keeps_functions(tmp_path: Path) -> None:
    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (src / "_base_yaml").write_text("output_type: multiple_choice\n")
    (src / "sub" / "a.yaml").write_text(
        "include: ../_base_yaml\n"
        "task: a\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: ../../data/a.jsonl\n"
        "    train: [x.jsonl, /abs/y.jsonl, https://host/z.jsonl]\n"
        "process_docs: !function utils.process\n"
    )
    (src / "b.yaml").write_text("# keep me\ntask: b\ndataset_path: cais/mmlu\n")
    (dest,) = localize_task_dirs([src], tmp_path / "copy")
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda ld, node: ("fn", ld.construct_scalar(node)))
    a = yaml.load((dest / "sub" / "a.yaml").read_text(), Loader=Loader)  # noqa: S506
    files = a["dataset_kwargs"]["data_files"]
    # Relative paths resolve against the YAML's own folder, not the working directory.
    assert files["test"] == str(tmp_path / "data" / "a.jsonl")
    assert files["train"] == [str(src / "sub" / "x.jsonl"), "/abs/y.jsonl", "https://host/z.jsonl"]
    # The include points at the copy, so an included file's paths are the fixed ones.
    assert a["include"] == str(dest / "_base_yaml")
    # lm-eval resolves `!function` next to the YAML: the tag survives, utils.py is copied too.
    assert a["process_docs"] == ("fn", "utils.process")
    # A hub dataset id is not a path: that file needed no change and is copied byte for byte.
    assert (dest / "b.yaml").read_text() == (src / "b.yaml").read_text()
    with pytest.raises(UserInputError, match="nowhere: task path does not exist"):
        localize_task_dirs(["nowhere"], tmp_path / "copy2")


def test_hub_offline_sets_and_restores_library_switches() -> None:
    import datasets.config
    import huggingface_hub.constants

    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with hub_offline():
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_request_mistakes_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="limit must be >= 1"):
        evaluate(None, None, [TaskRequest("x", limit=0)])
    with pytest.raises(UserInputError, match="named twice"):
        evaluate(None, None, ["x", "x"])
    with pytest.raises(UserInputError, match="no config.json"):
        evaluate_pretrained(tmp_path, ["x"])


@pytest.mark.slow
def test_missing_local_data_file_is_a_one_line_user_error(model_dir: Path, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(QUICKSTART / "tasks", tasks)
    # The YAML names ../data/heldout_mc.jsonl, and there is no data folder next to this copy.
    with pytest.raises(UserInputError, match=r"data file not found: .*data/heldout_mc\.jsonl"):
        evaluate_pretrained(model_dir, ["quickstart_heldout_mc"], include_paths=[tasks])


@pytest.mark.slow
def test_in_memory_eval_of_local_tasks_from_any_cwd(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.train()
    monkeypatch.chdir(tmp_path)  # the task YAMLs' relative data paths must not depend on cwd
    report = evaluate(
        model,
        tokenizer,
        [TaskRequest("quickstart_heldout_mc", limit=12), TaskRequest("quickstart_heldout_qa", 4)],
        include_paths=[tasks_dir],
        batch_size=8,
    )
    mc, qa = report.tasks
    assert (mc.task, mc.metric, mc.n_examples) == ("quickstart_heldout_mc", "acc,none", 12)
    assert (qa.task, qa.metric, qa.n_examples) == (
        "quickstart_heldout_qa",
        "exact_match,last_word",
        4,
    )
    for r in (mc, qa):
        assert 0.0 <= r.value <= 1.0 and r.higher_is_better
        assert r.stderr is not None and r.stderr >= 0
    # Accuracy on 12 examples is a multiple of 1/12; acc_norm and the strict filter ride along.
    assert round(mc.value * 12, 6) == round(mc.value * 12)
    assert {"acc_norm,none", "exact_match,strict"} <= set(mc.metrics) | set(qa.metrics)
    assert report.seconds > 0
    # Training mode is restored for the caller; nothing was written into the working dir.
    assert model.training
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_group_reports_its_aggregate_over_all_subtask_examples(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    # Groups such as `mmlu` are how the challenge tasks come; this one lives in a 2nd folder.
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "qs_mc.yaml").write_text(
        "group: qs_mc\n"
        "task: [quickstart_heldout_mc, quickstart_holdout_mc]\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n"
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = evaluate(
        model, tokenizer, [TaskRequest("qs_mc", limit=3)],
        include_paths=[tasks_dir, tmp_path / "group"],
    )  # fmt: skip
    (group,) = report.tasks
    # Three examples from each of the two subtasks.
    assert (group.task, group.metric, group.n_examples) == ("qs_mc", "acc,none", 6)
    assert round(group.value * 6, 6) == round(group.value * 6) and group.stderr is not None


@pytest.mark.slow
def test_peft_in_memory_matches_merged_export_through_lm_eval(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    # init_lora_weights=False draws B at random too, so the adapter really changes the model.
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(base, lora)
    probe = tokenizer("What is the favourite color of Bob?", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = peft_model(probe).logits
        with peft_model.disable_adapter():
            plain = peft_model(probe).logits
    assert (adapted - plain).abs().max() > 1e-2

    n = 24
    task = "quickstart_heldout_mc"
    memory = evaluate(peft_model, tokenizer, [TaskRequest(task, n)], include_paths=[tasks_dir])
    # The in-memory eval merged nothing: every LoRA layer still holds its adapter apart.
    assert all(not m.merged for m in peft_model.modules() if hasattr(m, "lora_A"))

    export = tmp_path / "export"
    peft_model.merge_and_unload().save_pretrained(export)
    tokenizer.save_pretrained(export)
    # As a user would: plain lm_eval on the exported folder, from the tasks folder.
    monkeypatch.chdir(tasks_dir)
    with hub_offline():
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={export},dtype=float32",
            tasks=[task],
            limit=n,
            device="cpu",
            batch_size=8,
            task_manager=TaskManager(include_path=".", include_defaults=False),
        )
    got = out["results"][task]
    mem = memory.by_task()[task]
    assert mem.n_examples == out["n-samples"][task]["effective"] == n
    assert mem.value == pytest.approx(got["acc,none"])
    assert mem.metrics["acc_norm,none"] == pytest.approx(got["acc_norm,none"])


@pytest.mark.gpu
def test_bf16_cuda_model_in_memory_matches_its_export(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
    request = [TaskRequest("quickstart_heldout_mc", 40)]
    memory = evaluate(model, tokenizer, request, include_paths=[tasks_dir])
    # lm-eval ran the model where it lives: nothing was moved back to the CPU.
    assert next(model.parameters()).device.type == "cuda"
    model.save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    exported = evaluate_pretrained(
        tmp_path / "export", request, include_paths=[tasks_dir], device="cuda", dtype="bfloat16"
    )
    assert memory.tasks[0].value == pytest.approx(exported.tasks[0].value)
    assert memory.tasks[0].n_examples == exported.tasks[0].n_examples == 40


@pytest.mark.slow
def test_quiet_eval_keeps_lm_evals_bars_and_warnings_out_of_the_output(
    model_dir: Path, tasks_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    request = [TaskRequest("quickstart_heldout_mc", limit=4)]
    capfd.readouterr()
    loud = evaluate(model, tokenizer, request, include_paths=[tasks_dir])
    printed = "".join(capfd.readouterr())
    assert "Running loglikelihood requests" in printed  # what a study's output filled with
    quiet = evaluate(model, tokenizer, request, include_paths=[tasks_dir], quiet=True)
    out, err = capfd.readouterr()
    assert "Running loglikelihood requests" not in err and "pretrained" not in err + out
    assert quiet.tasks[0].value == loud.tasks[0].value
    # a failing eval still shows what lm-eval printed before the error
    with pytest.raises(RuntimeError, match="boom"), hushed():
        print("lm-eval said this", file=sys.stderr)
        raise RuntimeError("boom")
    assert "lm-eval said this" in capfd.readouterr().err
