"""Tests for the engine's data layer: schemas, template, tokenization + cache, sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from budgetune.engine import data as data_mod
from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.data import (
    IGNORE_INDEX,
    Example,
    MixtureSampler,
    TokenizedSource,
    collate,
    format_prompt,
    load_examples,
    pad_id_for,
    prepare_data,
    tokenize_source,
    validation_batches,
)
from budgetune.engine.errors import UserInputError

QUICKSTART_MODEL = Path(__file__).resolve().parents[2] / "studies" / "quickstart" / "model"

WORDS = (
    "the cat sat on a mat and the dog ran to the red house where a small bird sang "
    "Below is an instruction that describes a task paired with an input that provides "
    "further context Write a response that appropriately completes the request "
    "Instruction Input Response what is two plus three five seven blue green name city"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The shipped quickstart tokenizer when it exists, else a tiny byte-level BPE like it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (QUICKSTART_MODEL / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


class CountingTokenizer:
    """Delegates to a real tokenizer and counts how often it is asked to encode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.n_calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.n_calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentence(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words))


def dolly_rows(n: int, seed: int = 0, max_words: int = 40) -> list[dict[str, Any]]:
    """Dolly-shaped rows with widely varying response lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_words, (n,), generator=g).tolist()
    return [
        {
            "instruction": f"say {sentence(i, 3)}",
            "context": sentence(i + 1, 4) if i % 3 == 0 else "",
            "response": sentence(i + 2, k),
            "category": "open_qa",
        }
        for i, k in enumerate(lengths)
    ]


def make_source(
    tmp_path: Path, name: str, n: int, tokenizer: Any, seed: int = 0
) -> TokenizedSource:
    path = write_jsonl(tmp_path / f"{name}.jsonl", dolly_rows(n, seed=seed))
    spec = SourceSpec(name=name, path=str(path), schema="dolly")
    return tokenize_source(spec, tokenizer, 512, cache_dir=tmp_path / "cache")


def oasst_row(mid: str, parent: str | None, role: str, text: str, **kw: Any) -> dict[str, Any]:
    row = {
        "message_id": mid,
        "parent_id": parent,
        "user_id": "u",
        "created_date": "2023-02-05T14:23:50.983374+00:00",
        "text": text,
        "role": role,
        "lang": "en",
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": None,
        "synthetic": False,
        "model_name": None,
        "message_tree_id": "t1",
        "tree_state": "ready_for_export",
    }
    row.update(kw)
    return row


# --- schemas -------------------------------------------------------------------------------


def test_dolly_context_becomes_input(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {
                "instruction": "Who?",
                "context": "Ann lives here.",
                "response": "Ann",
                "category": "cqa",
            },
            {"instruction": "Why?", "context": "", "response": "Because", "category": "open_qa"},
        ],
    )
    examples = load_examples(SourceSpec("d", str(path), "dolly"))
    assert examples == [Example("Who?", "Ann lives here.", "Ann"), Example("Why?", "", "Because")]


def test_alpaca_json_list_and_limit(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"q{i}", "input": "ctx" if i == 1 else "", "output": f"a{i}"}
        for i in range(5)
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=2))
    examples = load_examples(SourceSpec("a", str(path), "alpaca", limit=3))
    assert examples == [
        Example("q0", "", "a0"),
        Example("q1", "ctx", "a1"),
        Example("q2", "", "a2"),
    ]


def test_flan_inputs_become_instruction(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "flan.jsonl",
        [{"inputs": "Translate: chat", "targets": "cat", "task_name": "wmt"}],
    )
    assert load_examples(SourceSpec("f", str(path), "flan")) == [
        Example("Translate: chat", "", "cat")
    ]


def test_lima_conversations_give_their_first_exchange(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lima.jsonl", [
        {"conversations": ["Name a prime.", "7.", "Another?", "11."], "source": "stackexchange"},
        {"conversations": ["A prompt with no reply (LIMA's test split)"], "source": "multi_turn"},
        {"conversations": ["Why is the sky blue?", "Rayleigh scattering."], "source": "wikihow"},
    ])  # fmt: skip
    assert load_examples(SourceSpec("l", str(path), "lima")) == [
        Example("Name a prime.", "", "7."),
        Example("Why is the sky blue?", "", "Rayleigh scattering."),
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": ["q", "a"]}, {"text": "q"}])
    with pytest.raises(UserInputError, match=r"bad\.jsonl line 2: field 'conversations' must "
                       "be a list of strings for schema lima, got missing"):  # fmt: skip
        load_examples(SourceSpec("l", str(bad), "lima"))


def test_oasst1_pairs_english_prompts_with_best_usable_reply(tmp_path: Path) -> None:
    rows = [
        oasst_row("p1", None, "prompter", "Root question"),
        oasst_row("a1", "p1", "assistant", "deleted best", rank=0, deleted=True),
        oasst_row("a2", "p1", "assistant", "rejected by review", rank=0, review_result=False),
        oasst_row("a3", "p1", "assistant", "second", rank=2),
        oasst_row("a4", "p1", "assistant", "best usable", rank=1),
        oasst_row("a5", "p1", "assistant", "unranked", rank=None),
        oasst_row("p2", "a4", "prompter", "Follow-up question"),
        oasst_row("a6", "p2", "assistant", "only reply", rank=None),
        oasst_row("p3", "a3", "prompter", "Prompt with no usable reply"),
        oasst_row("a7", "p3", "assistant", "gone", deleted=True),
        # A German tree: neither its root nor its follow-ups are kept.
        oasst_row("g1", None, "prompter", "Wie spaet ist es?", lang="de", message_tree_id="t2"),
        oasst_row("g2", "g1", "assistant", "Zehn Uhr", lang="de", rank=0, message_tree_id="t2"),
        oasst_row("g3", "g2", "prompter", "Danke", lang="de", message_tree_id="t2"),
        oasst_row("g4", "g3", "assistant", "Bitte", lang="de", rank=0, message_tree_id="t2"),
    ]
    examples = load_examples(
        SourceSpec("o", str(write_jsonl(tmp_path / "o.jsonl", rows)), "oasst1")
    )
    assert examples == [
        Example("Root question", "", "best usable"),
        Example("Follow-up question", "", "only reply"),
    ]


def test_oasst1_parquet_with_nan_rank_prefers_ranked_reply(tmp_path: Path) -> None:
    rows = [
        oasst_row("p1", None, "prompter", "Q"),
        oasst_row("a1", "p1", "assistant", "unranked first", rank=float("nan")),
        oasst_row("a2", "p1", "assistant", "ranked", rank=1.0),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "oasst.parquet")
    spec = SourceSpec("o", str(tmp_path / "oasst.parquet"), "oasst1")
    assert load_examples(spec) == [Example("Q", "", "ranked")]


def test_parquet_file_and_folder_of_mixed_files(tmp_path: Path) -> None:
    folder = tmp_path / "alpaca"
    folder.mkdir()
    table = pa.Table.from_pylist(
        [
            {"instruction": "p", "input": "", "output": "q"},
            {"instruction": "r", "input": "s", "output": "t"},
        ]
    )
    pq.write_table(table, folder / "b.parquet")
    write_jsonl(folder / "a.jsonl", [{"instruction": "x", "input": "", "output": "y"}])
    (folder / "notes.txt").write_text("ignored")
    only_parquet = load_examples(SourceSpec("a", str(folder / "b.parquet"), "alpaca"))
    assert only_parquet == [Example("p", "", "q"), Example("r", "s", "t")]
    # A folder reads its supported files in name order.
    assert load_examples(SourceSpec("a", str(folder), "alpaca")) == [
        Example("x", "", "y"),
        *only_parquet,
    ]


def test_hub_id_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        calls.append((path, split))
        return datasets.Dataset.from_list(
            [{"instruction": "i", "context": "c", "response": "r", "category": "x"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = SourceSpec("d", "databricks/databricks-dolly-15k", "dolly", split="train")
    assert load_examples(spec) == [Example("i", "c", "r")]
    assert calls == [("databricks/databricks-dolly-15k", "train")]


def test_hub_id_offline_names_the_id_and_how_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes the real load_dataset fail at once instead of retrying for ~30 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError) as err:
        load_examples(SourceSpec("d", "budgetune-test/not-cached-anywhere", "dolly"))
    msg = str(err.value)
    assert msg.startswith("budgetune-test/not-cached-anywhere: ")
    assert "budgetune prepare" in msg and "huggingface-cli download --repo-type dataset" in msg
    assert "\n" not in msg


# --- template ------------------------------------------------------------------------------


def test_template_matches_lit_gpt_alpaca_text() -> None:
    with_input = format_prompt(Example("Sum the numbers.", "2, 3", "5"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum the numbers.\n\n### Input:\n2, 3\n\n### Response:\n"
    )
    no_input = format_prompt(Example("Name a color.", "", "blue"))
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    # Braces in user text are data, not format fields.
    assert "{x}" in format_prompt(Example("Print {x}", "", ""))


# --- tokenization --------------------------------------------------------------------------


def test_tokens_are_prompt_response_eos_with_masking(tmp_path: Path, tokenizer: Any) -> None:
    rows = dolly_rows(6)
    spec = SourceSpec("d", str(write_jsonl(tmp_path / "d.jsonl", rows)), "dolly")
    masked = tokenize_source(spec, tokenizer, 512, mask_prompt=True, cache_dir=tmp_path / "c")
    plain = tokenize_source(spec, tokenizer, 512, mask_prompt=False, cache_dir=tmp_path / "c")
    eos = tokenizer.eos_token_id
    for row, ids, labels, plain_labels in zip(rows, masked.input_ids, masked.labels, plain.labels):
        example = Example(row["instruction"], row["context"], row["response"])
        prompt = format_prompt(example)
        expected = tokenizer(prompt + example.response)["input_ids"] + [eos]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert ids.dtype == torch.int64 and ids.tolist() == expected
        assert labels[:n_prompt].eq(IGNORE_INDEX).all()
        assert labels[n_prompt:].tolist() == expected[n_prompt:]
        assert plain_labels.tolist() == expected


def test_truncation_and_prompt_too_long_are_counted(tmp_path: Path, tokenizer: Any) -> None:
    rows = dolly_rows(40, max_words=60)
    spec = SourceSpec("d", str(write_jsonl(tmp_path / "d.jsonl", rows)), "dolly")
    full = tokenize_source(spec, tokenizer, 4096, cache_dir=tmp_path / "c")
    assert full.n_truncated == 0 and full.n_prompt_too_long == 0 and len(full) == 40
    prompt_lens = [
        len(tokenizer(format_prompt(Example(r["instruction"], r["context"], "")))["input_ids"])
        for r in rows
    ]
    # Cut between the shortest and longest prompt, so some prompts do not fit at all.
    limit = sorted(prompt_lens)[len(prompt_lens) // 2]
    cut = tokenize_source(spec, tokenizer, limit, mask_prompt=True, cache_dir=tmp_path / "c")
    too_long = sum(p >= limit for p in prompt_lens)
    truncated = sum(p < limit < len(t) for p, t in zip(prompt_lens, full.input_ids))
    assert 0 < too_long < 40 and truncated > 0
    assert (cut.n_prompt_too_long, cut.n_truncated, len(cut)) == (
        too_long,
        truncated,
        40 - too_long,
    )
    assert max(len(t) for t in cut.input_ids) == limit
    # Every kept example still trains on at least one response token.
    assert all(lab.ne(IGNORE_INDEX).any() for lab in cut.labels)


def test_every_prompt_too_long_is_a_user_error(tmp_path: Path, tokenizer: Any) -> None:
    spec = SourceSpec("d", str(write_jsonl(tmp_path / "d.jsonl", dolly_rows(3))), "dolly")
    with pytest.raises(
        UserInputError, match=r"d\.jsonl: every prompt is at least max_seq_length=8"
    ):
        tokenize_source(spec, tokenizer, 8, cache_dir=tmp_path / "c")


def test_second_tokenize_hits_the_cache(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(30))
    spec = SourceSpec("d", str(path), "dolly")
    counting = CountingTokenizer(tokenizer)
    first = tokenize_source(spec, counting, 4096, cache_dir=tmp_path / "c")
    assert counting.n_calls > 0 and not first.from_cache
    assert first.cache_file is not None and first.cache_file.is_file()
    # Atomic write: no temp file is left next to the cache file.
    assert [p.name for p in (tmp_path / "c").iterdir()] == [first.cache_file.name]

    counting.n_calls = 0
    again = tokenize_source(spec, counting, 4096, cache_dir=tmp_path / "c")
    # Another max_seq_length and masking reuse the same tokenization too.
    shorter = sorted(first.lengths)[15]
    other = tokenize_source(spec, counting, shorter, mask_prompt=True, cache_dir=tmp_path / "c")
    assert counting.n_calls == 0 and again.from_cache and other.from_cache
    assert [t.tolist() for t in again.input_ids] == [t.tolist() for t in first.input_ids]
    assert other.n_truncated + other.n_prompt_too_long > 0 and max(other.lengths) <= shorter

    # An edited file is a different source: it is tokenized again.
    write_jsonl(path, dolly_rows(31))
    edited = tokenize_source(spec, counting, 4096, cache_dir=tmp_path / "c")
    assert counting.n_calls > 0 and not edited.from_cache and len(edited) == 31


def test_damaged_cache_file_is_rebuilt(tmp_path: Path, tokenizer: Any) -> None:
    spec = SourceSpec("d", str(write_jsonl(tmp_path / "d.jsonl", dolly_rows(5))), "dolly")
    first = tokenize_source(spec, tokenizer, 512, cache_dir=tmp_path / "c")
    assert first.cache_file is not None
    first.cache_file.write_bytes(b"not a torch file")
    rebuilt = tokenize_source(spec, tokenizer, 512, cache_dir=tmp_path / "c")
    assert not rebuilt.from_cache and rebuilt.lengths == first.lengths


# --- batching ------------------------------------------------------------------------------


def test_collate_right_pads() -> None:
    a = (torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]))
    b = (torch.tensor([8]), torch.tensor([8]))
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_id_falls_back_to_eos(tokenizer: Any) -> None:
    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    assert pad_id_for(tokenizer) == tokenizer.pad_token_id and pad_id_for(NoPad()) == 2


def test_mixture_follows_weights_and_zero_excludes(tmp_path: Path, tokenizer: Any) -> None:
    sources = [
        make_source(tmp_path, n, size, tokenizer) for n, size in [("a", 50), ("b", 20), ("c", 30)]
    ]
    sampler = MixtureSampler(sources, {"a": 3.0, "b": 1.0, "c": 0.0}, 4, 0, seed=1, pool_batches=8)
    assert sampler.mixture == {"a": 0.75, "b": 0.25, "c": 0.0}
    for _ in range(100):
        sampler.next_batch()
    served = sampler.n_served
    assert served["c"] == 0 and sum(served.values()) == 400
    assert abs(served["a"] / 400 - 0.75) < 0.03

    # No weights: proportional to size.
    proportional = MixtureSampler(sources, None, 4, 0, seed=1, pool_batches=8)
    assert proportional.mixture == {"a": 0.5, "b": 0.2, "c": 0.3}
    for _ in range(100):
        proportional.next_batch()
    assert all(
        abs(proportional.n_served[n] / 400 - w) < 0.03 for n, w in proportional.mixture.items()
    )


def test_epochs_cover_every_example_once(tmp_path: Path, tokenizer: Any) -> None:
    src = make_source(tmp_path, "a", 24, tokenizer)
    sampler = MixtureSampler([src], None, 4, 0, seed=3, pool_batches=3)
    seen: list[tuple[int, ...]] = []
    for _ in range(6):  # two pools of 12 = one epoch of 24
        batch = sampler.next_batch()
        seen += [
            tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])
        ]
    assert sorted(seen) == sorted(tuple(t.tolist()) for t in src.input_ids)


def test_sampler_resumes_exactly_through_json(tmp_path: Path, tokenizer: Any) -> None:
    sources = [
        make_source(tmp_path, "a", 30, tokenizer),
        make_source(tmp_path, "b", 13, tokenizer, seed=1),
    ]
    weights = {"a": 0.6, "b": 0.4}
    for n_before in (0, 5, 8, 13):  # fresh, mid-pool, exactly at a pool boundary, later pool
        run = MixtureSampler(sources, weights, 2, 0, seed=7, pool_batches=4)
        for _ in range(n_before):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))
        expected = [run.next_batch() for _ in range(12)]
        resumed = MixtureSampler(sources, weights, 2, 0, seed=7, pool_batches=4)
        resumed.load_state_dict(state)
        for want in expected:
            got = resumed.next_batch()
            assert all(torch.equal(got[k], want[k]) for k in want), n_before
        assert resumed.n_served == run.n_served and resumed.padding_fraction == run.padding_fraction
    # The state is small: counters, not example lists.
    assert len(json.dumps(state)) < 600
    other_seed = MixtureSampler(sources, weights, 2, 0, seed=8, pool_batches=4)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_different_seeds_give_different_streams(tmp_path: Path, tokenizer: Any) -> None:
    src = make_source(tmp_path, "a", 40, tokenizer)
    first = [MixtureSampler([src], None, 4, 0, seed=s).next_batch()["input_ids"] for s in (1, 1, 2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_length_grouping_cuts_padding(tmp_path: Path, tokenizer: Any) -> None:
    src = make_source(tmp_path, "a", 200, tokenizer)
    grouped = MixtureSampler([src], None, 8, 0, seed=0, pool_batches=16)
    # A pool of a single micro-batch has nothing to group: plain random batching.
    random = MixtureSampler([src], None, 8, 0, seed=0, pool_batches=1)
    for _ in range(64):
        grouped.next_batch()
        random.next_batch()
    assert grouped.padding_fraction < 0.5 * random.padding_fraction
    assert random.padding_fraction > 0.1


def test_validation_is_fixed_whatever_the_mix(tmp_path: Path, tokenizer: Any) -> None:
    train_a = write_jsonl(tmp_path / "a.jsonl", dolly_rows(20))
    train_b = write_jsonl(tmp_path / "b.jsonl", dolly_rows(20, seed=5))
    val = write_jsonl(tmp_path / "val.jsonl", dolly_rows(11, seed=9))

    def config(weights: dict[str, float] | None, seed: int) -> RunConfig:
        return RunConfig(
            model="unused",
            sources=[
                SourceSpec("a", str(train_a), "dolly"),
                SourceSpec("b", str(train_b), "dolly"),
            ],
            val=SourceSpec("val", str(val), "dolly"),
            out_dir=tmp_path / "run",
            weights=weights,
            max_steps=1,
            global_batch=4,
            micro_batch=4,
            max_seq_length=256,
            seed=seed,
            cache_dir=tmp_path / "cache",
        )

    train_1, val_1 = prepare_data(config({"a": 1.0, "b": 0.0}, 1), tokenizer)
    train_2, val_2 = prepare_data(config(None, 2), tokenizer)
    # A source with weight 0 is not even tokenized.
    assert [s.name for s in train_1] == ["a"] and [s.name for s in train_2] == ["a", "b"]
    batches_1 = validation_batches(val_1, 4, 0, max_batches=2)
    batches_2 = validation_batches(val_2, 4, 0, max_batches=2)
    assert len(batches_1) == 2
    assert all(torch.equal(x[k], y[k]) for x, y in zip(batches_1, batches_2) for k in x)
    # max_batches takes the first examples in file order, not the shortest ones.
    used = sorted(
        tuple(r[m.bool()].tolist())
        for b in batches_1
        for r, m in zip(b["input_ids"], b["attention_mask"])
    )
    assert used == sorted(tuple(t.tolist()) for t in val_1.input_ids[:8])
    assert sum(len(b["input_ids"]) for b in validation_batches(val_1, 4, 0)) == 11

    # max_examples fixes the subset whatever micro_batch a trial uses.
    def examples_used(micro_batch: int) -> list[tuple[int, ...]]:
        batches = validation_batches(val_1, micro_batch, 0, max_examples=6)
        return sorted(
            tuple(r[m.bool()].tolist())
            for b in batches
            for r, m in zip(b["input_ids"], b["attention_mask"])
        )

    assert examples_used(2) == examples_used(4) == examples_used(16)
    assert len(examples_used(4)) == 6


# --- user errors ---------------------------------------------------------------------------


def one_line_error(spec: SourceSpec) -> str:
    with pytest.raises(UserInputError) as err:
        load_examples(spec)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_user_errors_name_file_and_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert one_line_error(SourceSpec("d", str(missing), "dolly")) == f"{missing}: no such file"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert (
        one_line_error(SourceSpec("d", str(empty), "dolly"))
        == f"{empty}: no examples (schema dolly)"
    )

    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "i", "context": "", "response": "r"})
    bad.write_text(f"{good}\n{good}\n{{not json\n")
    msg = one_line_error(SourceSpec("d", str(bad), "dolly"))
    assert msg.startswith(f"{bad} line 3: not valid JSON: ")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n  {"instruction": "i",\n  "output": }\n]')
    assert one_line_error(SourceSpec("a", str(bad_json), "alpaca")).startswith(
        f"{bad_json} line 3: not valid JSON: "
    )

    no_field = write_jsonl(
        tmp_path / "nofield.jsonl",
        [{"instruction": "i", "context": "", "response": "r"}] * 2
        + [{"instruction": "i", "context": ""}],
    )
    assert one_line_error(SourceSpec("d", str(no_field), "dolly")) == (
        f"{no_field} line 3: missing field 'response' for schema dolly"
    )

    not_text = write_jsonl(tmp_path / "nottext.jsonl", [{"inputs": "i", "targets": 5}])
    assert one_line_error(SourceSpec("f", str(not_text), "flan")) == (
        f"{not_text} line 1: field 'targets' must be a string for schema flan, got int"
    )

    assert one_line_error(SourceSpec("d", str(no_field), "sharegpt")) == (  # type: ignore[arg-type]
        "source 'd': schema 'sharegpt' is unknown (choose dolly, alpaca, oasst1, flan, lima)"
    )
    # An oasst1 dump without message ids is not oasst1.
    oasst = write_jsonl(
        tmp_path / "o.jsonl", [{"parent_id": None, "role": "prompter", "text": "t"}]
    )
    assert one_line_error(SourceSpec("o", str(oasst), "oasst1")) == (
        f"{oasst} line 1: missing field 'message_id' for schema oasst1"
    )


def test_cache_dir_defaults_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_mod.default_cache_dir() == tmp_path / ".cache" / "budgetune" / "data"
