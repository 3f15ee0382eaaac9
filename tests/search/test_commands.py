"""`budgetune train | prepare | generate | merge`: overrides, outputs, one-line user errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.errors import UserInputError
from budgetune.search import cli
from budgetune.search.commands import apply_overrides

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "studies" / "quickstart" / "model"
DATA = ROOT / "studies" / "quickstart" / "data"


def write_study(tmp: Path, *, model: str = str(MODEL), alpaca: Path | None = None,
                precision: str = "32-true", train: str = "max_steps = 2") -> Path:  # fmt: skip
    """A tiny study: the shipped model, two small sources, the shipped validation set."""
    text = f"""
[study]
name = "cli"
run_dir = "{tmp / 'runs'}"

[model]
name = "{model}"
precision = "{precision}"

[data]
max_seq_length = 128

[[data.sources]]
name = "dolly"
path = "{DATA / 'dolly.jsonl'}"
schema = "dolly"
limit = 60

[[data.sources]]
name = "alpaca"
path = "{alpaca or DATA / 'alpaca.json'}"
schema = "alpaca"
limit = 60

[data.validation]
path = "{DATA / 'val.jsonl'}"
schema = "alpaca"

[train]
global_batch = 4
micro_batch = 2
eval_interval = 2
eval_examples = 8
cache_dir = "{tmp / 'cache'}"
{train}

