"""The report of a real (fake-backend) study, opened in headless Chromium.

The study is run by the real driver on the fake backend: 34 trials that complete, get
pruned, run out of memory (and get skipped beyond the OOM frontier) or diverge, then a final
run, all charged to the real budget ledger. Chromium is driven through the DevTools protocol
(CDP) over its websocket: we count the rendered plot containers and the data each holds,
collect console errors and uncaught exceptions, watch for any request leaving the machine,
and save a screenshot.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from budgetune.search.backends import FakeBackend
from budgetune.search.driver import Driver
from budgetune.search.launch import run_study
from budgetune.search.progress import NullProgress
from budgetune.search.report import render, write_report
from budgetune.search.report_data import collect
from budgetune.search.storage import create_or_load, open_storage
from budgetune.search.study import load_study

# Running the 34-trial study and a browser takes more than 10 s on 2 cores.
pytestmark = pytest.mark.slow

FAKE_STUDY = """
[study]
name = "fake"
seed = 0
run_dir = "run"
backend = "fake"
max_trials = 34

[model]
name = "tiny/model"

[data]
max_seq_length = 128

[[data.sources]]
name = "dolly"
path = "data/dolly.jsonl"
schema = "dolly"

[[data.sources]]
name = "alpaca"
path = "data/alpaca.json"
schema = "alpaca"

[[data.sources]]
name = "flan"
path = "data/flan.jsonl"
schema = "flan"

[data.validation]
path = "data/val.jsonl"
schema = "alpaca"

[train]
global_batch = 16
warmup_steps = 2
eval_interval = 4

[search]
lora_rank = { choices = [4, 8, 16, 32] }
lr = { low = 1e-4, high = 3e-2, log = true }
micro_batch = { choices = [2, 4, 8, 16] }

[search.mix]
dolly = { low = 0.0, high = 1.0 }
alpaca = { low = 0.0, high = 1.0 }
flan = { low = 0.0, high = 1.0 }

[budget]
total_s = 900
final_share = 0.25
trial_s = 16
min_trial_s = 4
trial_eval_s = 1
trial_setup_s = 1

[sampler]
kind = "random"

[pruner]
kind = "median"
n_startup_trials = 3
n_warmup_steps = 5   # divergence shows at the 2nd eval (step 8): prune only after it

[fake]
memory_limit = 30000   # micro_batch * rank * 128 above this runs out of memory
diverge_lr = 0.012
setup_s = 1
"""


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished study: the real driver, ledger and storage, on the fake backend."""
    root = tmp_path_factory.mktemp("fake_study")
    (root / "fake.toml").write_text(FAKE_STUDY)
    study = load_study(root / "fake.toml")
    study.run_dir.mkdir(parents=True)
    ostudy = create_or_load(study, open_storage(study.storage))
    run_study(study, ostudy, FakeBackend(study.fake, eval_s=1.0), progress=NullProgress())
    return study.run_dir


def test_fake_study_has_every_outcome(fake_run: Path) -> None:
    storage = f"sqlite:///{fake_run / 'study.db'}"
    trials = optuna.load_study(study_name="fake", storage=storage).trials
    outcomes = Counter(t.user_attrs["outcome"] for t in trials)
    # The page must draw each kind of trial, so the fixture must produce each kind.
    assert {"complete", "pruned", "oom", "diverged"} <= set(outcomes)
    assert len(trials) >= 30


@pytest.fixture(scope="module")
def fake_report(fake_run: Path) -> Path:
    """`budgetune report <run dir> --csv --parquet`, once for the tests below."""
    write_report(str(fake_run), csv=fake_run / "trials.csv", parquet=fake_run / "trials.parquet")
    return fake_run / "report.html"


def test_trial_table_exports_load_in_pandas(fake_run: Path, fake_report: Path) -> None:
    csv, parquet = fake_run / "trials.csv", fake_run / "trials.parquet"
    from_csv, from_parquet = pd.read_csv(csv), pd.read_parquet(parquet)
    n_trials = len(optuna.load_study(study_name="fake",
                                     storage=f"sqlite:///{fake_run / 'study.db'}").trials)
    assert len(from_csv) == len(from_parquet) == n_trials
    assert list(from_csv.columns) == list(from_parquet.columns)
    for col in ("number", "state", "outcome", "value", "duration_s", "params_lora_rank",
                "params_lr", "params_micro_batch", "params_mix.dolly", "user_attrs_cost_s",
                "user_attrs_cost_train_s", "user_attrs_tokens_per_s",
                "user_attrs_peak_memory_bytes", "user_attrs_reason", "user_attrs_worker_id",
                "user_attrs_weight.flan"):  # fmt: skip
        assert col in from_parquet.columns, col
    # The driver tells OOM and diverged trials PRUNED; the outcome column tells them apart.
    assert set(from_parquet.loc[from_parquet.outcome == "oom", "state"]) == {"PRUNED"}
    assert from_csv.user_attrs_cost_s.sum() == pytest.approx(from_parquet.user_attrs_cost_s.sum())


EXPECTED_FIGURES = {
    "importance", "history", "curves", "horizon", "parallel", "slice", "contour",
    "timeline", "spend", "hardware", "mix", "holdout", "final",
}  # fmt: skip

_CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--remote-debugging-port=0", "--window-size=1400,1000",
]  # fmt: skip

_PLOTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => ({
  id: d.id,
  traces: (d.data || []).length,
  points: (d.data || []).some(t => ['x', 'y', 'z', 'values', 'dimensions']
      .some(k => t[k] && t[k].length > 0)),
})))"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class Cdp:
    """The smallest DevTools client we need: send a command, collect events meanwhile."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client, from the test extra

        # Chromium refuses websocket clients that send an Origin it does not allow.
        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._next:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} in {timeout_s} s")
            self.ws.settimeout(max(deadline - time.monotonic(), 0.1))
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        return out["result"].get("value")


def _devtools_port(user_data: Path, proc: subprocess.Popen, timeout_s: float = 20) -> int:
    port_file = user_data / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text().splitlines()[0])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"chromium did not start (exit {proc.poll()})")


def _page_ws_url(port: int) -> str:
    # No proxy: an http_proxy in the environment must not catch a localhost request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        targets = json.loads(r.read())
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


def open_in_chromium(page: Path, screenshot: Path, user_data: Path) -> dict[str, Any]:
    """Load `page`, let plotly draw, and return plots, errors, external requests."""
    exe = _chromium()
    assert exe is not None
    proc = subprocess.Popen([exe, *_CHROMIUM_FLAGS, f"--user-data-dir={user_data}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cdp = Cdp(_page_ws_url(_devtools_port(user_data, proc)))
        for domain in ("Runtime", "Log", "Page", "Network"):
            cdp.send(f"{domain}.enable")
        cdp.send("Page.navigate", url=page.resolve().as_uri())
        cdp.wait_for("Page.loadEventFired", timeout_s=20)
        plots = json.loads(cdp.evaluate(_PLOTS_JS))
        metrics = cdp.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": metrics["width"],
                              "height": min(metrics["height"], 12000), "scale": 0.5})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in cdp.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                args = (a.get("value", a.get("description")) for a in p["args"])
                errors.append(" ".join(str(a) for a in args))
            elif e["method"] == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details["text"])
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(p["entry"]["text"])
        requests = [e["params"]["request"]["url"] for e in cdp.events
                    if e["method"] == "Network.requestWillBeSent"]
        external = [u for u in requests if not u.startswith(("file:", "data:", "blob:"))]
        cdp.ws.close()
        return {"plots": plots, "errors": errors, "external": external}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_report_renders_in_chromium_without_errors(fake_report: Path, tmp_path: Path) -> None:
    if _chromium() is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    pytest.importorskip("websocket", reason="websocket-client (test extra) drives Chromium")
    seen = open_in_chromium(fake_report, tmp_path / "report.png", tmp_path / "chromium-profile")
    drawn = {p["id"].removeprefix("fig-") for p in seen["plots"] if p["points"]}
    rendered = {p["id"].removeprefix("fig-") for p in seen["plots"]}
    assert seen["errors"] == []
    assert seen["external"] == []
    assert rendered == EXPECTED_FIGURES
    # The fake backend runs no holdout tasks: that figure alone says "no data".
    assert drawn == EXPECTED_FIGURES - {"holdout"}
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_empty_study_page_renders_its_no_data_figures(tmp_path: Path) -> None:
    if _chromium() is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    pytest.importorskip("websocket", reason="websocket-client (test extra) drives Chromium")
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/study.db")
    page = write_report(str(tmp_path))
    seen = open_in_chromium(page, tmp_path / "empty.png", tmp_path / "chromium-profile")
    # Every figure is drawn (as its "no data" note) and none has a trace yet.
    assert {p["id"].removeprefix("fig-") for p in seen["plots"]} == EXPECTED_FIGURES
    assert not any(p["points"] for p in seen["plots"])
    assert seen["errors"] == [] and seen["external"] == []


class _StopAtTrial(NullProgress):
    """Plays the user pressing Ctrl-C as the first trial from `number` on that fits in the
    fake's memory starts (one that runs out of memory ends before it could stop)."""

    def __init__(self, number: int, memory_limit: float) -> None:
        self.number = number
        self.memory_limit = memory_limit
        self.stopped_at: int | None = None
        self.driver: Driver | None = None

    def trial(self, number: int, params: dict[str, Any]) -> None:
        fits = params["micro_batch"] * params["lora_rank"] * 128 <= self.memory_limit
        if number >= self.number and fits and self.stopped_at is None and self.driver:
            self.stopped_at = number
            self.driver.request_stop()


def test_report_of_an_interrupted_study_shows_its_running_trial(tmp_path: Path) -> None:
    (tmp_path / "fake.toml").write_text(FAKE_STUDY)
    study = load_study(tmp_path / "fake.toml")
    study.run_dir.mkdir(parents=True)
    ostudy = create_or_load(study, open_storage(study.storage))
    progress = _StopAtTrial(3, study.fake.memory_limit)
    driver = Driver(study, ostudy, FakeBackend(study.fake, eval_s=1.0), progress=progress)
    progress.driver = driver
    with pytest.raises(KeyboardInterrupt):
        driver.run()
    driver.ledger.close()
    data = collect(str(study.run_dir))
    assert data.phase.startswith("running")
    stopped = progress.stopped_at
    assert data.table.set_index("number").loc[stopped, "outcome"] == "running"
    # The interrupted trial's training was charged to the ledger, and nothing to a final run.
    assert stopped in set(data.spans.trial) and "final" not in set(data.spans.category)
    assert data.budget_s == 900.0 and not data.final
    text = render(data)
    assert "The final run has not run yet." in text and "<td>running</td>" in text
