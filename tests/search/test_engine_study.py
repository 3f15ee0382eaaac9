"""End to end on the real engine: a small study on the shipped tiny model, CPU, offline."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from transformers import AutoModelForCausalLM

from budgetune.search.launch import run_study
from budgetune.search.ledger import Ledger
from budgetune.search.progress import LineProgress
from budgetune.search.storage import create_or_load, open_storage
from budgetune.search.study import load_study_text

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml"


@pytest.mark.slow
def test_engine_study_trains_trials_then_exports_the_final_model(tmp_path: Path, capsys) -> None:
    if not (QUICKSTART.parent / "quickstart" / "model" / "config.json").exists():
        pytest.skip("the quickstart model is not built (python studies/quickstart/build.py)")
    text = QUICKSTART.read_text()
    # the quickstart, shrunk: two short trials, a short final run, tokenized sources capped
    text = re.sub(r"(?m)^total_s = .*$", "total_s = 36", text)
    text = re.sub(r"(?m)^trial_s = .*$", "trial_s = 8", text)
    text = re.sub(r"(?m)^min_trial_s = .*$", "min_trial_s = 4", text)
    text = re.sub(r"(?m)^final_share = .*$", "final_share = 0.35", text)
    text = re.sub(r"(?m)^final_tail_s = .*$", "final_tail_s = 6", text)
    text = text.replace('name = "quickstart"\n', 'name = "engine-e2e"\nmax_trials = 2\n')
    text = text.replace('schema = "dolly"\n', 'schema = "dolly"\nlimit = 300\n')
    # relative paths resolve against studies/, as if the file lived there
    study = load_study_text(text, QUICKSTART.parent, run_dir=tmp_path / "run")
    ostudy = create_or_load(study, open_storage(study.storage))
    print(run_study(study, ostudy, progress=LineProgress()))
    out = capsys.readouterr().out
    assert "study engine-e2e (finished)" in out
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    ostudy = optuna.load_study(study_name="engine-e2e", storage=url)
    trials = ostudy.get_trials()
    assert len([t for t in trials if t.user_attrs["outcome"] != "skipped"]) == 2
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        # real throughput and memory figures from the engine, on every trial that trained
        if t.user_attrs["outcome"] in ("complete", "pruned"):
            assert t.user_attrs["tokens_per_s"] > 0 and t.user_attrs["peak_memory_bytes"] > 0
    scored = [t for t in trials if "search_score" in t.user_attrs]
    # the quickstart's lm-eval tasks scored the trials: per-task results in attrs and JSON
    assert scored, [t.user_attrs.get("reason") for t in trials]
    for t in scored:
        a = t.user_attrs
        assert set(a["eval_tasks"]) == {"quickstart_heldout_mc", "quickstart_heldout_qa"}
        assert a["eval_tasks"]["quickstart_heldout_mc"]["n_examples"] == 40
        assert a["search_stderr"] > 0
        # objective = val_loss (weight 1) - search score
        assert t.value == pytest.approx(a["val_loss"] - a["search_score"])
        written = Path(a["trial_dir"], "eval_search.json")
        assert written.exists()
    totals = Ledger(url, "engine-e2e", "test").totals()
    assert totals.spent_s <= 36.0 and totals.final.state == "done"
    attrs = ostudy.user_attrs
    export = Path(attrs["final.export_dir"])
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "llama"
    # the final run (best configuration, all remaining budget) beats the best short trial
    assert attrs["final.val_loss"] < ostudy.best_trial.user_attrs["val_loss"] + 0.05
    # the final model was scored on search and holdout tasks (limits cut to the time left)
    assert attrs["final.search_score"] is not None and attrs["final.holdout_score"] is not None
    assert Path(attrs["final.run_dir"], "eval_final.json").exists()