[budget]
total_s = 60
trial_s = 10
"""
    path = tmp / "study.toml"
    path.write_text(text)
    return path


def budgetune(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["budgetune", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [x for x in err.splitlines() if x.startswith("budgetune: error:")]
    assert code == 2 and len(lines) == 1, err[-1500:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# --- overrides --------------------------------------------------------------------------------


def base_config(**kw) -> RunConfig:
    sources = [SourceSpec("dolly", "d.jsonl", "dolly"), SourceSpec("flan", "f.jsonl", "flan")]
    return RunConfig(model="m", sources=sources, val=SourceSpec("v", "v.jsonl", "alpaca"),
                     out_dir=Path("out"), max_steps=100, **kw)  # fmt: skip


def test_overrides_map_aliases_onto_run_config_fields() -> None:
    config = apply_overrides(base_config(), [
        "lr=1e-3", "r=16", "alpha=32", "dropout=0.1", "targets=all-linear", "micro_batch=8",
        "global_batch=64", "warmup_steps=5", "weight_decay=0", "seed=3", "precision=bf16-true",
        "weights.flan=2", "mask_prompt=true", "eval_batches=none",
    ])  # fmt: skip
    assert config.learning_rate == 1e-3 and config.seed == 3 and config.precision == "bf16-true"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32.0, 0.1)
    assert config.lora.targets == "all-linear"
    assert (config.micro_batch, config.global_batch, config.warmup_steps) == (8, 64, 5)
    assert config.weight_decay == 0.0 and config.mask_prompt is True
    # Naming one source's weight keeps the others at 1.0 (no weights were set before).
    assert config.weights == {"dolly": 1.0, "flan": 2.0}
    assert config.max_steps == 100


def test_a_horizon_override_replaces_the_study_horizon() -> None:
    config = apply_overrides(base_config(), ["max_seconds=30"])
    assert (config.max_steps, config.max_tokens, config.max_seconds) == (None, None, 30.0)
    config = apply_overrides(base_config(), ["max_tokens=5000"])
    assert (config.max_steps, config.max_tokens, config.max_seconds) == (None, 5000, None)


@pytest.mark.parametrize(
    ("override", "message"),
    [("learning_rte=1e-3", "override 'learning_rte': unknown key"),
     ("lr=fast", "override lr='fast': not a valid float"),
     ("r=2.5", "override r='2.5': not a valid int"),
     ("weights.oasst=1", "override weights.oasst: no source 'oasst'"),
     ("model=other", "override 'model': unknown key"),
     ("lr", "override 'lr': expected key=value"),
     ("precision=fp8", "precision 'fp8' is unknown"),
     ("global_batch=6", "global_batch (6) must be a multiple of micro_batch (4)")],
)  # fmt: skip
def test_bad_overrides_are_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserInputError) as err:
        apply_overrides(base_config(), [override])
    assert message in str(err.value)


# --- the commands end to end ------------------------------------------------------------------


def test_train_merge_generate_through_the_cli(monkeypatch, capsys, tmp_path) -> None:
    study = write_study(tmp_path)
    run_dir = tmp_path / "run"
    code, out, err = budgetune(monkeypatch, capsys, "train", str(study), "lr=1e-2", "r=4",
                               "--out-dir", str(run_dir))  # fmt: skip
    assert code == 0, err[-2000:]
    assert f"run directory: {run_dir}" in out and f"adapter:       {run_dir / 'adapter'}" in out
    assert "completed after 2 steps" in err
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["learning_rate"] == 1e-2 and saved["lora"]["r"] == 4
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "final"

    merged = tmp_path / "merged"
    code, out, err = budgetune(monkeypatch, capsys, "merge", str(run_dir), str(merged))
    assert code == 0, err[-2000:]
    assert f"merged model: {merged}" in out and (merged / "model.safetensors").is_file()

    # Raw prose (no template) that the base model continues rather than ending at once.
    prompt = ["-p", "Gaiki is 18 years old and", "--raw", "--max-new-tokens", "6"]
    code, from_run, _ = budgetune(monkeypatch, capsys, "generate", str(run_dir), *prompt)
    assert code == 0
    code, from_merged, _ = budgetune(monkeypatch, capsys, "generate", str(merged), *prompt)
    # Base + the run's adapter and the merged export answer the same (greedy).
    assert code == 0 and from_run == from_merged and from_run.strip()


def test_prepare_tokenizes_everything_and_reports_dropped_prompts(
    monkeypatch, capsys, tmp_path
) -> None:
    rows = [{"instruction": f"What is {n} plus 1?", "input": "", "output": str(n + 1)}
            for n in range(20)]  # fmt: skip
    rows[3]["instruction"] = "tell me " * 200
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows))
    study = write_study(tmp_path, alpaca=alpaca)
    code, out, err = budgetune(monkeypatch, capsys, "prepare", str(study))
    assert code == 0, err[-2000:]
    assert f"model:  {MODEL}" in out
    assert "data:   alpaca: 19 examples" in out
    assert "1 dropped (prompt longer than max_seq_length)" in out
    assert any((tmp_path / "cache").iterdir())
    dropped = sum(int(m) for m in re.findall(r"(\d+) dropped", out))

    # Training on it counts the dropped prompt and says so, rather than crashing.
    code, out, err = budgetune(monkeypatch, capsys, "train", str(study), "--out-dir",
                               str(tmp_path / "run"))  # fmt: skip
    assert code == 0, err[-2000:]
    # (Its count covers every source and the validation set, as prepare's lines do.)
    assert f"{dropped} dropped (prompt alone too long)" in err


# --- user mistakes: one line, exit 2, no traceback -------------------------------------------


def test_missing_model_folder(monkeypatch, capsys, tmp_path) -> None:
    study = write_study(tmp_path, model=str(tmp_path / "no-such-model"))
    code, _, err = budgetune(monkeypatch, capsys, "train", str(study))
    assert_one_line_error(code, err, f"{tmp_path / 'no-such-model'}: no such model folder")


def test_model_family_without_lora_targets(monkeypatch, capsys, tmp_path) -> None:
    folder = tmp_path / "opt"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
        word_embed_proj_dim=32, vocab_size=2048,
    )).save_pretrained(folder)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, folder / name)
    study = write_study(tmp_path, model=str(folder))
    code, _, err = budgetune(monkeypatch, capsys, "train", str(study))
    assert_one_line_error(code, err, "model_type 'opt' has no known LoRA targets")


def test_empty_dataset(monkeypatch, capsys, tmp_path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code, _, err = budgetune(monkeypatch, capsys, "train", str(write_study(tmp_path, alpaca=empty)))
    assert_one_line_error(code, err, f"{empty}: no examples")


def test_malformed_jsonl_names_file_and_line(monkeypatch, capsys, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = (DATA / "val.jsonl").read_text().splitlines()[:4]
    bad.write_text("\n".join([good[0], good[1], "{not json", good[3]]) + "\n")
    code, _, err = budgetune(monkeypatch, capsys, "train", str(write_study(tmp_path, alpaca=bad)))
    assert_one_line_error(code, err, f"{bad} line 3: not valid JSON")


def test_unknown_precision_in_study_and_override(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = budgetune(monkeypatch, capsys, "train",
                             str(write_study(tmp_path, precision="fp8")))  # fmt: skip
    assert_one_line_error(code, err, "precision 'fp8' is unknown")
    code, _, err = budgetune(monkeypatch, capsys, "train", str(write_study(tmp_path)),
                             "precision=fp4")  # fmt: skip
    assert_one_line_error(code, err, "precision 'fp4' is unknown")


def test_study_without_a_horizon_asks_for_one(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = budgetune(monkeypatch, capsys, "train", str(write_study(tmp_path, train="")))
    assert_one_line_error(code, err, "no horizon", "max_steps=100")


def test_merge_of_a_folder_without_adapter(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = budgetune(monkeypatch, capsys, "merge", str(tmp_path), str(tmp_path / "o"))
    assert_one_line_error(code, err, "no adapter_config.json")
