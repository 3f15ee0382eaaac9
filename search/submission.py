"""`budgetune export-submission`: a Docker build context that serves the final model.

The challenge took a Docker image that starts an HTTP server on port 80 (see `serve.py`).
The context written here builds without access to our repository: it holds budgetune's
own source (installed with pip inside the image), the merged model (copied to `/model`),
a constraints file, a Dockerfile and a README that says how to build and test it locally.

Versions: the image takes torch from its CUDA PyTorch base image, and pins the libraries
the server's behaviour depends on (transformers, tokenizers, fastapi, ...) to the versions
this export ran with, so the image answers as `budgetune serve` did here. Because
transformers declares the torch it needs, a base image with an older torch is refused
at export time rather than failing inside the build.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from budgetune.engine.errors import UserInputError
from budgetune.search.serve import resolve_model_dir

DEFAULT_BASE_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
"""Official CUDA PyTorch runtime image; transformers 5 needs torch >= 2.6."""
PINNED_PACKAGES: tuple[str, ...] = (
    "transformers",
    "tokenizers",
    "safetensors",
    "sentencepiece",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "typer",
)
"""Libraries whose version changes what the server answers; pinned to this environment's."""
IMAGE_MODEL_DIR = "/model"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


@dataclass
class Submission:
    """What `export_submission` wrote: a complete Docker build context."""

    out_dir: Path
    dockerfile: Path
    readme: Path
    constraints: Path
    source_dir: Path
    """budgetune's source, installed inside the image."""
    model_dir: Path
    """The merged model, copied to /model in the image."""
    base_image: str


def export_submission(run_dir: Path, out_dir: Path, base_image: str | None = None) -> Submission:
    """Write the build context for `run_dir`'s final model (or an exported model folder)."""
    model_src = resolve_model_dir(Path(run_dir))
    check_model_files(model_src)
    base_image = base_image or DEFAULT_BASE_IMAGE
    constraints = pinned_constraints(base_image)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserInputError(f"{out_dir}: exists and is not an empty folder; choose a new one")
    out_dir.mkdir(parents=True, exist_ok=True)

    source_dir = copy_source(find_source_root(), out_dir / "budgetune")
    model_dir = out_dir / "model"
    # Hard links where possible: a 7B model is 14 GB and the build only reads it.
    shutil.copytree(model_src, model_dir, ignore=IGNORED, copy_function=_link_or_copy)
    sub = Submission(
        out_dir=out_dir,
        dockerfile=out_dir / "Dockerfile",
        readme=out_dir / "README.md",
        constraints=out_dir / "constraints.txt",
        source_dir=source_dir,
        model_dir=model_dir,
        base_image=base_image,
    )
    sub.constraints.write_text("".join(f"{line}\n" for line in constraints))
    sub.dockerfile.write_text(render_dockerfile(base_image, model_src))
    sub.readme.write_text(render_readme(sub, model_src))
    print(f"wrote {out_dir}: Dockerfile, README.md, constraints.txt, budgetune/, model/")
    print(f"next: docker build -t budgetune-submission {out_dir}  (see {sub.readme})")
    return sub


def check_model_files(model_dir: Path) -> None:
    """The server needs weights and a tokenizer next to config.json; say which is missing."""
    missing = []
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise UserInputError(
            f"{model_dir}: not a complete model folder, missing {', '.join(missing)}"
        )


def pinned_constraints(base_image: str) -> list[str]:
    """pip constraints: serving libraries as installed here; torch as the base image has it."""
    lines = []
    for name in PINNED_PACKAGES:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    torch_version = base_image_torch(base_image)
    if torch_version is not None:
        needed = transformers_torch_requirement()
        if needed is not None and not needed.specifier.contains(torch_version, prereleases=True):
            raise UserInputError(
                f"--base-image {base_image}: its torch {torch_version} does not satisfy "
                f"transformers {importlib.metadata.version('transformers')} ({needed}); "
                "choose a newer pytorch/pytorch image"
            )
        # Never let pip replace the image's CUDA torch with a wheel from PyPI.
        lines.append(f"torch=={torch_version}")
    return lines


def base_image_torch(base_image: str) -> Version | None:
    """The torch version of an official `pytorch/pytorch:<version>-...` tag, else None."""
    m = re.fullmatch(r"(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+(?:\.\d+)?)-.*", base_image)
    return Version(m.group(1)) if m else None


def transformers_torch_requirement() -> Requirement | None:
    """The torch requirement transformers declares (for its `torch` extra), if any."""
    for spec in importlib.metadata.requires("transformers") or []:
        req = Requirement(spec)
        if req.name == "torch" and req.marker is not None and "torch" in str(req.marker):
            return Requirement(f"torch{req.specifier}")
    return None


