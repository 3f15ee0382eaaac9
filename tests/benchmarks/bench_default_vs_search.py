"""The default configuration on the whole budget vs budgetune's default policy, for real.

    python tests/benchmarks/bench_default_vs_search.py [--seeds 3] [--total-s 180]

End to end with the real engine on the quickstart (tiny shipped model and data, CPU), at
equal total budget, per seed:

- (a) default: the study's default configuration (Lit-GPT 2023 defaults, `[train]`) trained
  on the whole budget less the final tail (`max_seconds`, so the engine fits its schedule);
- (e) budgetune: the real driver with the default policy (the study with its `[sampler]`,
  `[pruner]` and `final_share` reset to `search/study.py`'s defaults), the engine backend,
  SQLite storage and ledger: trials, pruning, then the final run.

Both are scored by the final model's validation loss on the study's fixed validation set.
The seed is the study's (sampler and engine seeds). The two strategies alternate per seed,
so a load change on a shared machine hits both alike. Printed: each seed's pair, the
medians and the ratio (e)/(a) of the medians (below 1 means the search paid). Minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "studies" / "quickstart.toml"


class _NoLimit:
    """A reporter for a run outside any study: the engine's own horizon ends it."""

    def phase(self, name: str) -> None:
        pass

    def report(self, event: Any) -> bool:
        return False

    def should_stop(self) -> bool:
        return False


def default_run(study: Any, backend: Any, run_dir: Path) -> float:
    """(a): the default configuration on the whole budget (less the final tail)."""
    from budgetune.search.backends import final_val_loss

    b = study.budget
    cfg = study.run_config(run_dir / "default", {}, max_seconds=b.total_s - b.final_tail)
    return float(final_val_loss(backend.run(cfg, _NoLimit(), resume=False)))


def budgetune_run(study: Any, backend: Any, run_dir: Path) -> tuple[float, int]:
    """(e): the whole study through the real driver; (final val_loss, trials)."""
    from budgetune.search.driver import Driver
    from budgetune.search.storage import create_or_load, open_storage
    from budgetune.search.study import PrunerSpec, SamplerSpec

    s = dataclasses.replace(
        study, run_dir=run_dir, storage=f"sqlite:///{run_dir / 'study.db'}",
        sampler=SamplerSpec(), pruner=PrunerSpec(),
        budget=dataclasses.replace(study.budget, final_share=_default_share()),
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    ostudy = create_or_load(s, open_storage(s.storage))
    driver = Driver(s, ostudy, backend)
    driver.run()
    driver.ledger.close()
    return float(ostudy.user_attrs["final.val_loss"]), len(ostudy.trials)


def _default_share() -> float:
    from budgetune.search.study import BudgetSpec

    return BudgetSpec(total_s=1.0, trial_s=1.0).final_share


def main(argv: list[str] | None = None) -> None:
    from budgetune.search.backends import EngineBackend
    from budgetune.search.study import load_study

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--total-s", type=float, default=None, help="budget (default: the study's)")
    p.add_argument("--study", type=Path, default=STUDY)
    a = p.parse_args(argv)
    base = load_study(a.study)
    if a.total_s:
        base = dataclasses.replace(base, budget=dataclasses.replace(base.budget, total_s=a.total_s))
    backend = EngineBackend(base.model.name, base.model.precision, base.model.quantize)
    backend.setup()  # the base model loads once, outside every budget, for both strategies
    print(
        f"study {a.study.name}: budget {base.budget.total_s:g} s, trial {base.budget.trial_s:g} s"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="budgetune-e2e-") as tmp:
        for seed in range(a.seeds):
            study = dataclasses.replace(base, seed=seed)
            t = time.perf_counter()
            a_loss = default_run(study, backend, Path(tmp) / f"a{seed}")
            a_s = time.perf_counter() - t
            t = time.perf_counter()
            e_loss, n = budgetune_run(study, backend, Path(tmp) / f"e{seed}")
            e_s = time.perf_counter() - t
            rows.append((a_loss, e_loss))
            print(f"seed {seed}: (a) default {a_loss:.4f} ({a_s:.0f} s)   "
                  f"(e) budgetune {e_loss:.4f} ({n} trials, {e_s:.0f} s)", flush=True)  # fmt: skip
    ma = statistics.median(r[0] for r in rows)
    me = statistics.median(r[1] for r in rows)
    wins = sum(r[1] < r[0] for r in rows)
    print(f"\nmedian final val_loss: (a) {ma:.4f}  (e) {me:.4f}  ratio (e)/(a) {me / ma:.3f}; "
          f"(e) better on {wins}/{len(rows)} seeds")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
