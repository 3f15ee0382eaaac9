"""Tests for search/evaluation.py: [eval] schema, objective, holdout, guard, `budgetune eval`."""

from __future__ import annotations

import json
import random
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from budgetune.engine.errors import UserInputError
from budgetune.engine.evaluate import TaskResult
from budgetune.search.evaluation import (
    EvalSettings,
    EvalTask,
    Evaluator,
    GuardRow,
    guard_table,
    overfitting_warnings,
    weighted_score,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "studies" / "quickstart"


def _result(task: str, value: float, higher_is_better: bool = True) -> TaskResult:
    return TaskResult(task, "acc,none", value, 0.1, 10, higher_is_better)


# --- the [eval] section -----------------------------------------------------------------


def test_from_toml_resolves_paths_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "quickstart" / "tasks").mkdir(parents=True)
    table = tomllib.loads(
        """
        include = "quickstart/tasks"
        [[search]]
        task = "quickstart_heldout_mc"
        limit = 40
        baseline = 0.25
        [[search]]
        task = "quickstart_heldout_qa"
        limit = 10
        weight = 0.5
        metric = "exact_match,strict"
        [[holdout]]
        task = "quickstart_holdout_mc"
        """
    )
    s = EvalSettings.from_toml(table, tmp_path)
    assert s.include == [tmp_path / "quickstart" / "tasks"]
    assert [(t.task, t.limit, t.weight, t.baseline) for t in s.search] == [
        ("quickstart_heldout_mc", 40, 1.0, 0.25),
        ("quickstart_heldout_qa", 10, 0.5, 0.0),
    ]
    # With search tasks the objective is the tasks alone unless val_loss_weight says otherwise.
    assert s.val_loss_weight == 0.0
    # The final model is scored on the search tasks in full by default.
    assert [(t.task, t.limit) for t in s.final] == [
        ("quickstart_heldout_mc", None),
        ("quickstart_heldout_qa", None),
    ]
    assert s.search[1].request().metric == "exact_match,strict"
    only_loss = EvalSettings.from_toml({"holdout": ["arc_easy"]}, tmp_path)
    assert only_loss.val_loss_weight == 1.0 and only_loss.holdout[0].task == "arc_easy"


def test_from_toml_reports_every_problem_with_its_key_path(tmp_path: Path) -> None:
    table = {
        "include": ["missing/tasks"],
        "val_loss_weight": -1,
        "holdout_top_k": 0,
        "colour": 1,
        "search": [
            {"task": "a", "limit": 0},
            {"task": "b", "wieght": 2.0},
            {"task": "c", "weight": 0, "baseline": 1.0, "limit": "ten"},
            {"limit": 3},
        ],
        "holdout": [{"task": "a"}],
        "final": "a",
    }
    with pytest.raises(UserInputError) as err:
        EvalSettings.from_toml(table, tmp_path)
    msg = str(err.value)
    for expected in (
        "eval: unknown key 'colour'",
        "eval.search[0].limit must be >= 1",
        "eval.search[1]: unknown key 'wieght'",
        "eval.search[2].limit must be an integer",
        "eval.search[2].weight must be > 0",
        "eval.search[2].baseline must be in [0, 1)",
        "eval.search[3].task must name an lm-eval task",
        "eval.final must be an array of tables",
        "eval.include[0]: missing/tasks does not exist",
        "eval.holdout[0].task 'a' is also a search task",
        "eval.val_loss_weight must be >= 0",
        "eval.holdout_top_k must be >= 1",
    ):
        assert expected in msg
    # One line, as the CLI prints it.
    assert "\n" not in msg
    with pytest.raises(UserInputError, match="the objective is empty"):
        EvalSettings.from_toml({"val_loss_weight": 0}, tmp_path)


# --- objective and holdout choice -------------------------------------------------------


def test_weighted_score_normalizes_by_chance_and_weights() -> None:
    specs = [EvalTask("mc", baseline=0.25, weight=3.0), EvalTask("qa", weight=1.0)]
    # mc: (0.625 - 0.25) / 0.75 = 0.5; qa: 0.9 -> (3 * 0.5 + 0.9) / 4 = 0.6
    score = weighted_score(specs, [_result("mc", 0.625), _result("qa", 0.9)], "eval.search")
    assert score == pytest.approx(0.6)
    # Chance-level accuracy scores 0, whatever the number of choices.
    assert weighted_score(specs[:1], [_result("mc", 0.25)], "x") == pytest.approx(0.0)
    with pytest.raises(UserInputError, match="eval.search: metric acc,none of task mc is lower"):
        weighted_score(specs[:1], [_result("mc", 0.5, higher_is_better=False)], "eval.search")


