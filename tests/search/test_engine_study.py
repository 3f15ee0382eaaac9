"""End to end on the real engine: a small study on the shipped tiny model, CPU, offline."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from budgetune.search.launch import run_study
from budgetune.search.ledger import Ledger
from budgetune.search.progress import LineProgress
from budgetune.search.storage import create_or_load, open_storage
from budgetune.search.study import load_study_text
from transformers import AutoModelForCausalLM

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
    totals = Ledger(url, "engine-e2e", "test").totals()
    assert totals.spent_s <= 36.0 and totals.final.state == "done"
    attrs = ostudy.user_attrs
    export = Path(attrs["final.export_dir"])
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "llama"
    # the final run (best configuration, all remaining budget) beats the best short trial
    assert attrs["final.val_loss"] < ostudy.best_value + 0.05
