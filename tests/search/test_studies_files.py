"""Every study file in studies/ loads, says how to run it, and fits its track."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from budgetune.search.plan import make_plan
from budgetune.search.space import Choice
from budgetune.search.study import load_study

STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.toml"))


def test_the_shipped_studies_are_there() -> None:
    names = {p.name for p in STUDIES}
    assert {"quickstart.toml", "neurips23-a100.toml", "neurips23-4090.toml"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_loads_and_opens_with_its_command(path: Path) -> None:
    study = load_study(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and f"budgetune launch studies/{path.name}" in first
    plan = make_plan(study)
    # the plan holds at least a few trials and leaves the final run its reserve
    assert plan.n_trials_no_pruning >= 3 and plan.final_reserve_s > plan.final_tail_s


def test_quickstart_is_offline_and_small() -> None:
    study = load_study(Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml")
    assert Path(study.model.name, "config.json").exists()
    for source in [*study.data.sources, study.data.validation]:
        assert Path(source.path).exists(), source.path
    assert study.model.precision == "32-true" and study.budget.total_s <= 300
    assert make_plan(study).n_trials_no_pruning >= 8


def _task_names(study: object, section: str) -> set[str]:
    return {t.task for t in getattr(study.eval, section)}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_scores_by_tasks_with_a_disjoint_holdout(path: Path) -> None:
    study = load_study(path)
    assert study.eval is not None and study.eval.search and study.eval.holdout
    holdout = _task_names(study, "holdout")
    # a holdout task that is also searched or finally scored would no longer be held out
    assert not holdout & _task_names(study, "search")
    assert not holdout & _task_names(study, "final")
    # trials pay for their eval: the plan charges it
    assert study.budget.trial_eval_s > 0 and make_plan(study).eval_share > 0


def test_quickstart_tasks_are_the_shipped_local_yamls() -> None:
    study = load_study(Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml")
    assert _task_names(study, "search") == {"quickstart_heldout_mc", "quickstart_heldout_qa"}
    assert _task_names(study, "holdout") == {"quickstart_holdout_mc", "quickstart_holdout_qa"}
    (include,) = study.eval.include
    defined = {}
    for f in include.glob("*.yaml"):
        cfg = yaml.safe_load(f.read_text())
        defined[cfg["task"]] = include / cfg["dataset_kwargs"]["data_files"]["test"]
    # every task the study names is one of the shipped YAMLs, over a shipped data file
    for name in _task_names(study, "search") | _task_names(study, "holdout"):
        assert defined[name].exists(), name
    # the search limits leave the final eval something to add: it sees more examples
    limits = {t.task: t.limit for t in study.eval.search}
    for t in study.eval.final:
        assert t.limit is None or t.limit > limits.get(t.task, 0)


@pytest.mark.parametrize(("name", "max_micro"), [("neurips23-a100", 8), ("neurips23-4090", 2)])
def test_challenge_tracks(name: str, max_micro: int) -> None:
    study = load_study(Path(__file__).resolve().parents[2] / "studies" / f"{name}.toml")
    assert study.budget.total_s == 86400 and study.data.max_seq_length == 2048
    assert study.model.precision == "bf16-true"
    assert study.model.name in ("meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1")
    hub = {s.path for s in study.data.sources}
    assert {"databricks/databricks-dolly-15k", "OpenAssistant/oasst1", "Muennighoff/flan"} <= hub
    micro = study.space.params["micro_batch"]
    # micro-batch choices that fit the card's memory with a 7B model
    assert isinstance(micro, Choice) and max(micro.choices) == max_micro
    # lm-eval equivalents of the HELM open tasks score trials; the final adds BIG-bench Hard
    assert _task_names(study, "search") == {"mmlu", "truthfulqa_mc1", "bbq", "gsm8k"}
    assert _task_names(study, "search") | {"bbh_fewshot"} <= _task_names(study, "final")
    assert _task_names(study, "holdout") == {"arc_challenge", "hellaswag", "winogrande", "piqa"}
    mmlu = next(t for t in study.eval.search if t.task == "mmlu")
    assert (mmlu.num_fewshot, mmlu.baseline) == (5, 0.25) and mmlu.limit <= 10