def test_holdout_runs_only_on_trials_among_the_best_so_far(tmp_path: Path) -> None:
    settings = EvalSettings(search=[EvalTask("s")], holdout=[EvalTask("h")], holdout_top_k=2)
    ev = Evaluator(settings, tmp_path)
    # Lower objective is better: 0.3 beats all, 0.45 is second, 0.6 has two better before it.
    assert ev.is_holdout_candidate(0.3, [0.4, 0.5, 0.7])
    assert ev.is_holdout_candidate(0.45, [0.4, 0.5, 0.7])
    assert not ev.is_holdout_candidate(0.6, [0.4, 0.5, 0.7])
    assert ev.is_holdout_candidate(5.0, [])
    assert not Evaluator(EvalSettings(search=[EvalTask("s")]), tmp_path).is_holdout_candidate(
        0.0, []
    )


def test_trial_objective_without_search_tasks_is_the_validation_loss(tmp_path: Path) -> None:
    ev = Evaluator(EvalSettings(val_loss_weight=2.0), tmp_path)
    score = ev.score_trial(model=None, tokenizer=None, val_loss=1.25)
    assert (score.value, score.search_score, score.tasks, score.seconds) == (2.5, None, {}, 0.0)


# --- the overfitting guard --------------------------------------------------------------


def test_guard_is_quiet_when_search_and_holdout_agree() -> None:
    rows = [
        GuardRow("trial 1", 0.40, 0.35, objective=-0.40),
        GuardRow("trial 4", 0.50, 0.45, objective=-0.50),
        GuardRow("trial 9", 0.60, 0.54, objective=-0.60),
        GuardRow("final", 0.62, 0.57, final=True),
    ]
    assert overfitting_warnings(rows) == []
    table = guard_table(rows)
    # Report data: scores side by side, gap and holdout rank per model.
    assert [r["holdout_rank"] for r in table] == [4, 3, 2, 1]
    assert table[2]["gap"] == pytest.approx(0.06) and table[3]["final"]


def test_guard_warns_when_best_by_search_is_not_best_by_holdout() -> None:
    rows = [
        GuardRow("trial 2", 0.50, 0.50, objective=-0.50),
        GuardRow("trial 5", 0.55, 0.52, objective=-0.55),
        GuardRow("trial 8", 0.60, 0.40, objective=-0.60),
    ]
    warnings = overfitting_warnings(rows, gap_tolerance=1.0)
    assert len(warnings) == 1
    assert warnings[0].startswith("trial 8 is the best by search objective but ranks 3 of 3")
    # With top_k=3 every trial counts as "among the best by holdout", so the rule is quiet.
    assert overfitting_warnings(rows, top_k=3, gap_tolerance=1.0) == []


def test_guard_ignores_differences_within_the_eval_noise() -> None:
    # The quickstart's first real run: chance-level scores on 40 examples (stderr ~0.05-0.09).
    rows = [
        GuardRow("trial 0", -0.067, 0.000, 8.56, search_stderr=0.08, holdout_stderr=0.06),
        GuardRow("trial 1", 0.000, -0.089, 7.52, search_stderr=0.08, holdout_stderr=0.05),
        GuardRow("trial 10", 0.000, -0.111, 6.80, search_stderr=0.08, holdout_stderr=0.05),
    ]
    assert overfitting_warnings(rows) == []
    # The same differences with no stderr known are reported: the guard cannot tell.
    bare = [GuardRow(r.label, r.search_score, r.holdout_score, r.objective) for r in rows]
    assert len(overfitting_warnings(bare)) == 2
    # Precise scores (large limits) make the same differences real: both rules fire again.
    sharp = [
        GuardRow(r.label, r.search_score, r.holdout_score, r.objective, False, 0.005, 0.005)
        for r in rows
    ]
    warnings = overfitting_warnings(sharp)
    assert len(warnings) == 2
    assert warnings[0].startswith("trial 10 is the best by search objective but ranks 3 of 3")


def test_guard_rows_from_stored_attributes() -> None:
    attrs = {"search_score": 0.5, "search_stderr": 0.02, "holdout_score": 0.4, "x": 1}
    row = GuardRow.from_attrs("trial 3", attrs, objective=-0.5)
    assert row == GuardRow("trial 3", 0.5, 0.4, -0.5, False, 0.02, None)
    assert row.gap == pytest.approx(0.1) and row.gap_stderr is None
    # No holdout score stored: the model is not part of the comparison.
    assert GuardRow.from_attrs("trial 4", {"search_score": 0.5}) is None


def test_guard_warns_when_the_gap_grows_during_search_and_in_the_final_run() -> None:
    rows = [
        GuardRow("trial 1", 0.40, 0.38, objective=-0.40),
        GuardRow("trial 3", 0.50, 0.44, objective=-0.50),
        GuardRow("trial 7", 0.70, 0.52, objective=-0.70),
        GuardRow("final", 0.80, 0.50, final=True),
    ]
    warnings = overfitting_warnings(rows, gap_tolerance=0.05)
    assert len(warnings) == 2
    assert "gap grew from 0.020 (trial 1) to 0.180 (trial 7)" in warnings[0]
    assert "final model's search-holdout gap (0.300) exceeds that of trial 7 (0.180)" in warnings[1]
    # A looser tolerance accepts the same drift.
    assert overfitting_warnings(rows, gap_tolerance=0.2) == []


