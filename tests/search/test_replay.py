"""The replay backend: curves format, mapping rule, virtual clock, whole studies, horizons."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from budgetune.engine.errors import Diverged, OutOfMemory, UserInputError
from budgetune.engine.events import EvalEvent
from budgetune.search.curves import load_curves, validate_curves
from budgetune.search.horizon import format_correlation, horizon_correlation, spearman
from budgetune.search.record_curves import Grid, grid_points, mix_weights
from budgetune.search.replay import ReplayBackend, replay_study
from budgetune.search.study import load_study_text

SOURCES = ("dolly", "flan")
MIXES = {"default": {"dolly": 0.75, "flan": 0.25}, "even": {"dolly": 0.5, "flan": 0.5}}


def curves(ranks=(4, 16), lrs=(1e-3, 1e-2), mbs=(4, 16), seeds=(0, 1), horizons=(100,),
           interval=10) -> pd.DataFrame:  # fmt: skip
    """Synthetic curves: lr 1e-2 and rank 16 and the even mix are best; mb 16 is 2x faster."""
    rows = []
    for r, lr, mb, (mix, w), seed, h in itertools.product(
        ranks, lrs, mbs, MIXES.items(), seeds, horizons
    ):
        floor = 1.0 + 0.3 * (lr == 1e-3) + 0.1 * (r == 4) + 0.05 * (mix == "default")
        step_s = 0.2 if mb == 4 else 0.1
        for s in range(0, h + 1, interval):
            loss = floor + 2.0 * math.exp(-s / 20) + 0.002 * seed
            rows.append({
                "run_id": f"r{r}-{lr}-{mb}-{mix}-{seed}-{h}", "seed": seed, "lora_rank": r,
                "lr": lr, "micro_batch": mb, "mix.dolly": w["dolly"], "mix.flan": w["flan"],
                "mix_default": int(mix == "default"), "horizon_steps": h, "step": s,
                "tokens_seen": s * 1000, "elapsed_s": s * step_s, "val_loss": loss,
            })  # fmt: skip
    return pd.DataFrame(rows)


STUDY = """
[study]
name = "replayed"
[model]
name = "./model"
[data]
max_seq_length = 64
[[data.sources]]
name = "dolly"
path = "dolly.jsonl"
schema = "dolly"
[[data.sources]]
name = "flan"
path = "flan.jsonl"
schema = "flan"
[data.validation]
path = "val.jsonl"
schema = "alpaca"
[train]
global_batch = 16
micro_batch = 4
eval_interval = 10
warmup_steps = 5
lora = { r = 4 }
learning_rate = 1e-3
[search]
lora_rank = { choices = [4, 8, 16] }
lora_alpha = { ratio = 2.0 }
lr = { low = 1e-3, high = 1e-2, log = true }
micro_batch = { choices = [4, 16] }
[search.mix]
dolly = { low = 0.0, high = 1.0 }
flan = { low = 0.0, high = 1.0 }
[budget]
total_s = 60
trial_s = 4
final_share = 0.3
"""


def _study(tmp_path: Path, text: str = STUDY):
    return load_study_text(text, tmp_path, run_dir=tmp_path / "run")


class _Reporter:
    """A reporter that records events and stops the run when told to."""

    def __init__(self, stop_at_step: int | None = None, prune_at_event: int | None = None):
        self.events: list[EvalEvent] = []
        self.phases: list[str] = []
        self.stop_at_step = stop_at_step
        self.prune_at_event = prune_at_event
        self.polls = 0

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def report(self, event: EvalEvent) -> bool:
        self.events.append(event)
        return self.prune_at_event is not None and len(self.events) >= self.prune_at_event

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_at_step is not None and self.polls > self.stop_at_step


# --- the format -------------------------------------------------------------------------------


def _error(tmp_path: Path, df: pd.DataFrame, name: str = "c.csv") -> str:
    path = tmp_path / name
    df.to_parquet(path) if name.endswith(".parquet") else df.to_csv(path, index=False)
    with pytest.raises(UserInputError) as e:
        load_curves(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(f"{tmp_path}/", "")


def test_curves_load_from_csv_and_parquet_alike(tmp_path: Path) -> None:
    df = curves()
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_parquet(tmp_path / "c.parquet")
    a, b = load_curves(tmp_path / "c.csv"), load_curves(tmp_path / "c.parquet")
    # 2 ranks x 2 lrs x 2 micro-batches x 2 mixes, each recorded with 2 seeds.
    assert len(a.configs) == len(b.configs) == 16
    assert len(a.runs) == len(b.runs) == 32
    assert a.default_mix == MIXES["default"]
    run = a.runs["r4-0.001-4-default-0-100"]
    assert run.last_step == 100 and run.horizon_steps == 100
    np.testing.assert_allclose(run.val_loss, b.runs[run.run_id].val_loss)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.drop(columns="val_loss"), "c.csv: missing column val_loss"),
        (lambda d: d.assign(colour="red"), "c.csv: unknown column colour"),
        (lambda d: d.drop(columns=["lora_rank", "lr", "micro_batch", "mix.dolly", "mix.flan"]),
         "c.csv: no parameter column"),
        (lambda d: d.assign(elapsed_s=d.elapsed_s.astype(object).where(d.index != 7, "soon")),
         "c.csv line 9: elapsed_s is not a number ('soon')"),
        (lambda d: d.assign(step=d.step.where(d.index != 4, 20)),
         "c.csv line 6: step does not increase within its run"),
        (lambda d: d.assign(elapsed_s=d.elapsed_s.where(d.index != 3, 0.0)),
         "c.csv line 5: elapsed_s decreases within its run"),
        (lambda d: d.assign(lr=d.lr.where(d.index != 2, 5e-3)),
         "c.csv line 4: lr differs from the first row of its run"),
        (lambda d: d.assign(**{"mix.flan": d["mix.flan"].where(d.index != 5, 0.9)}),
         "c.csv line 7: the mix.* fractions do not sum to 1"),
        (lambda d: d.assign(status=["completed"] * 3 + ["exploded"] + ["completed"] * (len(d) - 4)),
         "c.csv line 5: status is not one of completed, diverged, oom"),
        (lambda d: d.assign(val_loss=d.val_loss.where(d.index != 6, float("nan"))),
         "c.csv line 8: val_loss must be a finite number"),
        (lambda d: d.assign(step=-d.step), "c.csv line 3: step must be a number >= 0"),
    ],
)  # fmt: skip
def test_format_mistakes_are_one_line_naming_file_row_and_column(tmp_path, edit, expected) -> None:
    assert _error(tmp_path, edit(curves())).startswith(expected)


def test_parquet_rows_are_counted_from_one(tmp_path: Path) -> None:
    df = curves()
    df.loc[3, "elapsed_s"] = -1.0
    assert _error(tmp_path, df, "c.parquet").startswith("c.parquet row 4: elapsed_s must be")


def test_a_missing_or_foreign_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no such curves file"):
        load_curves(tmp_path / "nope.csv")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"\.csv or \.parquet"):
        load_curves(tmp_path / "c.json")


# --- the mapping rule -------------------------------------------------------------------------


def test_mapping_snaps_each_parameter_to_its_nearest_recorded_value(tmp_path: Path) -> None:
    rec = validate_curves(curves())
    study = _study(tmp_path)

    def matched(**params):
        cfg = study.run_config(tmp_path / "x", params, max_seconds=5)
        return rec.describe(rec.match(rec.params_of(cfg)))

    exact = matched(lora_rank=16, lr=1e-2, micro_batch=4, weights={"dolly": 1.0, "flan": 1.0})
    assert exact == {"lora_rank": 16, "lr": 1e-2, "micro_batch": 4, "mix.dolly": 0.5,
                     "mix.flan": 0.5}  # fmt: skip
    # Rank 8 is nearer 16 than 4 in log space only if above sqrt(4*16)=8: a tie goes first (4).
    assert matched(lora_rank=8, lr=1e-2, micro_batch=4)["lora_rank"] == 4
    assert matched(lora_rank=9, lr=1e-2, micro_batch=4)["lora_rank"] == 16
    # lr snaps in log space: 3e-3 is just below the geometric midpoint 3.16e-3.
    assert matched(lora_rank=4, lr=3e-3, micro_batch=4)["lr"] == 1e-3
    assert matched(lora_rank=4, lr=3.3e-3, micro_batch=4)["lr"] == 1e-2
    # The mixture goes to the recorded one nearest in total variation.
    assert matched(lora_rank=4, lr=1e-3, weights={"dolly": 0.7, "flan": 0.3})["mix.dolly"] == 0.75
    assert matched(lora_rank=4, lr=1e-3, weights={"dolly": 0.6, "flan": 0.4})["mix.dolly"] == 0.5
    # No weights (the engine's default mixture) matches the runs recorded with mix_default = 1.
    assert matched(lora_rank=4, lr=1e-3)["mix.dolly"] == 0.75


def test_a_short_horizon_replays_the_shortest_recorded_run_that_covers_it(tmp_path) -> None:
    rec = validate_curves(curves(horizons=(30, 100)))
    study = _study(tmp_path)
    params = {"lora_rank": 16, "lr": 1e-2, "micro_batch": 16}
    cid = rec.match(rec.params_of(study.run_config(tmp_path, params, max_steps=1)))
    # 0.1 s a step: 2 s fits in the 30-step run (3 s), 5 s needs the 100-step one.
    assert rec.pick_run(cid, 0, study.run_config(tmp_path, params, max_seconds=2)).last_step == 30
    assert rec.pick_run(cid, 0, study.run_config(tmp_path, params, max_seconds=5)).last_step == 100
    assert rec.pick_run(cid, 0, study.run_config(tmp_path, params, max_steps=500)).last_step == 100


# --- the virtual clock ------------------------------------------------------------------------


def test_a_run_follows_its_recording_on_the_virtual_clock(tmp_path: Path) -> None:
    rec = validate_curves(curves())
    study = _study(tmp_path)
    backend = ReplayBackend(rec, seed=0, setup_s=0.5)
    cfg = study.run_config(tmp_path / "t", {"lora_rank": 16, "lr": 1e-2, "micro_batch": 4},
                           max_seconds=7.0)  # fmt: skip
    rep = _Reporter()
    result = backend.run(cfg, rep)
    # 0.2 s a step: 35 steps fit 7 s; evals at the recorded steps 10, 20, 30 and the final 35.
    assert result.status == "completed" and result.step == 35
    assert [e.step for e in rep.events] == [10, 20, 30, 35]
    assert backend.clock() == pytest.approx(0.5 + 7.0)
    assert rep.phases == ["setup", "train"]
    run = rec.runs[backend.history[-1].run_id]
    # Between checkpoints 30 and 40 the loss is linear in the step.
    assert rep.events[-1].metrics["val_loss"] == pytest.approx(
        (run.val_loss[3] + run.val_loss[4]) / 2
    )
    assert result.tokens_seen == 35_000 and rep.events[-1].elapsed_s == pytest.approx(7.0)


def test_stop_and_prune_end_a_run_early_and_a_resume_continues_it(tmp_path: Path) -> None:
    rec = validate_curves(curves())
    study = _study(tmp_path)
    backend = ReplayBackend(rec, seed=3)
    cfg = study.run_config(tmp_path / "t", {"lora_rank": 4, "micro_batch": 16}, max_steps=60)
    first = backend.run(cfg, _Reporter(stop_at_step=25))
    assert first.status == "stopped" and first.step == 25
    rest = _Reporter()
    second = backend.run(cfg, rest, resume=True)
    # The resumed run continues on the same recorded run, from step 25 to the horizon.
    assert second.step == 60 and [e.step for e in rest.events] == [30, 40, 50, 60]
    assert backend.history[0].run_id == backend.history[1].run_id
    assert backend.clock() == pytest.approx(60 * 0.1)
    pruned = backend.run(cfg, _Reporter(prune_at_event=2), resume=False)
    assert pruned.status == "stopped" and pruned.step == 20


def test_recorded_divergence_and_oom_raise_like_the_engine(tmp_path: Path) -> None:
    df = curves(ranks=(4,), lrs=(1e-3,), mbs=(4,), seeds=(0,))
    df["status"] = np.where(df.run_id.str.contains("even"), "diverged", "completed")
    df = df[~(df.run_id.str.contains("even") & (df.step > 40))].copy()
    df.loc[df.run_id.str.contains("even") & (df.step == 40), "val_loss"] = float("inf")
    oom = df.iloc[[0]].assign(run_id="oom", micro_batch=16, status="oom", elapsed_s=0.3)
    rec = validate_curves(pd.concat([df, oom], ignore_index=True))
    study, backend = _study(tmp_path), ReplayBackend(rec)
    even = {"weights": {"dolly": 1.0, "flan": 1.0}}
    with pytest.raises(Diverged) as d:
        backend.run(study.run_config(tmp_path / "d", even, max_steps=100), _Reporter())
    assert d.value.step == 40
    with pytest.raises(OutOfMemory):
        backend.run(study.run_config(tmp_path / "o", {"micro_batch": 16}, max_steps=9), _Reporter())
    assert backend.clock() == pytest.approx(40 * 0.2 + 0.3)


# --- whole studies ----------------------------------------------------------------------------


def test_a_replayed_study_spends_exactly_its_budget_in_a_few_seconds(tmp_path: Path) -> None:
    rec = validate_curves(curves(horizons=(20, 200)))
    study = _study(tmp_path)
    t = time.perf_counter()
    out = replay_study(study, ReplayBackend(rec, seed=1))
    wall = time.perf_counter() - t
    b = study.budget
    # Everything but the final run's tail (kept for eval/merge/export) and the part of one
    # step that does not fit is spent; never more than the budget.
    assert b.total_s - b.final_tail - 0.2 <= out.spent_s <= b.total_s
    assert out.n_trials >= (b.search_s - b.margin) // b.trial_s
    assert out.n_pruned >= 1 and out.n_complete >= 1
    assert out.final_train_s >= b.final_reserve_s - b.final_tail - 0.2
    # The final configuration is one of the best recorded (rank 16, lr 1e-2) or close to it,
    # and its quality is what the recording says at the final run's step, over both seeds.
    assert out.final_quality < 1.3
    assert wall < 5.0


def test_replayed_studies_are_reproducible_and_seeds_differ(tmp_path: Path) -> None:
    rec = validate_curves(curves())
    study = _study(tmp_path)
    a = replay_study(study, ReplayBackend(rec, seed=0))
    b = replay_study(study, ReplayBackend(rec, seed=0))
    c = replay_study(dataclasses.replace(study, seed=5), ReplayBackend(rec, seed=5))
    assert a.final_params == b.final_params and a.final_quality == b.final_quality
    assert a.final_params != c.final_params


# --- horizons ---------------------------------------------------------------------------------


def test_spearman_is_rank_based() -> None:
    assert spearman([1, 2, 3, 4], [10, 200, 3000, 40000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_horizon_correlation_on_recorded_curves() -> None:
    df = curves(horizons=(30, 100))
    # Scramble the early part of every run so early checkpoints rank runs at random.
    rng = np.random.default_rng(0)
    early = df.step.between(1, 20)
    df.loc[early, "val_loss"] = 3.0 + rng.random(int(early.sum()))
    table = horizon_correlation(df)
    ck = table[table.source == "checkpoint"].set_index("horizon_step")
    assert list(ck.index) == list(range(10, 100, 10)) and (ck.n == 32).all()
    assert abs(ck.loc[10, "spearman"]) < 0.5 and ck.loc[90, "spearman"] > 0.9
    short = table[table.source == "short run"]
    assert list(short.horizon_step) == [30] and short.fraction.iloc[0] == pytest.approx(0.3)
    assert "spearman" in format_correlation(table)


def test_horizon_correlation_on_a_study_needs_enough_complete_trials() -> None:
    study = optuna.create_study()
    for i in range(6):
        t = study.ask()
        t.report(10.0 - i, 1)
        t.report(5.0 - i, 2)
        t.report(float(i % 2), 3)
        study.tell(t, float(-i))
    table = horizon_correlation(study)
    assert list(table.horizon_step) == [1, 2] and (table.spearman == 1.0).all()
    assert horizon_correlation(study, min_pairs=7).empty


# --- the recording grid -----------------------------------------------------------------------


def test_recording_grid_and_mixtures() -> None:
    grid = Grid([4, 8], [1e-3], [4], ["default", "dolly=3/flan=1"], [0, 1], [20, 80])
    points = grid_points(grid)
    assert len(points) == 2 * 2 * 2 * 2
    # Longest horizon first within a configuration and seed; run ids are unique.
    assert [p.horizon for p in points[:2]] == [80, 20]
    assert len({p.run_id for p in points}) == len(points)
    assert mix_weights("default", list(SOURCES)) is None
    assert mix_weights("uniform", list(SOURCES)) == {"dolly": 1.0, "flan": 1.0}
    assert mix_weights("dolly=3/flan=1", list(SOURCES)) == {"dolly": 3.0, "flan": 1.0}
    with pytest.raises(UserInputError, match="'alpaca' is not a source"):
        mix_weights("alpaca=1", list(SOURCES))


@pytest.mark.slow
def test_recording_the_engine_writes_a_curves_file_the_replay_loads(tmp_path: Path) -> None:
    from budgetune.search.record_curves import record
    from budgetune.search.study import load_study

    root = Path(__file__).resolve().parents[2]
    study = load_study(root / "studies" / "quickstart.toml", run_dir=tmp_path / "run")
    grid = Grid([4], [3e-2], [4], ["default"], [0], [6], eval_interval=3)
    lines: list[str] = []
    table = record(study, grid, tmp_path / "c.csv", tmp_path / "work", log=lines.append)
    rec = load_curves(tmp_path / "c.csv")
    run = next(iter(rec.runs.values()))
    # A step-0 row with the base model's loss, then every eval of the engine.
    assert list(run.steps) == [0, 3, 6] and run.status == "completed"
    assert run.val_loss[-1] < run.val_loss[0]
    assert np.all(np.diff(run.elapsed) > 0)
    # The engine's default mixture is written out, and marked as the default one.
    mix = table.filter(like="mix.").iloc[0]
    assert mix.sum() == pytest.approx(1.0) and rec.default_mix is not None
    assert len(lines) == 1
    # A second call finds the run recorded and only reassembles the file.
    record(study, grid, tmp_path / "c.csv", tmp_path / "work", log=lines.append)
    assert len(lines) == 1


def test_recorded_times_are_smoothed_over_runs_doing_the_same_work() -> None:
    from budgetune.search.record_curves import smooth_time

    df = curves(ranks=(4,), mbs=(4,))
    # Seed 1 ran on a busy machine: 1.5x slower in CPU time for the same work.
    df.loc[df.seed == 1, "elapsed_s"] *= 1.5
    out = smooth_time(df)
    rec = validate_curves(out)
    ends = {r.run_id: r.elapsed_at(r.last_step) for r in rec.runs.values()}
    # Both learning rates and both seeds do the same work: one median time per mixture.
    assert len(set(ends.values())) == 1
    assert next(iter(ends.values())) == pytest.approx(100 * 0.2 * 1.25)
    assert (out.val_loss == df.val_loss).all()
