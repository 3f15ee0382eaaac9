"""The study's `[eval]` section: trial objective, holdout checks, final eval, overfitting guard.

The trial objective is minimized, like the validation loss the pruner sees at every
intermediate step, so a trial that looks good while training also tends to look good at the
end::

    objective    = val_loss_weight * val_loss - search_score
    search_score = sum_i w_i * s_i / sum_i w_i           (weighted mean over eval.search)
    s_i          = (value_i - baseline_i) / (1 - baseline_i)

`value_i` is task i's primary metric (accuracy, exact match: higher is better) on at most
`limit` examples; `baseline_i` is its chance score (0.25 for four-way multiple choice), so
s_i = 0 means "no better than guessing" and 1 means perfect, whatever the task. Without search
tasks the objective is the validation loss alone (`val_loss_weight` defaults to 1); with them
it defaults to 0, so tasks replace the loss, and a value in between mixes both.

`eval.holdout` tasks never enter the objective. They are run only on trials that rank among the
best `holdout_top_k` so far (decided right after scoring, while the trial's adapter is still
in memory) and on the final model; `overfitting_warnings` then compares search and holdout
scores, because a search that keeps improving its own yardstick while the holdout stalls is
fitting that yardstick (the 2023 challenge organizers found top teams overfit the open tasks).
`eval.final` tasks (default: the search tasks without limits) score the final model in full.

Wiring (the driver's side): `EvalSettings.from_toml` parses the section; one `Evaluator` per
worker scores each trial after training (`score_trial`, its seconds charged to the ledger as
eval), runs `holdout` when `is_holdout_candidate`, and `final` on the final model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from budgetune.engine.errors import UserInputError
from budgetune.engine.evaluate import (
    EvalReport,
    TaskRequest,
    TaskResult,
    build_task_manager,
    evaluate,
    evaluate_pretrained,
    localize_task_dirs,
    results_by_task,
    tasks_are_local,
)

SECTIONS = ("search", "holdout", "final")


@dataclass
class EvalTask:
    """One task of an `[[eval.search]]`, `[[eval.holdout]]` or `[[eval.final]]` table."""

    task: str
    """lm-eval task/group name, built in or defined by a YAML under `eval.include`."""
    limit: int | None = None
    """Examples per task (None: all). Keep search limits small: every trial pays them."""
    weight: float = 1.0
    """Share of this task in its section's weighted mean score."""
    metric: str | None = None
    """Primary metric, `acc` or `exact_match,strict` (None: the task's first metric)."""
    baseline: float = 0.0
    """Chance score, subtracted before averaging so tasks with many choices are not favoured."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: the task's own default)."""

    def request(self) -> TaskRequest:
        return TaskRequest(self.task, self.limit, self.num_fewshot, self.metric)


