"""The workers of a study: who runs it, where, on what device, doing what, alive or dead.

Several budgetune processes (one per GPU, on one or many machines) may run one study through
one shared storage. Each registers a row in `budgetune_workers` (same database as Optuna's
tables and the ledger) and keeps it fresh from a background thread: a heartbeat every
`heartbeat_s` seconds, plus what it is doing (`starting`, `trial` N, `waiting`, `final`).

A worker is judged dead (`WorkerInfo.alive` is False) when any of these holds:
- it stopped cleanly (`stopped`: Ctrl-C, the study ended) or another worker marked it `dead`;
- it ran on this very machine and its process is gone (same boot id and PID namespace: the
  PID is checked with psutil, so a SIGKILL is seen at once, without waiting for the grace);
- its last heartbeat is older than `grace_s(heartbeat_s)` = 3 beats + 5 s. Heartbeats are
  stamped with the DATABASE's clock and compared with it, so machines whose clocks disagree
  still judge each other right;
- it is not registered at all (a reservation or claim left by a process of an older version).

A worker that is judged dead while it is in fact alive (a network partition longer than the
grace) finds its row marked `dead` at its next heartbeat: it is `evicted`, its callback asks
the driver to stop, and it never tells the trial another worker has already taken over.

SQLite is fine for one worker; several workers on one SQLite file queue on its whole-file
write lock (and a SQLite file on a network filesystem can be corrupted): `sharing_warning()`
says so as soon as a second live worker shows up.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from budgetune.search.ledger import create_tables, make_engine

HEARTBEAT_S = 30.0
"""Default seconds between two heartbeats of a worker."""
GRACE_BEATS = 3
GRACE_SLACK_S = 5.0
ACTIVITIES = ("starting", "trial", "waiting", "final", "stopped", "dead")

_meta = sa.MetaData()
WORKERS = sa.Table(
    "budgetune_workers",
    _meta,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("worker_id", sa.String(512), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("host_key", sa.String(255), nullable=False),
    sa.Column("process_start", sa.Float, nullable=False),
    sa.Column("device", sa.String(255), nullable=False),
    sa.Column("heartbeat_s", sa.Float, nullable=False),
    sa.Column("activity", sa.String(32), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)


def grace_s(heartbeat_s: float) -> float:
    """Seconds without a heartbeat after which a worker is dead."""
    return GRACE_BEATS * heartbeat_s + GRACE_SLACK_S


def db_now_sql(dialect: str) -> sa.ColumnElement[Any]:
    """The database server's clock as Unix seconds (one clock for every machine)."""
    if dialect == "sqlite":
        return (sa.func.julianday("now") - 2440587.5) * 86400.0
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Float)
    if dialect in ("mysql", "mariadb"):
        return sa.func.unix_timestamp(sa.func.now(6))
    return sa.literal(time.time())


def host_key() -> str:
    """Boot id + PID namespace: equal only for processes whose PIDs this process can check.

    Empty where /proc is missing: then only heartbeats tell (never a wrong local PID check).
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{pidns}"


def describe_device() -> str:
    """The GPU this process trains on ("cpu" without CUDA), as `status` shows it.

    torch is only asked when the backend already imported it (the fake backend never does).
    """
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            name = str(torch.cuda.get_device_name(torch.cuda.current_device()))
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return f"{name} (CUDA_VISIBLE_DEVICES={visible})" if visible else name
    except Exception:  # a broken driver shows as cpu; the run itself reports the real error
        pass
    return "cpu"


def _process_gone(pid: int, started: float) -> bool:
    """A process on this machine is gone: no such PID, a reused PID, or a zombie."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) > 1.0:
            return True
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # no permission to look: leave it to the heartbeat
        return False


@dataclass
class WorkerInfo:
    """One worker of a study as seen at one instant."""

    worker_id: str
    host: str
    pid: int
    device: str
    activity: str
    trial_number: int | None
    started_at: float
    heartbeat_at: float
    heartbeat_s: float
    age_s: float
    """Seconds since its last heartbeat, by the database clock."""
    alive: bool
    why_dead: str = ""