# --- end to end on a tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Model folder, tokenizer and tasks folder: the shipped ones, or tiny stand-ins."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("qs")
    if (QUICKSTART / "data" / "heldout_mc.jsonl").exists():
        tasks = QUICKSTART / "tasks"
    else:
        shutil.copytree(QUICKSTART / "tasks", root / "tasks")
        (root / "data").mkdir()
        rng = random.Random(1)
        for split in ("heldout", "holdout"):
            rows = [{"question": f"Q{i}?", "choices": ["a", "b", "c"], "label": rng.randrange(3)}
                    for i in range(20)]  # fmt: skip
            (root / "data" / f"{split}_mc.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        tasks = root / "tasks"
    if (QUICKSTART / "model" / "config.json").exists():
        model_dir = QUICKSTART / "model"
    else:
        model_dir = root / "model"
        tokenizer = _tiny_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {"model_dir": model_dir, "tasks": tasks, "tokenizer": tokenizer}


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(["below is an instruction response question"] * 10, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip


@pytest.mark.slow
def test_evaluator_scores_a_trial_runs_holdout_and_final(
    quickstart: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quickstart["model_dir"])
    tokenizer = quickstart["tokenizer"]
    table = {
        "include": [str(quickstart["tasks"])],
        "val_loss_weight": 0.5,
        "search": [{"task": "quickstart_heldout_mc", "limit": 8, "baseline": 0.1}],
        "holdout": [{"task": "quickstart_holdout_mc", "limit": 6}],
        "final": [{"task": "quickstart_heldout_mc", "limit": 8}],
    }
    settings = EvalSettings.from_toml(table, tmp_path)
    ev = Evaluator(settings, tmp_path / "work")
    trial = ev.score_trial(model, tokenizer, val_loss=2.0, out_dir=tmp_path / "trial-0")
    (mc,) = trial.results
    assert (mc.task, mc.n_examples) == ("quickstart_heldout_mc", 8)
    # objective = 0.5 * val_loss - (acc - 0.1) / 0.9
    assert trial.search_score == pytest.approx((mc.value - 0.1) / 0.9)
    assert trial.search_stderr == pytest.approx(mc.stderr / 0.9)
    assert trial.value == pytest.approx(1.0 - trial.search_score)
    stored = json.loads((tmp_path / "trial-0" / "eval_search.json").read_text())
    assert stored["tasks"]["quickstart_heldout_mc"]["value"] == mc.value
    assert stored["value"] == trial.value and stored["search_score"] == trial.search_score
    # The driver stores `tasks` as a trial attribute: it must be plain JSON, keyed by task.
    assert json.loads(json.dumps(trial.tasks)) == stored["tasks"]
    assert trial.seconds > 0

    holdout = ev.holdout(model, tokenizer)
    assert [(t.task, t.n_examples) for t in holdout.results] == [("quickstart_holdout_mc", 6)]
    assert holdout.score == pytest.approx(holdout.results[0].value)

    final = ev.final(model, tokenizer, out_dir=tmp_path / "final")
    # Same weights, same examples: the final model's search score equals the trial's, and
    # it came from the final eval's result (same request) rather than a second run.
    assert final.search_score == pytest.approx(trial.search_score)
    assert final.holdout is not None and final.holdout.score == pytest.approx(holdout.score)
    written = json.loads((tmp_path / "final" / "eval_final.json").read_text())
    assert list(written["tasks"]) == ["quickstart_heldout_mc"]
    assert list(written["holdout"]["tasks"]) == ["quickstart_holdout_mc"]
    assert written["search_score"] == pytest.approx(trial.search_score)
    rows = [GuardRow("trial 0", trial.search_score, holdout.score, trial.value)]
    rows.append(GuardRow("final", final.search_score, final.holdout.score, final=True))
    # Identical weights cannot overfit relative to themselves.
    assert overfitting_warnings(rows) == []


@pytest.mark.slow
def test_budgetune_eval_command_writes_json(
    quickstart: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budgetune.search import cli

    out = tmp_path / "results.json"
    argv = ["budgetune", "eval", str(quickstart["model_dir"]), "--tasks", "quickstart_heldout_mc",
            "--include-path", str(quickstart["tasks"]), "--limit", "5", "-o", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    cli.main()
    data = json.loads(out.read_text())
    assert data["model"] == str(quickstart["model_dir"]) and data["limit"] == 5
    (task,) = data["tasks"].values()
    assert (task["task"], task["metric"], task["n_examples"]) == (
        "quickstart_heldout_mc",
        "acc,none",
        5,
    )
    assert 0.0 <= task["value"] <= 1.0 and task["stderr"] is not None

    # A folder that is not an exported model is a one-line user error, exit code 2.
    monkeypatch.setattr(sys, "argv", ["budgetune", "eval", str(tmp_path), "--tasks", "x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
