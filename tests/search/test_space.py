"""The search space: fixed vs searched parameters, alpha ratio, normalized mixtures."""

from __future__ import annotations

import optuna
import pytest

from budgetune.search.space import Fixed, normalize_mix, parse_space, run_overrides

DEFAULTS = {"lora_rank": 8, "micro_batch": 4, "global_batch": 16}


def _space(raw: dict) -> object:
    problems: list[str] = []
    space = parse_space(raw, ["dolly", "flan", "oasst1"], DEFAULTS, problems)
    assert problems == []
    return space


def test_fixed_values_never_reach_optuna_and_alpha_follows_rank() -> None:
    space = _space(
        {
            "lora_rank": {"choices": [4, 16]},
            "lora_alpha": {"ratio": 2.0},
            "lr": {"low": 1e-4, "high": 1e-2, "log": True},
            "micro_batch": 2,
            "warmup_steps": {"low": 0, "high": 20, "step": 5},
            "mix": {
                "dolly": {"low": 0.0, "high": 1.0},
                "flan": 0.0,
                "oasst1": {"low": 0.0, "high": 1.0},
            },
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        p = space.suggest(trial)
        # only searched parameters are Optuna parameters; fixed ones still come back
        assert set(trial.params) == {"lora_rank", "lr", "warmup_steps", "mix.dolly", "mix.oasst1"}
        assert p["micro_batch"] == 2 and p["lora_alpha"] == 2.0 * p["lora_rank"]
        assert p["warmup_steps"] in (0, 5, 10, 15, 20) and 1e-4 <= p["lr"] <= 1e-2
        assert p["weights"]["flan"] == 0.0
        assert sum(p["weights"].values()) == pytest.approx(1.0)
        study.tell(trial, p["lr"])


def test_a_mixture_with_no_weight_falls_back_to_uniform_over_searched_sources() -> None:
    assert normalize_mix({"a": 0.0, "b": 0.0, "c": 0.0}, ["a", "b"]) == {
        "a": 0.5,
        "b": 0.5,
        "c": 0.0,
    }
    assert normalize_mix({"a": 1.0, "b": 3.0}, ["a", "b"]) == {"a": 0.25, "b": 0.75}


def test_tpe_samples_always_give_a_usable_mixture() -> None:
    space = _space({"mix": {n: {"low": 0.0, "high": 1.0} for n in ("dolly", "flan", "oasst1")}})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=3))
    for _ in range(15):
        trial = study.ask()
        w = space.suggest(trial)["weights"]
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
        study.tell(trial, w["flan"])


def test_overrides_map_optuna_names_to_run_config_fields() -> None:
    over = run_overrides(
        {
            "lora_rank": 16,
            "lora_alpha": 32.0,
            "lora_targets": "all-linear",
            "lr": 1e-3,
            "micro_batch": 8,
            "mix.dolly": 0.3,
            "weights": {"dolly": 1.0},
        }
    )
    assert over == {
        "lora": {"r": 16, "alpha": 32.0, "targets": "all-linear"},
        "learning_rate": 1e-3,
        "micro_batch": 8,
        "weights": {"dolly": 1.0},
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"lr": {"low": 0.1, "high": 0.01}}, "search.lr.low must be <= search.lr.high"),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "search.lr.low must be > 0"),
        ({"lora_rank": {"choices": [4, 4.5]}}, "search.lora_rank.choices[1] must be an integer"),
        ({"lora_targets": {"choices": ["attention", "mlp"]}}, "'mlp' is unknown"),
        ({"lr": {"low": 1e-4}}, "search.lr needs choices, or low and high"),
        ({"lr": {"low": 1e-4, "high": 1e-3, "scale": 2}}, "search.lr: unknown key(s) scale"),
        ({"micro_batch": {"choices": [3, 4]}}, "search.global_batch (16) must be a multiple"),
        ({"mix": {"dolly": 0, "flan": 0, "oasst1": 0}}, "every source weight 0"),
        ({"mix": {"dolly": 1.0}}, "search.mix.flan is missing"),
    ],
)
def test_problems_name_their_key(raw: dict, expected: str) -> None:
    problems: list[str] = []
    parse_space(raw, ["dolly", "flan", "oasst1"], DEFAULTS, problems)
    assert any(expected in p for p in problems), problems


def test_alpha_ratio_without_a_searched_rank_uses_the_fixed_rank() -> None:
    space = _space({"lora_alpha": {"ratio": 4.0}})
    assert space.params["lora_rank"] == Fixed(8)
    assert space.suggest(optuna.create_study().ask())["lora_alpha"] == 32.0
