"""`export-submission`: the Docker build context it writes, checked without a Docker engine.

No Docker daemon runs here, so these tests check what can be checked: the Dockerfile's
instructions and that everything it COPYs is in the context, the model copied byte for
byte, the copied source building a wheel offline, and `budgetune serve` (the image's CMD)
answering the challenge's health check from the exported model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from budgetune.engine.errors import UserInputError
from budgetune.search.cli import main
from budgetune.search.submission import DEFAULT_BASE_IMAGE, export_submission

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "studies" / "quickstart" / "model"
SERVE_CMD = ["budgetune", "serve", "/model", "--host", "0.0.0.0", "--port", "80"]


def save_tiny_model(folder: Path) -> Path:
    """A random Llama with a word-level tokenizer: enough to load, serve and copy."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the capital of france is paris a an and to".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(vocab),
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study run dir whose merged final model sits at final/export."""
    run = tmp_path_factory.mktemp("run")
    export = run / "final" / "export"
    export.mkdir(parents=True)
    if (SHIPPED_MODEL / "config.json").is_file() and any(SHIPPED_MODEL.glob("*.safetensors")):
        for f in SHIPPED_MODEL.iterdir():
            if f.is_file():
                (export / f.name).write_bytes(f.read_bytes())
    else:
        save_tiny_model(export)
    return run


@pytest.fixture(scope="module")
def context(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ctx") / "submission"
    export_submission(run_dir, out)
    return out


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_builds_from_a_cuda_pytorch_image_and_serves_on_port_80(context):
    steps = instructions(context / "Dockerfile")
    assert steps[0] == ("FROM", DEFAULT_BASE_IMAGE)
    assert DEFAULT_BASE_IMAGE.startswith("pytorch/pytorch:") and "-cuda" in DEFAULT_BASE_IMAGE
    assert ("EXPOSE", "80") in steps
    # The CMD is the exec form the challenge's harness runs: the server on port 80.
    assert steps[-1][0] == "CMD" and json.loads(steps[-1][1]) == SERVE_CMD
    copies = [shlex.split(args) for kind, args in steps if kind == "COPY"]
    # Everything the Dockerfile copies is in the context: the build needs no other files.
    for *sources, _dest in copies:
        for src in sources:
            assert (context / src).exists(), src
    assert ["model/", "/model/"] in copies
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    assert len(installs) == 1 and "/opt/budgetune/src" in installs[0]
    assert "--constraint /opt/budgetune/constraints.txt" in installs[0]


def test_context_holds_the_model_byte_for_byte(context, run_dir):
    assert digests(context / "model") == digests(run_dir / "final" / "export")


def test_context_holds_the_source_and_pins(context):
    src = context / "budgetune"
    assert (src / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
    for module in ("engine/config.py", "engine/errors.py", "search/cli.py", "search/serve.py"):
        assert (src / module).read_bytes() == (REPO / module).read_bytes(), module
    assert not list(src.rglob("__pycache__"))
    pins = dict(line.split("==") for line in (context / "constraints.txt").read_text().split())
    import transformers

    # Serving libraries as installed here; torch as the base image ships it.
    assert pins["transformers"] == transformers.__version__
    assert pins["torch"] == DEFAULT_BASE_IMAGE.split(":")[1].split("-")[0]


def test_readme_says_how_to_build_run_and_check(context):
    readme = (context / "README.md").read_text()
    assert "docker build -t budgetune-submission ." in readme
    assert "docker run --rm --gpus all -p 8080:80 budgetune-submission" in readme
    assert """-d '{"prompt": "The capital of France is "}'""" in readme
    assert "http://localhost:8080/process" in readme


@pytest.mark.slow
def test_copied_source_builds_a_wheel_offline(context, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(context / "budgetune")],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("budgetune-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry_points).decode()
    assert {"budgetune/search/serve.py", "budgetune/search/cli.py"} <= names
    # The image's CMD runs this console script.
    assert "budgetune = budgetune.search.cli:main" in scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_answers_the_health_check_from_the_exported_model(context):
    port = free_port()
    cmd = [sys.executable, "-m", "budgetune.search.cli", "serve", str(context / "model"),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"{url}/process", json={"prompt": "The capital of France is "}, timeout=60)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"text", "tokens", "logprob", "request_time"}
        assert 1 <= len(r.json()["tokens"]) <= 50
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    argv = ["budgetune", "export-submission", str(tmp_path / "nowhere"), str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "nowhere" in err
    assert not (tmp_path / "out").exists()


def test_refuses_what_would_not_build_or_run(run_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("someone's file")
    with pytest.raises(UserInputError, match="not an empty folder"):
        export_submission(run_dir, taken)
    assert (taken / "keep.txt").read_text() == "someone's file"

    # transformers here needs a newer torch than this image has: refused at export time.
    old = "pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime"
    with pytest.raises(UserInputError, match="--base-image"):
        export_submission(run_dir, tmp_path / "old", base_image=old)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (no_weights / "tokenizer.json").write_text("{}")
    with pytest.raises(UserInputError, match="weights"):
        export_submission(no_weights, tmp_path / "out")
    assert not (tmp_path / "out").exists()
