"""The budget ledger: reservations, charges, the exactly-once final claim, and its invariant."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetune.engine.errors import UserInputError
from budgetune.search.ledger import Ledger, Meter


def _ledger(tmp_path: Path, worker: str = "w1", total: float = 100.0) -> Ledger:
    led = Ledger(f"sqlite:///{tmp_path / 'study.db'}", "s", worker)
    led.create(total_s=total, final_reserve_s=30.0, margin_s=2.0)
    return led


def test_reservations_hold_the_search_share_and_charges_consume_them(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    # search share = 100 - 30 reserve - 2 margin = 68
    a = led.reserve_trial(30.0, 10.0)
    b = led.reserve_trial(30.0, 10.0)
    assert a and b and (a.seconds, b.seconds) == (30.0, 30.0)
    # only 8 s left: less than the minimum useful trial, so no trial starts
    assert led.reserve_trial(30.0, 10.0) is None
    led.attach(a, 0)
    led.charge("setup", 1.0, 0, a)
    led.charge("train", 11.0, 0, a)
    led.release(a)
    t = led.totals()
    assert t.spent_s == 12.0 and t.held_s == 30.0 and t.by_category == {"setup": 1.0, "train": 11.0}
    # what trial 0 did not use flows back: 68 - 12 spent - 30 held
    assert t.search_left_s == pytest.approx(26.0)
    c = led.reserve_trial(30.0, 10.0)
    assert c is not None and c.seconds == pytest.approx(26.0)
    assert led.trial_costs() == {0: {"setup": 1.0, "train": 11.0}}


def test_final_claim_is_exactly_once_and_waits_for_open_trials(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    r = led.reserve_trial(20.0, 5.0)
    led.charge("train", 15.0, 0, r)
    assert led.claim_final({"trial": 0}, is_stale=lambda w: False) is None
    led.release(r)
    led.charge("overhead", 1.0)
    claim = led.claim_final({"trial": 0}, is_stale=lambda w: False)
    # unused search budget flows to the final run: 100 - 16 spent
    assert claim is not None and claim.allotment_s == 84.0 and claim.state == "claimed"
    assert led.reserve_trial(10.0, 1.0) is None
    other = Ledger(led.url, "s", "w2")
    # a live claimant keeps its claim; a dead one's claim is taken over with the same allotment
    assert other.claim_final({"trial": 9}, is_stale=lambda w: False) is None
    again = other.claim_final({"trial": 9}, is_stale=lambda w: True)
    assert again is not None and (again.allotment_s, again.config, again.worker_id) == (
        84.0,
        {"trial": 0},
        "w2",
    )
    other.finish_final()
    assert led.final_claim().state == "done"


def test_a_different_budget_for_the_same_study_is_refused(tmp_path: Path) -> None:
    _ledger(tmp_path)
    with pytest.raises(UserInputError, match="different budget"):
        _ledger(tmp_path, total=200.0)


def test_racing_workers_never_share_the_last_slice(tmp_path: Path) -> None:
    _ledger(tmp_path)
    got: list[float] = []
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        led = Ledger(f"sqlite:///{tmp_path / 'study.db'}", "s", f"w{i}")
        barrier.wait()
        for _ in range(3):
            r = led.reserve_trial(20.0, 20.0)
            if r is not None:
                got.append(r.seconds)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 68 s of search share hold exactly three 20 s trials, whoever asks
    assert got == [20.0, 20.0, 20.0]


def test_stale_reservations_are_released_but_their_charges_stay(tmp_path: Path) -> None:
    dead = _ledger(tmp_path, worker="dead")
    r = dead.reserve_trial(30.0, 5.0)
    dead.charge("train", 7.0, 3, r)
    alive = Ledger(dead.url, "s", "alive")
    assert alive.release_stale(lambda w: w == "dead") == 1
    t = alive.totals()
    assert (t.spent_s, t.held_s, alive.open_reservations()) == (7.0, 0.0, 0)


def test_meter_partitions_the_clock(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    now = [0.0]
    meter = Meter(led, lambda: now[0])
    now[0] = 2.5
    assert meter.charge("overhead") == 2.5
    now[0] = 3.0
    meter.skip()  # idle time is not spent
    now[0] = 4.0
    assert meter.pending() == 1.0
    meter.charge("train", 0)
    assert led.totals().by_category == {"overhead": 2.5, "train": 1.0}


@settings(max_examples=12, deadline=None)
@given(
    total=st.floats(50, 5000),
    share=st.floats(0.1, 0.6),
    trial=st.floats(0.02, 0.4),
    seed=st.integers(0, 10_000),
)
def test_invariant_under_random_trials(tmp_path_factory, total, share, trial, seed) -> None:
    """Trials that overrun by at most the margin between them never eat the final reserve."""
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("led")
    margin = 0.02 * total
    led = Ledger(f"sqlite:///{tmp / 'study.db'}", "s", "w")
    led.create(total, total * share, margin)
    trial_s, n = trial * total, 0
    while (r := led.reserve_trial(trial_s, trial_s / 4)) is not None:
        # a trial uses part of its reservation, or all of it plus an overrun; overruns and
        # overhead over the whole search stay within the margin
        used = r.seconds * rng.uniform(0.1, 1.0)
        led.charge("train", used, n, r)
        led.release(r)
        n += 1
    over = margin * rng.uniform(0, 1)
    led.charge("overhead", over)
    claim = led.claim_final({}, is_stale=lambda w: False)
    assert claim is not None and claim.allotment_s >= total * share - 1e-6
    led.charge("final", claim.allotment_s)
    assert led.totals().spent_s <= total + 1e-6
