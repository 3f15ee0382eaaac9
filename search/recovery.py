"""Taking over what dead workers left: their budget reservations and their RUNNING trials.

`recover(driver)` runs before every trial and while a worker waits for the final run. It
reads who is alive (`workers.py`), releases the open reservations of dead workers (their
charges stay: that time was spent), and turns every RUNNING trial whose worker is dead into
a continuation:

- A trial's worker is its `worker_id` attribute, else the worker that reserved its budget
  (the few milliseconds between `ask` and setting the attribute). A trial with neither is
  stale at once when no other worker lives, else after `ORPHAN_S`.
- Exactly one live worker takes a stale trial over: it claims `continue:<n>` in the ledger
  (a dead claimant's claim is taken over) and marks the dead worker `dead` (were it only cut
  off from the database, it stops at its next heartbeat and tells the trial nothing).
- Optuna cannot reopen a finished-or-dead trial, so a new trial is enqueued with the SAME
  parameters and user attrs `continues=<old>`, `trial_dir=<old dir>` (the engine resumes
  from the old checkpoint), `horizon_s` (the same run config, so the same LR schedule) and
  the budget the old one had left; then the old one gets its ledger costs, `continued_by`
  and `outcome=continued`, and is closed as FAIL. That order survives a crash in between:
  whoever redoes it finds the continuation (in any state: a worker may already run it) and
  does not enqueue a second one. Costs are counted once: each trial's cost attributes are
  its own ledger rows, never its predecessor's.
- Once the final run is claimed no trial may start, so a stale trial is closed as `failed`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

if TYPE_CHECKING:
    from budgetune.search.driver import Driver

ORPHAN_S = 600.0
"""A RUNNING trial with no known worker is stale after this long while other workers live."""


def recover(d: Driver) -> None:
    """Release dead workers' reservations; continue their RUNNING trials (module docstring)."""
    infos = d.workers.workers()
    warning = d.workers.sharing_warning(infos)
    if warning:
        d.say_once(warning)
    alive = {w.worker_id: w.alive for w in infos}
    alive[d.worker_id] = True

    def dead(worker: str) -> bool:
        return not alive.get(worker, False)

    d.ledger.release_stale(dead)
    running = d.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    owners = d.ledger.reservation_owners()
    others_alive = sum(alive.values()) > 1
    final_claimed = d.ledger.final_claim() is not None
    for t in running:
        owner = t.user_attrs.get("worker_id") or owners.get(t.number)
        if owner == d.worker_id:
            continue
        if owner is None:
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if others_alive and time.time() - started < ORPHAN_S:
                continue
        elif not dead(owner):
            continue
        if not d.ledger.claim(f"continue:{t.number}", dead):
            continue  # another live worker is taking it over
        if owner is not None:
            d.workers.mark_dead(owner)
        take_over(d, t, final_claimed)


def take_over(d: Driver, t: optuna.trial.FrozenTrial, final_claimed: bool) -> None:
    """Close the stale trial `t` (continued by a new trial unless the final run is claimed)."""
    attrs: dict[str, Any] = d._cost_attrs(d.ledger.trial_costs().get(t.number, {}))
    if final_claimed:
        attrs.update({"outcome": "failed", "reason": "its worker stopped"})
    else:
        attrs.update(
            {
                "outcome": "continued",
                "reason": "its worker stopped; continued by a new trial",
                "continued_by": continuation(d, t),
            }
        )
    for k, v in attrs.items():
        d.storage.set_trial_user_attr(t._trial_id, k, v)
    d.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    d.progress.log(f"trial {t.number}: left running by a stopped worker, continued")


def continuation(d: Driver, t: optuna.trial.FrozenTrial) -> int:
    """The number of the trial that continues `t` (enqueued, WAITING, if not there yet)."""

    def find() -> int | None:  # in any state: another worker may already run it
        for w in d.ostudy.get_trials(deepcopy=False):
            if w.user_attrs.get("continues") == t.number:
                return w.number
        return None

    number = find()
    if number is None:
        a = t.user_attrs
        d.ostudy.enqueue_trial(
            t.params,
            user_attrs={
                "continues": t.number,
                "trial_dir": a.get("trial_dir"),
                "horizon_s": a.get("horizon_s"),
                "prior_reserved_s": a.get("reserved_s", 0.0),
                "prior_cost_s": sum(d.ledger.trial_costs().get(t.number, {}).values()),
            },
        )
        number = find()
    assert number is not None
    return number