@dataclass
class EvalSettings:
    """The parsed `[eval]` section."""

    search: list[EvalTask] = field(default_factory=list)
    holdout: list[EvalTask] = field(default_factory=list)
    final: list[EvalTask] = field(default_factory=list)
    """Tasks for the final model (default: the search tasks, without limits)."""
    include: list[Path] = field(default_factory=list)
    """Folders (or YAML files) of local lm-eval tasks, absolute."""
    val_loss_weight: float = 1.0
    """Weight of the validation loss in the objective (default 0 with search tasks, else 1)."""
    batch_size: int = 8
    holdout_top_k: int = 3
    """Run the holdout on a trial when fewer than this many earlier trials scored better."""
    gap_tolerance: float = 0.05
    """How much the search-minus-holdout gap may grow before the guard warns."""

    @classmethod
    def from_toml(cls, table: Mapping[str, Any], study_dir: Path) -> EvalSettings:
        """Parse `[eval]`; every problem is reported at once, each with its key path."""
        problems: list[str] = []
        if not isinstance(table, Mapping):
            raise UserInputError("eval must be a table")
        scalars = {"include", "val_loss_weight", "batch_size", "holdout_top_k", "gap_tolerance"}
        for key in sorted(set(table) - scalars - set(SECTIONS)):
            problems.append(f"eval: unknown key {key!r}")
        sections = {s: _parse_tasks(table.get(s, []), f"eval.{s}", problems) for s in SECTIONS}
        include = _parse_include(table.get("include", []), study_dir, problems)
        loss_weight = 0.0 if sections["search"] else 1.0
        settings = cls(
            **sections,
            include=include,
            val_loss_weight=_scalar(table, "val_loss_weight", "eval", problems, loss_weight),
            batch_size=_scalar(table, "batch_size", "eval", problems, 8),
            holdout_top_k=_scalar(table, "holdout_top_k", "eval", problems, 3),
            gap_tolerance=_scalar(table, "gap_tolerance", "eval", problems, 0.05),
        )
        if not settings.final:
            settings.final = [EvalTask(**{**asdict(t), "limit": None}) for t in settings.search]
        problems += settings.problems()
        if problems:
            raise UserInputError("; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        """Checks that span fields (types were checked while parsing)."""
        p: list[str] = []
        for section in SECTIONS:
            seen: set[str] = set()
            for i, t in enumerate(getattr(self, section)):
                where = f"eval.{section}[{i}]"
                if t.task in seen:
                    p.append(f"{where}.task {t.task!r} is listed twice in eval.{section}")
                seen.add(t.task)
                if t.limit is not None and t.limit < 1:
                    p.append(f"{where}.limit must be >= 1")
                if t.weight <= 0:
                    p.append(f"{where}.weight must be > 0")
                if not 0 <= t.baseline < 1:
                    p.append(f"{where}.baseline must be in [0, 1)")
                if t.num_fewshot is not None and t.num_fewshot < 0:
                    p.append(f"{where}.num_fewshot must be >= 0")
        searched = {t.task for t in self.search}
        for i, t in enumerate(self.holdout):
            if t.task in searched:
                p.append(
                    f"eval.holdout[{i}].task {t.task!r} is also a search task "
                    "(a holdout must never guide the search)"
                )
        if self.val_loss_weight < 0:
            p.append("eval.val_loss_weight must be >= 0")
        if not self.search and self.val_loss_weight == 0:
            p.append("eval: the objective is empty: add eval.search tasks or val_loss_weight > 0")
        if self.batch_size < 1:
            p.append("eval.batch_size must be >= 1")
        if self.holdout_top_k < 1:
            p.append("eval.holdout_top_k must be >= 1")
        if self.gap_tolerance < 0:
            p.append("eval.gap_tolerance must be >= 0")
        return p

    def task_names(self) -> list[str]:
        """Every task any section names, once each."""
        return list(dict.fromkeys(t.task for s in SECTIONS for t in getattr(self, s)))


def _parse_tasks(raw: Any, where: str, problems: list[str]) -> list[EvalTask]:
    if not isinstance(raw, list):
        problems.append(f"{where} must be an array of tables ([[{where}]])")
        return []
    known = {f.name for f in fields(EvalTask)}
    tasks: list[EvalTask] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if isinstance(item, str):  # shorthand: search = ["arc_easy", "hellaswag"]
            item = {"task": item}
        if not isinstance(item, Mapping):
            problems.append(f"{at} must be a table or a task name")
            continue
        for key in sorted(set(item) - known):
            problems.append(f"{at}: unknown key {key!r}")
        name = item.get("task")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{at}.task must name an lm-eval task")
            continue
        metric = item.get("metric")
        if metric is not None and not isinstance(metric, str):
            problems.append(f"{at}.metric must be a string")
            metric = None
        tasks.append(
            EvalTask(
                task=name.strip(),
                limit=_optional_int(item, "limit", at, problems),
                weight=_scalar(item, "weight", at, problems, 1.0),
                metric=metric,
                baseline=_scalar(item, "baseline", at, problems, 0.0),
                num_fewshot=_optional_int(item, "num_fewshot", at, problems),
            )
        )
    return tasks


def _parse_include(raw: Any, study_dir: Path, problems: list[str]) -> list[Path]:
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        problems.append("eval.include must be a path or a list of paths")
        return []
    out = []
    for i, entry in enumerate(entries):
        path = (Path(study_dir) / Path(entry).expanduser()).resolve()
        if not path.exists():
            problems.append(f"eval.include[{i}]: {entry} does not exist (relative to {study_dir})")
        out.append(path)
    return out


def _scalar(table: Mapping[str, Any], key: str, at: str, problems: list[str], default: Any) -> Any:
    """`table[key]` checked against the type of `default` (int, or float that takes ints)."""
    value = table.get(key)
    if value is None:
        return default
    want = int if isinstance(default, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, want) or not math.isfinite(value):
        problems.append(f"{at}.{key} must be {'an integer' if want is int else 'a number'}")
        return default
    return float(value) if want is not int else value


def _optional_int(table: Mapping[str, Any], key: str, at: str, problems: list[str]) -> int | None:
    return _scalar(table, key, at, problems, 0) if table.get(key) is not None else None


# --- scores -----------------------------------------------------------------------------


def weighted_score(specs: Sequence[EvalTask], results: Sequence[TaskResult], where: str) -> float:
    """Weighted mean of chance-normalized primary metrics (the `search_score` formula)."""
    by_task = {r.task: r for r in results}
    total = 0.0
    for spec in specs:
        r = by_task[spec.task]
        if not r.higher_is_better:
            raise UserInputError(
                f"{where}: metric {r.metric} of task {spec.task} is lower-is-better; "
                "name a score metric (eval.*.metric)"
            )
        total += spec.weight * (r.value - spec.baseline) / (1.0 - spec.baseline)
    return total / sum(s.weight for s in specs)


def weighted_stderr(specs: Sequence[EvalTask], results: Sequence[TaskResult]) -> float | None:
    """Standard error of `weighted_score`, treating tasks as independent (None if unknown)."""
    by_task = {r.task: r for r in results}
    total_w = sum(s.weight for s in specs)
    var = 0.0
    for spec in specs:
        se = by_task[spec.task].stderr
        if se is None:
            return None
        var += (spec.weight / total_w * se / (1.0 - spec.baseline)) ** 2
    return math.sqrt(var)


def _tasks_dict(obj: Any) -> dict[str, Any]:
    """A score as JSON: its fields, with `results` stored as `tasks` keyed by task."""
    d = asdict(obj)
    d["tasks"] = {r["task"]: r for r in d.pop("results")}
    return d


@dataclass
class TrialScore:
    """What a trial's short-horizon eval gives the driver (and stores in the trial)."""

    value: float
    """The objective, minimized."""
    val_loss: float | None
    search_score: float | None
    """Weighted mean normalized score over eval.search (None without search tasks)."""
    results: list[TaskResult]
    seconds: float
    """Eval seconds, to charge to the ledger as eval time."""
    search_stderr: float | None = None
    """Standard error of `search_score` (the guard ignores differences within the noise)."""

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Per-task results keyed by task, JSON-ready (for trial user attributes)."""
        return results_by_task(self.results)

    def to_dict(self) -> dict[str, Any]:
        return _tasks_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialScore:
        results = [TaskResult.from_dict(t) for t in d["tasks"].values()]
        return cls(**{k: v for k, v in d.items() if k != "tasks"}, results=results)


@dataclass
class HoldoutScore:
    """Holdout tasks on one model: never part of any objective."""

    score: float
    results: list[TaskResult]
    seconds: float
    stderr: float | None = None

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return results_by_task(self.results)

    def to_dict(self) -> dict[str, Any]:
        return _tasks_dict(self)


@dataclass
class FinalScore:
    """The final model: its full eval, plus search and holdout scores for the guard."""

    results: list[TaskResult]
    """eval.final results (no limits unless the study sets them)."""
    search_score: float | None
    """Search tasks at their trial limits, comparable with the trials' search scores."""
    holdout: HoldoutScore | None
    seconds: float
    search_stderr: float | None = None

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return results_by_task(self.results)

    def to_dict(self) -> dict[str, Any]:
        d = _tasks_dict(self)
        d["holdout"] = self.holdout.to_dict() if self.holdout else None
        return d


def write_results(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write eval results as JSON (written whole, then renamed, so readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


class Evaluator:
    """Scores trials and the final model for one worker; lm-eval's task index is built once."""

    def __init__(self, settings: EvalSettings, work_dir: Path) -> None:
        self.settings = settings
        self.work_dir = Path(work_dir)
        self._manager: Any = None
        self._offline = False
        self._tasks_dir: TemporaryDirectory[str] | None = None

    def _task_manager(self) -> Any:
        if self._manager is None:
            # One private copy per Evaluator: workers sharing a run dir never race on it.
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._tasks_dir = TemporaryDirectory(prefix="tasks-", dir=self.work_dir)
            dirs = localize_task_dirs(self.settings.include, Path(self._tasks_dir.name))
            names = self.settings.task_names()
            self._manager = build_task_manager(dirs, names, self.settings.include)
            self._offline = tasks_are_local(self._manager, names)
        return self._manager

    def check_tasks(self) -> None:
        """Fail early (at launch) when a task name is unknown to lm-eval and the includes."""
        if self.settings.task_names():
            self._task_manager()

    def _evaluate(self, model: Any, tokenizer: Any, requests: list[TaskRequest]) -> EvalReport:
        start = time.perf_counter()
        manager = self._task_manager()
        # The first eval also pays lm-eval's import and task index: GPU time like the rest.
        setup_s = time.perf_counter() - start
        report = evaluate(
            model,
            tokenizer,
            requests,
            task_manager=manager,
            batch_size=self.settings.batch_size,
            offline=self._offline,
            quiet=True,  # a study's output is its own progress display
        )
        report.seconds += setup_s
        return report

    def score_trial(
        self, model: Any, tokenizer: Any, val_loss: float | None, out_dir: Path | None = None
    ) -> TrialScore:
        """The trial's objective from its final validation loss and the search tasks."""
        s = self.settings
        if s.val_loss_weight > 0 and val_loss is None:
            raise ValueError("the objective weighs the validation loss, but none was given")
        loss_term = s.val_loss_weight * val_loss if s.val_loss_weight > 0 else 0.0
        if not s.search:
            return TrialScore(loss_term, val_loss, None, [], 0.0)
        report = self._evaluate(model, tokenizer, [t.request() for t in s.search])
        score = weighted_score(s.search, report.tasks, "eval.search")
        stderr = weighted_stderr(s.search, report.tasks)
        result = TrialScore(
            loss_term - score, val_loss, score, report.tasks, report.seconds, stderr
        )
        if out_dir is not None:
            write_results(Path(out_dir) / "eval_search.json", result.to_dict())
        return result

    def is_holdout_candidate(self, value: float, previous_values: Sequence[float]) -> bool:
        """True when the holdout should run on this trial: it ranks in the best top-k so far."""
        if not self.settings.holdout:
            return False
        better = sum(1 for v in previous_values if v < value)
        return better < self.settings.holdout_top_k

    def holdout(self, model: Any, tokenizer: Any, out_dir: Path | None = None) -> HoldoutScore:
        """Holdout tasks on this model (a top trial's, or the final one)."""
        if not self.settings.holdout:
            raise ValueError("the study names no eval.holdout tasks")
        report = self._evaluate(model, tokenizer, [t.request() for t in self.settings.holdout])
        score = weighted_score(self.settings.holdout, report.tasks, "eval.holdout")
        stderr = weighted_stderr(self.settings.holdout, report.tasks)
        result = HoldoutScore(score, report.tasks, report.seconds, stderr)
        if out_dir is not None:
            write_results(Path(out_dir) / "eval_holdout.json", result.to_dict())
        return result

    def final(self, model: Any, tokenizer: Any, out_dir: Path | None = None) -> FinalScore:
        """Full eval of the final model, plus its search and holdout scores for the guard."""
        s = self.settings
        seconds = 0.0
        tasks: list[TaskResult] = []
        if s.final:
            report = self._evaluate(model, tokenizer, [t.request() for t in s.final])
            tasks, seconds = report.tasks, report.seconds
        search_score = search_stderr = None
        if s.search:
            # Reuse a final result when it is the very same request (same limit and shots).
            done = {t.request(): r for t, r in zip(s.final, tasks, strict=True)}
            todo = [t.request() for t in s.search if t.request() not in done]
            found = [done[t.request()] for t in s.search if t.request() in done]
            if todo:
                report = self._evaluate(model, tokenizer, todo)
                found += report.tasks
                seconds += report.seconds
            search_score = weighted_score(s.search, found, "eval.search")
            search_stderr = weighted_stderr(s.search, found)
        holdout = self.holdout(model, tokenizer) if s.holdout else None
        if holdout is not None:
            seconds += holdout.seconds
        result = FinalScore(tasks, search_score, holdout, seconds, search_stderr)
        if out_dir is not None:
            write_results(Path(out_dir) / "eval_final.json", result.to_dict())
        return result


# --- the overfitting guard --------------------------------------------------------------


NOISE_Z = 2.0
"""A difference counts only beyond this many standard errors (about 95%, were it normal)."""


@dataclass
class GuardRow:
    """One model's search score next to its holdout score, for the guard and the report."""

    label: str
    """`trial 12`, `final`: how the warning names it."""
    search_score: float | None
    holdout_score: float
    objective: float | None = None
    """The trial's objective (lower is better); ranks trials when given."""
    final: bool = False
    search_stderr: float | None = None
    holdout_stderr: float | None = None
    """Standard errors: with them, differences within the eval's own noise are not flagged."""

    @classmethod
    def from_attrs(
        cls, label: str, attrs: Mapping[str, Any], objective: float | None = None,
        final: bool = False,
    ) -> GuardRow | None:  # fmt: skip
        """A row from stored attributes (`search_score`, `holdout_score`, their `_stderr`s);
        None when the model has no holdout score."""
        holdout = _float_or_none(attrs.get("holdout_score"))
        if holdout is None:
            return None
        return cls(
            label, _float_or_none(attrs.get("search_score")), holdout, objective, final,
            _float_or_none(attrs.get("search_stderr")), _float_or_none(attrs.get("holdout_stderr")),
        )  # fmt: skip

    @property
    def gap(self) -> float | None:
        """Search minus holdout score: how much better the model looks on its own yardstick."""
        return None if self.search_score is None else self.search_score - self.holdout_score

    @property
    def gap_stderr(self) -> float | None:
        if self.search_stderr is None or self.holdout_stderr is None:
            return None
        return math.hypot(self.search_stderr, self.holdout_stderr)


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _noise(*stderrs: float | None) -> float:
    """The margin a difference of these independent scores must clear (0 when unknown)."""
    if any(se is None for se in stderrs):
        return 0.0
    return NOISE_Z * math.sqrt(sum(se * se for se in stderrs))  # type: ignore[operator]


def _best_by_search(trials: Sequence[GuardRow]) -> GuardRow | None:
    if trials and all(r.objective is not None for r in trials):
        return min(trials, key=lambda r: r.objective)  # type: ignore[arg-type, return-value]
    scored = [r for r in trials if r.search_score is not None]
    return max(scored, key=lambda r: r.search_score) if scored else None  # type: ignore[arg-type, return-value]


def guard_table(rows: Sequence[GuardRow]) -> list[dict[str, Any]]:
    """Report data: each model's search and holdout scores, gap and holdout rank."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i].holdout_score)
    rank = {i: n + 1 for n, i in enumerate(order)}
    return [
        {
            "label": r.label,
            "objective": r.objective,
            "search_score": r.search_score,
            "search_stderr": r.search_stderr,
            "holdout_score": r.holdout_score,
            "holdout_stderr": r.holdout_stderr,
            "gap": r.gap,
            "holdout_rank": rank[i],
            "final": r.final,
        }
        for i, r in enumerate(rows)
    ]


def overfitting_warnings(
    rows: Sequence[GuardRow], top_k: int | None = None, gap_tolerance: float = 0.05
) -> list[str]:
    """Say when the search looks like it is fitting its own tasks.

    `rows` are the trials whose holdout ran, in the order it ran (each was among the best so
    far when it ran, so later rows are the search's later favourites), then the final model.
    Three rules:

    1. the best trial by search objective is not among the best `top_k` trials by holdout
       score (default: the better half, rounded up);
    2. the search-minus-holdout gap grew by more than `gap_tolerance` from the first such
       trial to the last;
    3. the final model's gap exceeds the best trial's by more than `gap_tolerance`.

    Where rows carry standard errors, a difference must also exceed `NOISE_Z` standard
    errors of itself: short-horizon evals on a few dozen examples are noisy, and a guard that
    cries wolf on noise is soon ignored.
    """
    warnings: list[str] = []
    trials = [r for r in rows if not r.final]
    best = _best_by_search(trials)
    if best is not None and len(trials) >= 2:
        k = top_k or math.ceil(len(trials) / 2)
        by_holdout = sorted(trials, key=lambda r: -r.holdout_score)
        kth = by_holdout[min(k, len(by_holdout)) - 1]
        shortfall = kth.holdout_score - best.holdout_score
        if shortfall > 0 and shortfall > _noise(best.holdout_stderr, kth.holdout_stderr):
            rank = 1 + sum(1 for r in trials if r.holdout_score > best.holdout_score)
            top = by_holdout[0]
            warnings.append(
                f"{best.label} is the best by search objective but ranks {rank} of "
                f"{len(trials)} by holdout score ({best.holdout_score:.3f}; {top.label} has "
                f"{top.holdout_score:.3f}): the search may be fitting its own tasks"
            )
    gapped = [r for r in trials if r.gap is not None]
    if len(gapped) >= 2:
        first, last = gapped[0], gapped[-1]
        growth = last.gap - first.gap  # type: ignore[operator]
        if growth > max(gap_tolerance, _noise(first.gap_stderr, last.gap_stderr)):
            warnings.append(
                f"the search-holdout gap grew from {first.gap:.3f} ({first.label}) to "
                f"{last.gap:.3f} ({last.label}): search scores improve more than holdout scores"
            )
    finals = [r for r in rows if r.final and r.gap is not None]
    if finals and best is not None and best.gap is not None:
        fin = finals[-1]
        growth = fin.gap - best.gap  # type: ignore[operator]
        if growth > max(gap_tolerance, _noise(fin.gap_stderr, best.gap_stderr)):
            warnings.append(
                f"the final model's search-holdout gap ({fin.gap:.3f}) exceeds that of "
                f"{best.label} ({best.gap:.3f}): its search score overstates it"
            )
    return warnings


# --- `budgetune eval` -------------------------------------------------------------------


def eval_command(
    model_dir: Path,
    tasks: str,
    include_paths: Sequence[Path],
    limit: int | None,
    out: Path | None,
    batch_size: int = 8,
    device: str | None = None,
) -> EvalReport:
    """Evaluate an exported model folder on lm-eval tasks, print a table, write JSON."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserInputError("--tasks names no task (give a comma-separated list)")
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be >= 1")
    if batch_size < 1:
        raise UserInputError("--batch-size must be >= 1")
    report = evaluate_pretrained(
        model_dir,
        [TaskRequest(n, limit) for n in names],
        include_paths=include_paths,
        batch_size=batch_size,
        device=device,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "metric", "value", "stderr", "n")
    for r in report.tasks:
        stderr = "-" if r.stderr is None else f"{r.stderr:.4f}"
        table.add_row(r.task, r.metric, f"{r.value:.4f}", stderr, str(r.n_examples))
    Console().print(table)
    if out is not None:
        payload = {"model": str(model_dir), "limit": limit, **report.to_dict()}
        write_results(Path(out), payload)
        Console().print(f"results written to {out}")
    return report
