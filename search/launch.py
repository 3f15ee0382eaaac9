"""`budgetune launch` and `budgetune resume`: build the pieces, run the driver, print a summary.

Ctrl-C once: the trial (or final run) in flight checkpoints, the ledger is written, the
command exits 130 ("interrupted") and `budgetune resume` continues where it stopped. Ctrl-C
twice: stop at once (the next resume still continues from the last checkpoint).

Several workers: `launch` once with a `postgresql://` storage, then on every other GPU
`resume --storage URL --study NAME` joins the same study (see `workers.py`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import optuna

from budgetune.engine.errors import UserInputError
from budgetune.search.backends import EngineBackend, FakeBackend, TrialBackend
from budgetune.search.driver import Driver
from budgetune.search.ledger import Ledger
from budgetune.search.progress import Progress, make_progress
from budgetune.search.status import collect, format_status
from budgetune.search.storage import create_or_load, load_from_storage, open_storage
from budgetune.search.study import Study, load_study
from budgetune.search.workers import HEARTBEAT_S


def make_backend(study: Study) -> TrialBackend:
    """The study's backend: the engine (one base model per process) or the fake one."""
    if study.backend == "fake":
        return FakeBackend(study.fake, eval_s=study.budget.trial_eval_s)
    objective: Any = None
    if study.eval is not None:
        from budgetune.search.evaluation import Evaluator

        objective = Evaluator(study.eval, study.run_dir / "eval")
        # An unknown task name fails here, at launch, not after the first trial has trained.
        objective.check_tasks()
    return EngineBackend(study.model.name, study.model.precision, study.model.quantize, objective)


def run_study(
    study: Study,
    ostudy: optuna.Study,
    backend: TrialBackend | None = None,
    progress: Progress | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> str:
    """Run the driver with Ctrl-C handling; returns the end-of-run summary text."""
    driver = Driver(
        study, ostudy, backend or make_backend(study), progress=progress or make_progress(),
        heartbeat_s=heartbeat_s,
    )  # fmt: skip

    def _on_sigint(signum: int, frame: Any) -> None:
        print(
            "\nbudgetune: stopping: the running trial checkpoints (Ctrl-C again to abort)",
            file=sys.stderr,
        )
        driver.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        driver.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    report = collect(study, ostudy, driver.ledger)
    driver.ledger.close()
    return format_status(report, summary=True)


def _run_and_print(study: Study, ostudy: optuna.Study, heartbeat_s: float) -> None:
    """Run, print the summary; Ctrl-C exits 130 here (typer would turn it into a return code)."""
    try:
        summary = run_study(study, ostudy, heartbeat_s=heartbeat_s)
    except KeyboardInterrupt:
        where = (
            str(study.run_dir)
            if study.storage.startswith("sqlite")
            else f"--storage {study.storage} --study {study.name}"
        )
        print(f"budgetune: interrupted; continue with `budgetune resume {where}`", file=sys.stderr)
        raise SystemExit(130) from None
    print(summary)
    # The report is part of the answer: write it next to the run and print its path (a
    # report that fails says so in one line and never fails the study).
    from budgetune.search.report import write_run_report

    write_run_report(study.storage, study.name, study.run_dir)


def launch(
    path: Path,
    run_dir: Path | None = None,
    storage: str | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> None:
    """`budgetune launch study.toml`: start a study (or continue it, if this file started it)."""
    study = load_study(path, run_dir=run_dir, storage=storage)
    study.run_dir.mkdir(parents=True, exist_ok=True)
    ostudy = create_or_load(study, open_storage(study.storage))
    _run_and_print(study, ostudy, heartbeat_s)


def resume(
    target: str | None,
    name: str | None = None,
    storage: str | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> None:
    """`budgetune resume <run dir | storage URL>` or `resume --storage URL --study NAME`:
    continue a study from its storage alone, or join it as one more worker."""
    if (target is None) == (storage is None):
        raise UserInputError("resume: give a run directory or storage URL, or --storage URL")
    study, ostudy = load_from_storage(target or str(storage), name)
    try:
        study.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(
            f"run directory {study.run_dir}: cannot create it ({e.strerror}); every worker "
            "needs the launcher's run directory at the same path (a shared filesystem)"
        ) from None
    _run_and_print(study, ostudy, heartbeat_s)


def ledger_for(study: Study) -> Ledger:
    """A read-mostly view of a study's ledger (reports, status, tests)."""
    return Ledger(study.storage, study.name, "reader")