class WorkerRegistry:
    """This worker's row in `budgetune_workers`, and everyone's liveness (module docstring).

    Use: `register()`, then `with registry.beating(): ...` around the work, `set_activity(...)`
    as it changes, `stop()` at the end. Readers (status, reports) only call `workers()`.
    """

    def __init__(
        self,
        url: str,
        study_name: str,
        worker_id: str,
        heartbeat_s: float = HEARTBEAT_S,
        on_evicted: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.study_name = study_name
        self.worker_id = worker_id
        self.heartbeat_s = float(heartbeat_s)
        self.on_evicted = on_evicted
        self.evicted = False
        self._engine = make_engine(url)
        # reads take no lock: liveness is judged inside ledger transactions, and on SQLite a
        # second BEGIN IMMEDIATE there would wait on that transaction's own write lock
        self._reader = (
            sa.create_engine(url, connect_args={"timeout": 60}) if self.is_sqlite else self._engine
        )
        self._key = host_key()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        create_tables(_meta, self._engine)

    @property
    def is_sqlite(self) -> bool:
        return self._engine.dialect.name == "sqlite"

    def _now(self) -> sa.ColumnElement[Any]:
        return db_now_sql(self._engine.dialect.name)

    def _mine(self) -> Any:
        return (WORKERS.c.study_name == self.study_name) & (WORKERS.c.worker_id == self.worker_id)

    # --- this worker ----------------------------------------------------------------------

    def register(self, device: str | None = None) -> None:
        """Insert this worker's row (alive from now on); a second call starts it afresh."""
        me = psutil.Process()
        self.evicted = False
        with self._engine.begin() as conn:
            now = conn.execute(sa.select(self._now())).scalar_one()
            conn.execute(WORKERS.delete().where(self._mine()))
            conn.execute(
                WORKERS.insert().values(
                    study_name=self.study_name,
                    worker_id=self.worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    host_key=self._key,
                    process_start=me.create_time(),
                    device=device or describe_device(),
                    heartbeat_s=self.heartbeat_s,
                    activity="starting",
                    trial_number=None,
                    started_at=float(now),
                    heartbeat_at=float(now),
                )
            )

    def _touch(self, **values: Any) -> None:
        """Refresh the heartbeat (and any `values`); notice if another worker evicted us."""
        if self.evicted:
            return
        with self._engine.begin() as conn:
            n = conn.execute(
                WORKERS.update()
                .where(self._mine(), WORKERS.c.activity != "dead")
                .values(heartbeat_at=self._now(), **values)
            ).rowcount
        if n == 0:
            self.evicted = True
            if self.on_evicted is not None:
                self.on_evicted()

    def beat(self) -> None:
        """One heartbeat now (the background thread calls this every `heartbeat_s`)."""
        self._touch()

    def set_activity(self, activity: str, trial_number: int | None = None) -> None:
        if activity not in ACTIVITIES:
            raise ValueError(f"unknown worker activity {activity!r}")
        self._touch(activity=activity, trial_number=trial_number)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception:  # a database hiccup: the next beat retries
                pass

    def beating(self) -> _Beating:
        """Context manager: heartbeats from a daemon thread while the block runs."""
        return _Beating(self)

    def stop(self) -> None:
        """Mark this worker stopped (dead to the others at once) and stop beating."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.evicted:
            try:
                self.set_activity("stopped", None)
            except Exception:  # the database is gone: the heartbeat grace will tell
                pass

    def close(self) -> None:
        self._engine.dispose()
        self._reader.dispose()

    # --- everyone -------------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """Every worker that ever joined the study, oldest first, with its liveness."""
        with self._reader.connect() as conn:
            return _read(conn, self.study_name, self._key)

    def liveness(self) -> dict[str, bool]:
        """worker id -> alive, for every registered worker (this one always alive)."""
        alive = {w.worker_id: w.alive for w in self.workers()}
        alive[self.worker_id] = True
        return alive

    def is_dead(self, worker_id: str) -> bool:
        """Dead, or unknown to the registry; never this worker."""
        if worker_id == self.worker_id:
            return False
        return not self.liveness().get(worker_id, False)

    def mark_dead(self, worker_id: str) -> None:
        """Record that `worker_id` was judged dead and its work taken over (evicts it)."""
        with self._engine.begin() as conn:
            conn.execute(
                WORKERS.update()
                .where(
                    WORKERS.c.study_name == self.study_name,
                    WORKERS.c.worker_id == worker_id,
                    WORKERS.c.activity != "stopped",
                )
                .values(activity="dead")
            )

    def sharing_warning(self, infos: list[WorkerInfo] | None = None) -> str | None:
        """A warning when several live workers share a SQLite storage, else None."""
        if not self.is_sqlite:
            return None
        live = [w for w in (self.workers() if infos is None else infos) if w.alive]
        if len(live) < 2:
            return None
        hosts = ", ".join(sorted({f"{w.host} pid {w.pid}" for w in live}))
        return (
            f"warning: {len(live)} workers ({hosts}) share the SQLite storage {self.url}: "
            "SQLite locks the whole file on every write, so the workers wait on each other's "
            "commits (and a SQLite file on a network filesystem can be corrupted); for "
            "several workers launch the study with --storage postgresql://... and join it "
            "with `budgetune resume --storage postgresql://... --study NAME`"
        )


def _read(conn: sa.Connection, study_name: str, key: str) -> list[WorkerInfo]:
    now = float(conn.execute(sa.select(db_now_sql(conn.dialect.name))).scalar_one())
    rows = conn.execute(
        sa.select(WORKERS).where(WORKERS.c.study_name == study_name).order_by(WORKERS.c.started_at)
    ).all()
    out = []
    for r in rows:
        age = max(0.0, now - r.heartbeat_at)
        why = ""
        if r.activity in ("stopped", "dead"):
            why = r.activity
        elif key and r.host_key == key and _process_gone(r.pid, r.process_start):
            why = "process gone"
        elif age > grace_s(r.heartbeat_s):
            why = f"no heartbeat for {age:.0f} s"
        out.append(
            WorkerInfo(r.worker_id, r.host, r.pid, r.device, r.activity, r.trial_number,
                       r.started_at, r.heartbeat_at, r.heartbeat_s, age, not why, why)
        )  # fmt: skip
    return out


def list_workers(url: str, study_name: str) -> list[WorkerInfo]:
    """The workers of a study, read without taking any lock (status, reports); [] if none.

    A plain engine: the registry's own opens SQLite transactions with BEGIN IMMEDIATE, and a
    reader must never take the write lock from running workers.
    """
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(WORKERS.name):
                return []
            return _read(conn, study_name, host_key())
    finally:
        engine.dispose()


def describe_worker(w: WorkerInfo) -> str:
    """One line of `budgetune status`: host, pid, device, what it does, heartbeat, alive."""
    doing = {"trial": f"trial {w.trial_number}", "final": "final run"}.get(w.activity, w.activity)
    state = "alive" if w.alive else f"dead ({w.why_dead})"
    return f"{w.host} pid {w.pid}  {w.device}  {doing}  beat {w.age_s:.0f} s ago  {state}"


class _Beating:
    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    def __enter__(self) -> WorkerRegistry:
        r = self.registry
        r._stop.clear()
        r._thread = threading.Thread(target=r._beat_loop, name="budgetune-heartbeat", daemon=True)
        r._thread.start()
        return r

    def __exit__(self, *exc: object) -> None:
        r = self.registry
        r._stop.set()
        if r._thread is not None:
            r._thread.join(timeout=10)
            r._thread = None
