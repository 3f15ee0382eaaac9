"""The one entry point: `budgetune <command>`.

Each subcommand is a plain function that parses its arguments and calls into the module that
owns the work. User mistakes (`UserInputError`) print one line and exit 2; a run that was
interrupted exits 130; `--debug` shows tracebacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from budgetune.engine.errors import BudgetuneError, UserInputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Spend a fixed GPU budget on the best LoRA finetune of an open LLM.",
)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


# --- engine: one run ------------------------------------------------------------------


@app.command()
def train(
    study: Annotated[Path, typer.Argument(help="Study file (TOML): model, data, defaults.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. lr=1e-4")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Run directory.")] = None,
) -> None:
    """One finetune run with fixed hyperparameters (Lit-GPT 2023 defaults + overrides)."""
    from budgetune.search.commands import train as run

    run(study, overrides or [], out_dir)


@app.command()
def prepare(
    study: Annotated[Path, typer.Argument(help="Study file (TOML).")],
) -> None:
    """Download the model and datasets and build the tokenized cache ahead of time."""
    from budgetune.search.commands import prepare as run

    run(study)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Exported model folder, base model, or run dir.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Instruction to answer.")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="LoRA adapter folder.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 50,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the prompt template.")] = False,
) -> None:
    """Generate text from a prompt."""
    from budgetune.search.commands import generate as run

    run(model, prompt, adapter, max_new_tokens, temperature, top_k, raw)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter folder (or a run dir).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged HF folder.")],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (default: from the adapter).")
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base model and export a Hugging Face folder."""
    from budgetune.search.commands import merge as run

    run(adapter, out_dir, base)


# --- search: a budgeted study ---------------------------------------------------------


HEARTBEAT_OPTION = typer.Option(
    "--heartbeat-s", min=0.1, help="Seconds between heartbeats; silent 3 beats + 5 s = dead."
)


@app.command()
def launch(
    study: Annotated[Path, typer.Argument(help="Study file (TOML).")],
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run directory (default: the file's).")
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="SQLAlchemy URL (default: SQLite in run dir).")
    ] = None,
    heartbeat_s: Annotated[float, HEARTBEAT_OPTION] = 30.0,
) -> None:
    """Spend the study's budget: search trials, then train, eval and export the best one."""
    from budgetune.search.launch import launch as run

    run(study, run_dir, storage, heartbeat_s)


@app.command()
def resume(
    target: Annotated[str | None, typer.Argument(help="Run directory or storage URL.")] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (default: the only one).")
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Storage URL: join its study as a worker.")
    ] = None,
    heartbeat_s: Annotated[float, HEARTBEAT_OPTION] = 30.0,
) -> None:
    """Continue a stopped or crashed study, or join a running one as one more worker."""
    from budgetune.search.launch import resume as run

    run(target, study, storage, heartbeat_s)


@app.command()
def status(
    target: Annotated[str, typer.Argument(help="Run directory or storage URL.")],
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (default: the only one).")
    ] = None,
) -> None:
    """Budget spent and left, trials by state, best so far, estimated finish."""
    from budgetune.search.status import show_status

    print(show_status(target, study))


@app.command()
def plan(study: Annotated[Path, typer.Argument(help="Study file (TOML).")]) -> None:
    """The budget plan of a study file, without running anything."""
    from budgetune.search.plan import show_plan

    print(show_plan(str(study)))


@app.command()
def report(
    source: Annotated[str, typer.Argument(help="Run directory, study.db, or storage URL.")],
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (default: the only one).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML page (default: <run dir>/report.html).")
    ] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also export trials as CSV.")] = None,
    parquet: Annotated[
        Path | None, typer.Option("--parquet", help="Also export trials as Parquet.")
    ] = None,
) -> None:
    """Write one offline HTML page of a study (finished or running) and its trial table."""
    from budgetune.search.report import report_command as run

    run(source, study, out, csv, parquet)


@app.command("eval")
def eval_model(
    model_dir: Annotated[Path, typer.Argument(help="Exported Hugging Face model folder.")],
    tasks: Annotated[str, typer.Option("--tasks", help="lm-eval tasks, comma-separated.")],
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="Folder of local lm-eval task YAMLs (repeatable)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Examples per task.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write results as JSON.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    device: Annotated[str | None, typer.Option("--device", help="cuda, cpu, ...")] = None,
) -> None:
    """Evaluate an exported model with lm-eval (a finished model, or a baseline)."""
    from budgetune.search.evaluation import eval_command as run

    run(model_dir, tasks, include_path or [], limit, out, batch_size, device)


# --- submission: the challenge's HTTP API and its Docker image ----------------------------


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="Exported model folder, or a study run dir.")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8080,
) -> None:
    """Serve the model with the challenge's HTTP API (/process, /tokenize, /decode)."""
    from budgetune.search.serve import serve as run

    run(model, host, port)


@app.command("export-submission")
def export_submission(
    run_dir: Annotated[Path, typer.Argument(help="Study run dir (or exported model folder).")],
    out_dir: Annotated[Path, typer.Argument(help="Docker build context to write.")],
    base_image: Annotated[
        str | None, typer.Option("--base-image", help="CUDA PyTorch image to build on.")
    ] = None,
) -> None:
    """Write a Dockerfile + README that build an image serving the final model on port 80."""
    from budgetune.search.submission import export_submission as run

    run(run_dir, out_dir, base_image)


def main() -> None:
    """Console entry point: one clear line for user mistakes, tracebacks only with --debug."""
    try:
        # Outside standalone mode typer returns the exit code of a `typer.Exit` (Ctrl-C is
        # turned into Exit(130)) instead of exiting: pass it on.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                print("budgetune: interrupted", file=sys.stderr)
            sys.exit(code)
    except KeyboardInterrupt:
        print("budgetune: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserInputError as e:
        if _state["debug"]:
            raise
        print(f"budgetune: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BudgetuneError as e:
        if _state["debug"]:
            raise
        print(f"budgetune: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        # Usage errors from typer's bundled click: show them as click would, with its exit code.
        name = type(e).__name__
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            print("budgetune: interrupted", file=sys.stderr)
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()
