"""Study files: typed, validated in one pass, paths resolved against the file's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from budgetune.engine.errors import UserInputError
from budgetune.search.space import AlphaRatio, Choice, Fixed, Range
from budgetune.search.study import load_study, load_study_text

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[study]
name = "s"
seed = 3
run_dir = "out/s"
[model]
name = "models/tiny"
[data]
max_seq_length = 64
[[data.sources]]
name = "dolly"
path = "data/dolly.jsonl"
schema = "dolly"
[[data.sources]]
name = "hub"
path = "databricks/databricks-dolly-15k"
schema = "dolly"
[data.validation]
path = "data/val.jsonl"
schema = "alpaca"
[train]
global_batch = 8
micro_batch = 2
learning_rate = 1e-3
eval_interval = 5
max_steps = 20
[train.lora]
r = 4
[search]
lora_rank = { choices = [4, 8] }
lora_alpha = { ratio = 2 }
lr = { low = 1e-4, high = 1e-2, log = true }
micro_batch = { choices = [1, 2, 4] }
lora_dropout = 0.1
[search.mix]
dolly = { low = 0.0, high = 1.0 }
hub = 0.5
[budget]
total_s = 100
trial_s = 10
"""


def test_load_resolves_paths_against_the_study_folder(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "studies" / "s.toml"
    (f.parent / "models").mkdir(parents=True)
    f.write_text(GOOD)
    monkeypatch.chdir(REPO)
    s = load_study(f)
    assert s.name == "s" and s.seed == 3
    assert s.run_dir == (f.parent / "out/s").resolve()
    assert s.storage == f"sqlite:///{s.run_dir / 'study.db'}"
    # local paths resolve against the file's folder (the model itself need not exist yet, its
    # first folder does); `org/name` with no such local folder stays a hub id
    assert s.model.name == str(f.parent / "models/tiny")
    assert s.data.sources[0].path == str(f.parent / "data/dolly.jsonl")
    assert s.data.sources[1].path == "databricks/databricks-dolly-15k"
    assert s.space.params["lora_rank"] == Choice((4, 8))
    assert s.space.params["lora_alpha"] == AlphaRatio(2.0)
    assert s.space.params["lr"] == Range(1e-4, 1e-2, log=True)
    assert s.space.params["lora_dropout"] == Fixed(0.1)
    assert s.space.mix["hub"] == Fixed(0.5)
    assert s.space.searched == ["lora_rank", "lr", "micro_batch", "mix.dolly"]


def test_run_config_layers_train_defaults_params_and_horizon(tmp_path: Path) -> None:
    s = load_study_text(GOOD, tmp_path)
    cfg = s.run_config(
        tmp_path / "t0",
        {"lora_rank": 8, "lora_alpha": 16.0, "lr": 5e-3, "weights": {"dolly": 0.25, "hub": 0.75}},
        max_seconds=30.0,
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.learning_rate) == (8, 16.0, 5e-3)
    assert cfg.weights == {"dolly": 0.25, "hub": 0.75}
    # the horizon given replaces [train]'s max_steps instead of clashing with it
    assert (cfg.max_seconds, cfg.max_steps) == (30.0, None)
    assert (cfg.global_batch, cfg.micro_batch, cfg.eval_interval, cfg.max_seq_length) == (
        8,
        2,
        5,
        64,
    )
    default = s.run_config(tmp_path / "d")
    assert (default.lora.r, default.learning_rate, default.max_steps) == (4, 1e-3, 20)


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    bad = (
        GOOD.replace("lr = { low = 1e-4", "lr = { low = -1e-4")
        .replace("[budget]", "[budget]\nfinal_share = 1.5\nbogus = 1")
        .replace("seed = 3", 'seed = "x"')
        .replace("[sampler]", "")
        + '\n[pruner]\nkind = "sometimes"\n[extra]\n'
    )
    f = tmp_path / "bad.toml"
    f.write_text(bad)
    with pytest.raises(UserInputError) as e:
        load_study(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f))
    for part in (
        "search.lr.low must be > 0",
        "budget.bogus is not a known key",
        "budget.final_share must be in (0, 1)",
        "study.seed must be int",
        "pruner.kind 'sometimes' is unknown",
        "extra is not a known section",
    ):
        assert part in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("micro_batch = { choices = [1, 2, 4] }", "micro_batch = { choices = [3] }"),
            "search.global_batch (8) must be a multiple of every search.micro_batch choice (3)",
        ),
        (("hub = 0.5", "web = 0.5"), "search.mix.web names no source"),
        (("hub = 0.5", "hub = 0.5\ndolly2 = 1"), "search.mix.dolly2 names no source"),
        (
            ('schema = "alpaca"', 'schema = "sharegpt"'),
            "data.validation.schema 'sharegpt' is unknown",
        ),
        (("trial_s = 10", "trial_s = 10\nfinal_share = 0.95"), "cannot hold one trial"),
        (
            ("lora_dropout = 0.1", "lora_dropout = { low = 0.5, high = 0.1 }"),
            "search.lora_dropout.low must be <= search.lora_dropout.high",
        ),
        (
            ("[train.lora]\nr = 4", "[train.lora]\nr = 4\nrank = 3"),
            "train.lora.rank is not a known key",
        ),
        (("max_steps = 20", "max_steps = 20\nwarmup_steps = -1"), "warmup_steps must be >= 0"),
    ],
)
def test_specific_mistakes(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    assert edit[0] in GOOD
    with pytest.raises(UserInputError, match=None) as e:
        load_study_text(GOOD.replace(*edit), tmp_path)
    assert expected in str(e.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="nope.toml: no such study file"):
        load_study(tmp_path / "nope.toml")
    f = tmp_path / "broken.toml"
    f.write_text("[study\nname=")
    with pytest.raises(UserInputError, match="broken.toml: not valid TOML"):
        load_study(f)


def test_default_run_dir_is_under_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_study_text(GOOD.replace('run_dir = "out/s"\n', ""), tmp_path / "elsewhere")
    assert s.run_dir == tmp_path / "runs" / "s"
    # an explicit override wins over the file's value, storage follows it
    s = load_study_text(GOOD, tmp_path, run_dir=tmp_path / "r2")
    assert s.storage.endswith("/r2/study.db")


def test_the_cli_reports_a_bad_study_file_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace("total_s = 100", "total_s = -5"))
    cli = [sys.executable, "-c", "from budgetune.search.cli import main; main()"]
    p = subprocess.run([*cli, "plan", str(f)], capture_output=True, text=True, timeout=60)
    # a user mistake: exit 2, one line naming the file and the key, no traceback
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "budget.total_s must be > 0" in p.stderr
    assert str(f) in p.stderr and "Traceback" not in p.stderr
