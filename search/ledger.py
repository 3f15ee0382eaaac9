"""The budget ledger: every GPU-second a worker spends, attributed and persisted.

Where it lives: its own SQL tables in the study's storage database (the same SQLAlchemy URL
as Optuna's RDBStorage), so it survives crashes, is shared by every worker of a study, and is
readable by reports: `budgetune_budget` (one row per study: total, final reserve, margin;
the row every transaction locks), `budgetune_ledger` (append-only spend rows: study, worker,
category, trial number, seconds, created_at as Unix time), `budgetune_reservations` (a
trial's allowance, held while it runs) and `budgetune_claims` (exactly-once jobs: the final
run, and `continue:<n>`, the takeover of a dead worker's trial n).

Rules (B = total, R = final reserve = B * final_share, S = B - R the search share, M = margin):

1. Spend is wall time a worker holds the GPU, measured by that worker's `Meter`, which
   partitions its own clock into consecutive slices, each charged to exactly one category:
   `train`, `eval`, `setup` (a trial's; these three form the `trial` group and carry its
   number), `final` (the final run's training, eval, merge and export) or `overhead`
   (model load, sampling, storage writes between trials). Time while no worker runs (a
   crash, a weekend) is never measured, so never spent; a worker charges at every eval event,
   so a SIGKILL loses at most one eval interval of accounting (the redone work is charged
   again when it is redone: it was spent twice).
2. Every charge and every reservation is one transaction that first locks the study's budget
   row (`SELECT ... FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite), so two workers
   never both take the last slice of the search budget.
3. A trial starts only with a reservation: a = min(wanted allowance, S - M - spent - held),
   where `held` is the unspent part of every open reservation (its seconds minus what its
   trial has charged). If a < the minimum useful trial, no trial starts: the search is over.
   A trial's charges consume its reservation; the driver stops the trial when they reach it
   (so it overruns by at most one optimizer step plus a checkpoint write), and releases the
   unused rest when the trial ends. The driver charges a trial's asking, sampling and
   bookkeeping (`overhead`, no trial number) to its reservation too, so workers that hold
   the whole search share between them spend nothing unreserved. The margin M absorbs the
   overruns and the rest of the overhead (a worker's start, model load included), which is
   what keeps the final run's reserve whole: give it room for each worker's start.
4. The final run is claimed once per study (a `budgetune_claims` row, inserted in a
   transaction) and only when no reservation is open (every search trial has ended). Its
   allotment is fixed at claim time: B - spent, which is >= R as long as overruns stayed
   within M (unused search budget flows to the final run). A resumed final run keeps the
   claim's stored allotment and config; it is stopped when the ledger's total reaches
   B - its tail (eval, merge, export), so the total never exceeds B.
5. Resume: open reservations of a dead worker are released (their charges stay: that time
   was spent); a claim held by a dead worker is taken over, not repeated.

Invariant (tested): total spent <= B, and the final run's allotment >= R.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from budgetune.engine.errors import UserInputError

CATEGORIES = ("train", "eval", "setup", "final", "overhead")
TRIAL_CATEGORIES = ("train", "eval", "setup")

_meta = sa.MetaData()
BUDGET = sa.Table(
    "budgetune_budget",
    _meta,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("total_s", sa.Float, nullable=False),
    sa.Column("final_reserve_s", sa.Float, nullable=False),
    sa.Column("margin_s", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
LEDGER = sa.Table(
    "budgetune_ledger",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False, index=True),
    sa.Column("worker_id", sa.String(512), nullable=False),
    sa.Column("category", sa.String(32), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
RESERVATIONS = sa.Table(
    "budgetune_reservations",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False, index=True),
    sa.Column("worker_id", sa.String(512), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("charged_s", sa.Float, nullable=False, default=0.0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("released_at", sa.Float, nullable=True),
)
CLAIMS = sa.Table(
    "budgetune_claims",
    _meta,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("what", sa.String(32), primary_key=True),
    sa.Column("worker_id", sa.String(512), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("allotment_s", sa.Float, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


@dataclass
class Entry:
    """One spend row."""

    worker_id: str
    category: str
    trial_number: int | None
    seconds: float
    created_at: float


@dataclass
class Reservation:
    id: int
    seconds: float


@dataclass
class FinalClaim:
    """The exactly-once final run: who holds it, its fixed allotment and config, its state."""

    worker_id: str
    state: str
    """`claimed` (running or stopped: resume it) or `done`."""
    allotment_s: float
    config: dict[str, Any]


@dataclass
class Totals:
    """The ledger at one instant."""

    total_s: float
    final_reserve_s: float
    margin_s: float
    spent_s: float
    held_s: float
    """Unspent seconds of open reservations."""
    by_category: dict[str, float] = field(default_factory=dict)
    final: FinalClaim | None = None

    @property
    def remaining_s(self) -> float:
        return self.total_s - self.spent_s

    @property
    def search_left_s(self) -> float:
        """What new trials may still reserve (0 once the final run is claimed)."""
        if self.final is not None:
            return 0.0
        left = self.total_s - self.final_reserve_s - self.margin_s - self.spent_s - self.held_s
        return max(0.0, left)

    @property
    def trials_s(self) -> float:
        return sum(self.by_category.get(c, 0.0) for c in TRIAL_CATEGORIES)


def tune_sqlite(engine: sa.Engine) -> None:
    """WAL journal + synchronous=NORMAL on every connection of a SQLite engine.

    Why: with the default rollback journal every commit fsyncs (~10 ms here), and a study
    commits at every eval of every trial. In WAL mode a commit survives a crash or SIGKILL of
    the process (only a power loss can drop the last commits; the file stays consistent).
    """

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    engine.dispose()  # connections opened before the listener get the pragmas when reopened


def make_engine(url: str) -> sa.Engine:
    """An engine whose transactions lock: SQLite starts every one with BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60})
        tune_sqlite(engine)

        @event.listens_for(engine, "connect")
        def _no_pysqlite_txn(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def create_tables(metadata: sa.MetaData, engine: sa.Engine) -> None:
    """Create missing tables, safe when several workers start at once on one database.

    Why: `create_all` checks, then creates; two processes doing it together both create, and
    one fails. On PostgreSQL a transaction-scoped advisory lock serializes them; SQLite's
    `BEGIN IMMEDIATE` (see `make_engine`) already does.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(0x62756467)))  # "budg"
        metadata.create_all(conn)


class Ledger:
    """The budget ledger of one study, as seen by one worker (see the module docstring)."""

    def __init__(self, url: str, study_name: str, worker_id: str) -> None:
        self.url = url
        self.study_name = study_name
        self.worker_id = worker_id
        self._engine = make_engine(url)
        self._sqlite = url.startswith("sqlite")
        create_tables(_meta, self._engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _txn(self) -> Iterator[sa.Connection]:
        with self._engine.begin() as conn:
            if not self._sqlite:
                conn.execute(
                    sa.select(BUDGET.c.study_name)
                    .where(BUDGET.c.study_name == self.study_name)
                    .with_for_update()
                )
            yield conn

    def create(self, total_s: float, final_reserve_s: float, margin_s: float) -> None:
        """Record the study's budget once; later calls must agree with it."""
        try:
            self._create(total_s, final_reserve_s, margin_s)
        except sa.exc.IntegrityError:
            # workers starting together: the row did not exist to lock (PostgreSQL), and
            # another worker inserted it first; now it exists, so check that it agrees
            self._create(total_s, final_reserve_s, margin_s)

    def _create(self, total_s: float, final_reserve_s: float, margin_s: float) -> None:
        with self._txn() as conn:
            row = conn.execute(
                sa.select(BUDGET).where(BUDGET.c.study_name == self.study_name)
            ).first()
            if row is None:
                conn.execute(
                    BUDGET.insert().values(
                        study_name=self.study_name,
                        total_s=total_s,
                        final_reserve_s=final_reserve_s,
                        margin_s=margin_s,
                        created_at=time.time(),
                    )
                )
            elif (row.total_s, row.final_reserve_s, row.margin_s) != (
                total_s,
                final_reserve_s,
                margin_s,
            ):
                raise UserInputError(
                    f"study {self.study_name!r}: its ledger has a different budget "
                    f"(total_s={row.total_s:g}); resume it with `budgetune resume`"
                )

    def _totals(self, conn: sa.Connection) -> Totals:
        b = conn.execute(sa.select(BUDGET).where(BUDGET.c.study_name == self.study_name)).first()
        if b is None:
            raise UserInputError(f"study {self.study_name!r} has no budget ledger")
        rows = conn.execute(
            sa.select(LEDGER.c.category, sa.func.sum(LEDGER.c.seconds))
            .where(LEDGER.c.study_name == self.study_name)
            .group_by(LEDGER.c.category)
        ).all()
        by_cat = {c: float(s or 0.0) for c, s in rows}
        open_rows = conn.execute(
            sa.select(RESERVATIONS.c.seconds, RESERVATIONS.c.charged_s).where(
                RESERVATIONS.c.study_name == self.study_name,
                RESERVATIONS.c.released_at.is_(None),
            )
        ).all()
        held = sum(max(0.0, s - c) for s, c in open_rows)
        return Totals(
            total_s=b.total_s,
            final_reserve_s=b.final_reserve_s,
            margin_s=b.margin_s,
            spent_s=sum(by_cat.values()),
            held_s=held,
            by_category=by_cat,
            final=self._claim(conn),
        )

    def totals(self) -> Totals:
        with self._engine.connect() as conn:
            return self._totals(conn)

    def reserve_trial(self, want_s: float, min_s: float) -> Reservation | None:
        """Hold min(want_s, what the search share has left) for a trial, or None if < min_s."""
        with self._txn() as conn:
            seconds = min(want_s, self._totals(conn).search_left_s)
            if seconds < min_s or seconds <= 0:
                return None
            rid = conn.execute(
                RESERVATIONS.insert().values(
                    study_name=self.study_name,
                    worker_id=self.worker_id,
                    seconds=seconds,
                    charged_s=0.0,
                    created_at=time.time(),
                )
            ).inserted_primary_key[0]
        return Reservation(int(rid), seconds)

    def attach(self, reservation: Reservation, trial_number: int) -> None:
        """Name the trial a reservation was made for (it is asked for after reserving)."""
        with self._txn() as conn:
            conn.execute(
                RESERVATIONS.update()
                .where(RESERVATIONS.c.id == reservation.id)
                .values(trial_number=trial_number)
            )

    def charge(
        self,
        category: str,
        seconds: float,
        trial_number: int | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        """Append a spend row (and consume the trial's reservation) in one transaction."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown ledger category {category!r}")
        if seconds <= 0:
            return
        with self._txn() as conn:
            conn.execute(
                LEDGER.insert().values(
                    study_name=self.study_name,
                    worker_id=self.worker_id,
                    category=category,
                    trial_number=trial_number,
                    seconds=float(seconds),
                    created_at=time.time(),
                )
            )
            if reservation is not None:
                conn.execute(
                    RESERVATIONS.update()
                    .where(RESERVATIONS.c.id == reservation.id)
                    .values(charged_s=RESERVATIONS.c.charged_s + float(seconds))
                )

    def release(self, reservation: Reservation) -> None:
        """Close a reservation: its unspent part returns to the search share."""
        with self._txn() as conn:
            conn.execute(
                RESERVATIONS.update()
                .where(RESERVATIONS.c.id == reservation.id, RESERVATIONS.c.released_at.is_(None))
                .values(released_at=time.time())
            )

    def release_stale(self, is_stale: Callable[[str], bool]) -> int:
        """Release open reservations of workers judged dead; returns how many.

        `is_stale` is asked outside the lock: a judge that reads the database itself would
        otherwise wait on our own write lock (SQLite) until it times out.
        """
        with self._engine.connect() as conn:
            owners = {
                r.worker_id
                for r in conn.execute(
                    sa.select(RESERVATIONS.c.worker_id).where(
                        RESERVATIONS.c.study_name == self.study_name,
                        RESERVATIONS.c.released_at.is_(None),
                    )
                )
            }
        dead = sorted(w for w in owners if w != self.worker_id and is_stale(w))
        if not dead:
            return 0
        with self._txn() as conn:
            released = conn.execute(
                RESERVATIONS.update()
                .where(
                    RESERVATIONS.c.study_name == self.study_name,
                    RESERVATIONS.c.released_at.is_(None),
                    RESERVATIONS.c.worker_id.in_(dead),
                )
                .values(released_at=time.time())
            ).rowcount
        return int(released)

    def open_reservations(self) -> int:
        with self._engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        RESERVATIONS.c.study_name == self.study_name,
                        RESERVATIONS.c.released_at.is_(None),
                    )
                ).scalar_one()
            )

    def entries(self) -> list[Entry]:
        """Every spend row of the study, oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(LEDGER)
                .where(LEDGER.c.study_name == self.study_name)
                .order_by(LEDGER.c.id)
            ).all()
        return [
            Entry(r.worker_id, r.category, r.trial_number, r.seconds, r.created_at) for r in rows
        ]

    def trial_costs(self) -> dict[int, dict[str, float]]:
        """Seconds by trial number and category (train/eval/setup)."""
        out: dict[int, dict[str, float]] = {}
        for e in self.entries():
            if e.trial_number is not None and e.category in TRIAL_CATEGORIES:
                d = out.setdefault(e.trial_number, {})
                d[e.category] = d.get(e.category, 0.0) + e.seconds
        return out

    def _claim(self, conn: sa.Connection) -> FinalClaim | None:
        row = conn.execute(
            sa.select(CLAIMS).where(
                CLAIMS.c.study_name == self.study_name, CLAIMS.c.what == "final"
            )
        ).first()
        if row is None:
            return None
        return FinalClaim(row.worker_id, row.state, row.allotment_s, json.loads(row.config))

    def final_claim(self) -> FinalClaim | None:
        with self._engine.connect() as conn:
            return self._claim(conn)

    def claim(self, what: str, is_stale: Callable[[str], bool]) -> bool:
        """Take the one-off job `what` (e.g. `continue:7`) for this worker, exactly once.

        True if this worker holds it now: it was free, already ours, or held by a dead
        worker (taken over: the job must be written to be redone idempotently).
        """
        # The holder is judged outside the lock (see release_stale).
        query = sa.select(CLAIMS.c.worker_id).where(
            CLAIMS.c.study_name == self.study_name, CLAIMS.c.what == what
        )
        with self._engine.connect() as conn:
            seen = conn.execute(query).first()
        dead_holder = (
            seen.worker_id
            if seen is not None and seen.worker_id != self.worker_id and is_stale(seen.worker_id)
            else None
        )
        with self._txn() as conn:
            row = conn.execute(query).first()
            now = time.time()
            if row is None:
                conn.execute(
                    CLAIMS.insert().values(
                        study_name=self.study_name, what=what, worker_id=self.worker_id,
                        state="claimed", allotment_s=0.0, config="{}", created_at=now,
                        updated_at=now,
                    )
                )  # fmt: skip
                return True
            if row.worker_id == self.worker_id:
                return True
            if row.worker_id != dead_holder:
                return False
            conn.execute(
                CLAIMS.update()
                .where(CLAIMS.c.study_name == self.study_name, CLAIMS.c.what == what)
                .values(worker_id=self.worker_id, updated_at=now)
            )
            return True

    def reservation_owners(self) -> dict[int, str]:
        """Trial number -> the worker that reserved its budget (the latest reservation)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(RESERVATIONS.c.trial_number, RESERVATIONS.c.worker_id)
                .where(
                    RESERVATIONS.c.study_name == self.study_name,
                    RESERVATIONS.c.trial_number.is_not(None),
                )
                .order_by(RESERVATIONS.c.id)
            ).all()
        return {int(n): w for n, w in rows}

    def claim_final(
        self, config: dict[str, Any], is_stale: Callable[[str], bool]
    ) -> FinalClaim | None:
        """Claim the final run, or take over a dead worker's claim; None while trials run.

        The first claim fixes the allotment (total - spent) and the config; later claims
        (a resume) get the stored ones back, so a resumed final run is the same run.
        """
        # Judge a foreign claim's holder outside the lock (see release_stale); inside it, take
        # over only a claim still held by the very worker judged dead.
        seen = self.final_claim()
        dead_holder = (
            seen.worker_id
            if seen is not None
            and seen.state == "claimed"
            and seen.worker_id != self.worker_id
            and is_stale(seen.worker_id)
            else None
        )
        with self._txn() as conn:
            claim = self._claim(conn)
            now = time.time()
            if claim is not None:
                if claim.state == "claimed" and claim.worker_id != self.worker_id:
                    if claim.worker_id != dead_holder:
                        return None
                    conn.execute(
                        CLAIMS.update()
                        .where(CLAIMS.c.study_name == self.study_name, CLAIMS.c.what == "final")
                        .values(worker_id=self.worker_id, updated_at=now)
                    )
                    claim.worker_id = self.worker_id
                return claim
            totals = self._totals(conn)
            open_n = conn.execute(
                sa.select(sa.func.count()).where(
                    RESERVATIONS.c.study_name == self.study_name,
                    RESERVATIONS.c.released_at.is_(None),
                )
            ).scalar_one()
            if open_n:
                return None
            claim = FinalClaim(self.worker_id, "claimed", totals.remaining_s, config)
            conn.execute(
                CLAIMS.insert().values(
                    study_name=self.study_name,
                    what="final",
                    worker_id=self.worker_id,
                    state="claimed",
                    allotment_s=claim.allotment_s,
                    config=json.dumps(config),
                    created_at=now,
                    updated_at=now,
                )
            )
            return claim

    def finish_final(self) -> None:
        with self._txn() as conn:
            conn.execute(
                CLAIMS.update()
                .where(CLAIMS.c.study_name == self.study_name, CLAIMS.c.what == "final")
                .values(state="done", updated_at=time.time())
            )


class Meter:
    """Partitions one worker's clock into charged slices (rule 1 of the module docstring).

    `charge(...)` books the time since the previous mark; `skip()` drops it (idle time that is
    not spent, e.g. waiting for other workers). `pending()` is the unbooked time so far, which
    stop checks add to what a trial has already charged.
    """

    def __init__(self, ledger: Ledger, clock: Callable[[], float]) -> None:
        self.ledger = ledger
        self.clock = clock
        self._mark = clock()

    def pending(self) -> float:
        return max(0.0, self.clock() - self._mark)

    def skip(self) -> None:
        self._mark = self.clock()

    def charge(
        self,
        category: str,
        trial_number: int | None = None,
        reservation: Reservation | None = None,
    ) -> float:
        now = self.clock()
        seconds = max(0.0, now - self._mark)
        self._mark = now
        self.ledger.charge(category, seconds, trial_number, reservation)
        return seconds