def find_source_root() -> Path:
    """budgetune's project folder (pyproject.toml), from the installed package's location."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            project = tomllib.loads(pyproject.read_text()).get("project", {})
            if project.get("name") == "budgetune":
                return folder
    raise UserInputError(
        f"{here}: budgetune is not installed from its source folder (pyproject.toml not found); "
        "run export-submission from a source checkout (pip install -e .)"
    )


def copy_source(root: Path, dest: Path) -> Path:
    """Copy what `pip install` needs: pyproject, its readme, and every package folder."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    package_dirs = set(
        pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values()
    )
    readme = pyproject.get("project", {}).get("readme")
    files = ["pyproject.toml", *([readme] if isinstance(readme, str) else [])]
    files += [p.name for p in root.glob("LICENSE*") if p.is_file()]
    dest.mkdir(parents=True)
    for name in files:
        shutil.copy2(root / name, dest / name)
    for name in sorted(package_dirs):
        shutil.copytree(root / name, dest / name, ignore=IGNORED)
    return dest


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def render_dockerfile(base_image: str, model_src: Path) -> str:
    """The image: budgetune installed from the context, the model at /model, port 80."""
    cmd = '["budgetune", "serve", "/model", "--host", "0.0.0.0", "--port", "80"]'
    return f"""\
# NeurIPS 2023 LLM Efficiency Challenge submission, written by `budgetune export-submission`
# for the model in {model_src}. Build and test it locally: see README.md next to this file.
FROM {base_image}

ENV PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    HF_HUB_OFFLINE=1 \\
    TOKENIZERS_PARALLELISM=false

# budgetune from the source in this build context (no access to its repository needed).
# constraints.txt keeps the base image's CUDA torch and pins the serving libraries to the
# versions the export ran with. The import check fails the build, not the evaluation.
COPY constraints.txt /opt/budgetune/constraints.txt
COPY budgetune/ /opt/budgetune/src/
RUN pip install --constraint /opt/budgetune/constraints.txt /opt/budgetune/src \\
 && python -c "import budgetune.search.serve"

# The merged final model: a Hugging Face folder, loaded in bf16 on the GPU.
COPY model/ {IMAGE_MODEL_DIR}/
RUN python -c "from transformers import AutoConfig, AutoTokenizer; \\
AutoConfig.from_pretrained('{IMAGE_MODEL_DIR}'); AutoTokenizer.from_pretrained('{IMAGE_MODEL_DIR}')"

EXPOSE 80
HEALTHCHECK --start-period=600s --interval=30s \\
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:80/health')"
CMD {cmd}
"""


def render_readme(sub: Submission, model_src: Path) -> str:
    """How to build, run and check the image the way the challenge's evaluators did."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    pins = sub.constraints.read_text().strip().replace("\n", ", ")
    health = '\'{"prompt": "The capital of France is "}\''
    return f"""\
# Challenge submission

Written by `budgetune export-submission` on {when}, from the merged model in
`{model_src}`. This folder is a complete Docker build context; it needs no access to
budgetune's repository.

| path | what |
| --- | --- |
| `Dockerfile` | the image: `{sub.base_image}` + budgetune + the model, serving on port 80 |
| `model/` | the merged final model (Hugging Face folder), copied to `/model` in the image |
| `budgetune/` | budgetune's source, installed into the image with pip |
| `constraints.txt` | pinned versions: {pins} |

The server (`budgetune serve /model --host 0.0.0.0 --port 80`) answers the challenge's API:
`POST /process`, `POST /tokenize`, `POST /decode`, and `GET /health`.

## Build

```bash
docker build -t budgetune-submission .
```

The build downloads budgetune's dependencies from PyPI and checks that the server imports
and that the model's config and tokenizer load.

## Run on one GPU

```bash
docker run --rm --gpus all -p 8080:80 budgetune-submission
```

Loading takes a while for a large model; `docker ps` shows the container healthy when
`GET /health` answers.

## Test: the challenge's health check

```bash
curl -s -X POST http://localhost:8080/process \\
  -H "Content-Type: application/json" \\
  -d {health}
```

The answer is JSON: `text` (the completion, without the prompt), `tokens` (each with
`text`, `logprob`, and `top_logprob`, a map of the most likely token's text to its
log-probability), `logprob` (their sum) and `request_time` (seconds).

More checks:

```bash
# greedy (HELM sends temperature 1e-7 for 0), stopping at a newline
curl -s -X POST http://localhost:8080/process -H "Content-Type: application/json" \\
  -d '{{"prompt": "The capital of France is ", "temperature": 1e-7, "stop_sequences": ["\\n"]}}'
# multiple-choice scoring: the prompt's own log-probabilities, no new tokens
curl -s -X POST http://localhost:8080/process -H "Content-Type: application/json" \\
  -d '{{"prompt": "The capital of France is Paris", "echo_prompt": true, "max_new_tokens": 0}}'
# tokenize, then decode the ids back to the text
curl -s -X POST http://localhost:8080/tokenize -H "Content-Type: application/json" \\
  -d '{{"text": "The capital of France is "}}' \\
  | python3 -c 'import json,sys; print(json.dumps({{"tokens": json.load(sys.stdin)["tokens"]}}))' \\
  | curl -s -X POST http://localhost:8080/decode -H "Content-Type: application/json" -d @-
```

## Evaluate with HELM

HELM's HTTP model client (the challenge's `neurips/local` model) posts to
`http://localhost:8080` by default; set `HELM_HTTP_MODEL_BASE_URL` to point it elsewhere.
Start the container as above, then run HELM with the challenge's run specs.
"""
