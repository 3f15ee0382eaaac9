"""The quickstart study's shipped model and data (built by studies/quickstart/build.py).

These files are what every offline run and most end-to-end tests stand on, so check that
they load the way the engine loads them, keep their documented schemas, keep evaluation
questions out of training data, and that the model really is pretrained.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from budgetune.engine.data import format_prompt
from budgetune.engine.template import Example

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart"
MODEL_DIR = QUICKSTART / "model"
DATA_DIR = QUICKSTART / "data"


def read_jsonl(name: str) -> list[dict]:
    with (DATA_DIR / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


def training_prompts() -> set[str]:
    """Every user-side text in the four training sources."""
    prompts = {r["instruction"] for r in read_jsonl("dolly.jsonl")}
    alpaca = json.loads((DATA_DIR / "alpaca.json").read_text(encoding="utf-8"))
    prompts |= {r["instruction"] for r in alpaca} | {r["input"] for r in alpaca}
    prompts |= {r["text"] for r in read_jsonl("oasst.jsonl") if r["role"] == "prompter"}
    prompts |= {r["inputs"] for r in read_jsonl("flan.jsonl")}
    return prompts


def test_model_and_tokenizer_load_offline(model, tokenizer):
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.model_max_length == 512
    for name in ["bos_token", "eos_token", "pad_token", "unk_token"]:
        assert getattr(tokenizer, name) is not None, name
    # Llama-style: the tokenizer prepends <s>, and the generation config knows the ids.
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 3_000_000


def test_asset_sizes_fit_the_repo():
    model_bytes = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    data_bytes = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert model_bytes <= 10 * 1024 * 1024
    assert data_bytes <= 3 * 1024 * 1024


def test_training_sources_have_their_public_schemas(tokenizer):
    dolly = read_jsonl("dolly.jsonl")
    alpaca = json.loads((DATA_DIR / "alpaca.json").read_text(encoding="utf-8"))
    flan = read_jsonl("flan.jsonl")
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in dolly)
    assert any(r["context"] for r in dolly) and any(not r["context"] for r in dolly)
    assert all(set(r) == {"instruction", "input", "output"} for r in alpaca)
    assert all(set(r) == {"inputs", "targets", "task_name"} for r in flan)
    for rows in [dolly, alpaca, flan]:
        assert 600 <= len(rows) <= 1500
    # A few long examples exist so truncation at a small max_seq_length is exercised.
    lengths = [len(tokenizer(r["context"] + r["response"])["input_ids"]) for r in dolly]
    assert max(lengths) > 256
    assert sorted(lengths)[len(lengths) // 2] < 64


def test_oasst_is_message_trees_with_ranked_replies():
    rows = read_jsonl("oasst.jsonl")
    keys = {"message_id", "parent_id", "message_tree_id", "role", "text", "lang", "rank",
            "deleted", "review_result"}  # fmt: skip
    assert all(set(r) == keys for r in rows)
    trees: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        trees[r["message_tree_id"]].append(r)
    english = [t for t in trees.values() if t[0]["lang"] == "en"]
    assert 600 <= len(english) <= 1500
    assert len(english) < len(trees)  # some other-language trees, for the loader to drop
    for tree in trees.values():
        (root,) = [m for m in tree if m["parent_id"] is None]
        assert root["role"] == "prompter" and root["rank"] is None
        assert root["message_id"] == root["message_tree_id"]
        replies = [m for m in tree if m["parent_id"] == root["message_id"]]
        assert len(replies) == len(tree) - 1 and 2 <= len(replies) <= 3
        assert all(m["role"] == "assistant" for m in replies)
        assert sorted(m["rank"] for m in replies) == list(range(len(replies)))


def test_eval_files_have_their_schemas():
    for name in ["heldout", "holdout"]:
        mc = read_jsonl(f"{name}_mc.jsonl")
        qa = read_jsonl(f"{name}_qa.jsonl")
        assert 100 <= len(mc) <= 250 and 100 <= len(qa) <= 250
        for r in mc:
            assert set(r) == {"question", "choices", "label"}
            assert len(r["choices"]) == len(set(r["choices"])) == 4
            assert 0 <= r["label"] < 4
        assert all(set(r) == {"question", "answer"} and r["answer"] for r in qa)
    val = read_jsonl("val.jsonl")
    assert 100 <= len(val) <= 200
    assert all(set(r) == {"instruction", "input", "output"} for r in val)


def test_eval_questions_never_appear_in_training_data():
    train = training_prompts()
    asked = {
        "val": [r["instruction"] for r in read_jsonl("val.jsonl")],
        "heldout_mc": [r["question"] for r in read_jsonl("heldout_mc.jsonl")],
        "heldout_qa": [r["question"] for r in read_jsonl("heldout_qa.jsonl")],
        "holdout_mc": [r["question"] for r in read_jsonl("holdout_mc.jsonl")],
        "holdout_qa": [r["question"] for r in read_jsonl("holdout_qa.jsonl")],
    }
    for name, questions in asked.items():
        assert not set(questions) & train, name
    # The eval sets are disjoint from each other too.
    names = list(asked)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(asked[a]) & set(asked[b]), (a, b)


def test_model_is_pretrained_on_the_corpus(model, tokenizer):
    lines = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()[:32]
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    # A random init scores about ln(vocab) ~ 7.6; the shipped model is far below.
    assert loss < 0.4 * math.log(len(tokenizer))


def test_template_costs_few_tokens(tokenizer):
    """The tokenizer learnt the Alpaca template's fixed phrases, so wrapping a question costs
    a handful of tokens (6, or 9 with an input, when built) rather than the ~85 (~125) of a
    tokenizer that never saw them: finetuning compute goes to questions and answers."""
    question = "What is the favourite color of Bela?"
    n_question = len(tokenizer(question)["input_ids"])
    plain = format_prompt(Example(question, "", ""))
    assert len(tokenizer(plain)["input_ids"]) - n_question <= 30
    with_input = format_prompt(Example(question, "Bela", ""))
    n_input = len(tokenizer("Bela", add_special_tokens=False)["input_ids"])
    assert len(tokenizer(with_input)["input_ids"]) - n_question - n_input <= 40
    # The engine masks a prompt by its own token count, and lm-eval scores a choice after the
    # prompt less its trailing newline: both need the shorter text's tokens to be a prefix.
    for prompt in [plain, with_input]:
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + "blue")["input_ids"][: len(ids)] == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
        context = tokenizer(prompt.rstrip())["input_ids"]
        assert ids[: len(context)] == context


def test_corpus_has_template_text_but_never_a_question():
    """The base model saw the template's fixed text, never a wrapped question or an answer:
    the question/answer format must still be learnt by finetuning."""
    lines = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    # One document a line; template documents write their line breaks as the characters \n.
    template = [line for line in lines if "###" in line or "instruction" in line]
    assert 0 < len(template) < 0.05 * len(lines)
    header = "Below is an instruction that describes a task"
    write = ". Write a response that appropriately completes the request."
    paired = ", paired with an input that provides further context"
    allowed = {
        rf"{header}{write}\n\n### Instruction:",
        rf"{header}{paired}{write}\n\n### Instruction:",
        r"\n\n### Input:",
        r"\n\n### Response:",
    }
    assert set(template) == allowed
    assert not any("?" in line for line in lines)
