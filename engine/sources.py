"""Reading instruction datasets: local JSON / JSONL / Parquet files or folders, or hub ids.

Every source is read as rows (dicts) in the real public schema it follows, then mapped onto
`Example`s. Rows carry a location ("line 12", "item 3", "row 7") so a bad row is reported as
`<path> line 12: ...` and the user can open the file at the right place.

Hub datasets keep the real `datasets.load_dataset(id, split=...)` path; offline and not cached
gives one line saying how to fetch it, never a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from budgetune.engine.config import SCHEMAS, SourceSpec
from budgetune.engine.errors import UserInputError
from budgetune.engine.template import Example

LOCAL_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Row = tuple[str, dict[str, Any]]
"""(location, row): location is `<path> line N` (JSONL), `item N` (JSON) or `row N` (Parquet)."""


def is_local(spec: SourceSpec) -> bool:
    """True when `spec.path` names an existing local file or folder."""
    return Path(spec.path).expanduser().exists()


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` or `name` without a file suffix: something `load_dataset` could fetch."""
    return bool(_HUB_ID.match(path)) and not path.endswith(LOCAL_SUFFIXES)


def local_files(path: Path) -> list[Path]:
    """The data files a local source is made of (a folder: its supported files, sorted).

    Folders are not searched recursively: a downloaded hub snapshot keeps train and
    validation splits side by side in subfolders, and silently mixing them would leak the
    validation set into training.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserInputError(f"{path}: folder has no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserInputError(
            f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})"
        )
    return [path]


def source_fingerprint(spec: SourceSpec) -> dict[str, Any]:
    """What identifies a source's content without reading it (for the tokenized-data cache).

    Local files are identified by resolved path, size and modification time, so an edited file
    is re-tokenized; hub datasets by id and split.
    """
    path = Path(spec.path).expanduser()
    if path.exists():
        files = local_files(path)
        return {
            "kind": "local",
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }
    return {"kind": "hub", "id": spec.path, "split": spec.split}


def read_rows(spec: SourceSpec) -> Iterator[Row]:
    """Every raw row of a source, with its location, in file order."""
    path = Path(spec.path).expanduser()
    if path.exists():
        for f in local_files(path):
            yield from _read_file(f)
    elif looks_like_hub_id(spec.path):
        yield from _read_hub(spec.path, spec.split)
    else:
        raise UserInputError(f"{spec.path}: no such file")


def _read_file(path: Path) -> Iterator[Row]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    else:
        yield from _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{where}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise UserInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise UserInputError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        where = f"{path} item {i}"
        if not isinstance(row, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserInputError(f"{path}: not a valid Parquet file: {e}") from None
    i = 0
    for batch in pfile.iter_batches():
        for row in batch.to_pylist():
            i += 1
            yield f"{path} row {i}", row


def _read_hub(dataset_id: str, split: str) -> Iterator[Row]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    fetch = (
        f"run `budgetune prepare` with network access, or "
        f"`huggingface-cli download --repo-type dataset {dataset_id}`"
    )
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except ConnectionError:
        raise UserInputError(
            f"{dataset_id}: no such file, and hub dataset not available offline ({fetch})"
        ) from None
    except DatasetNotFoundError:
        raise UserInputError(f"{dataset_id}: no such file or hub dataset") from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserInputError(f"{dataset_id}: hub dataset has no split {split!r}") from None
        raise
    for i, row in enumerate(ds, start=1):
        yield f"{dataset_id}[{split}] row {i}", row


# --- schemas -------------------------------------------------------------------------------


def _text(where: str, row: dict[str, Any], key: str, schema: str, required: bool = True) -> str:
    """A string field; a missing optional field or a null reads as empty."""
    if key not in row:
        if required:
            raise UserInputError(f"{where}: missing field {key!r} for schema {schema}")
        return ""
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserInputError(
            f"{where}: field {key!r} must be a string for schema {schema}, "
            f"got {type(value).__name__}"
        )
    return value


def _dolly(rows: Iterator[Row]) -> Iterator[Example]:
    for where, row in rows:
        yield Example(
            instruction=_text(where, row, "instruction", "dolly"),
            input=_text(where, row, "context", "dolly", required=False),
            response=_text(where, row, "response", "dolly"),
        )


def _alpaca(rows: Iterator[Row]) -> Iterator[Example]:
    for where, row in rows:
        yield Example(
            instruction=_text(where, row, "instruction", "alpaca"),
            input=_text(where, row, "input", "alpaca", required=False),
            response=_text(where, row, "output", "alpaca"),
        )


def _flan(rows: Iterator[Row]) -> Iterator[Example]:
    for where, row in rows:
        yield Example(
            instruction=_text(where, row, "inputs", "flan"),
            input="",
            response=_text(where, row, "targets", "flan"),
        )


def _usable(row: dict[str, Any]) -> bool:
    """oasst1 marks spam/abuse with deleted=True or review_result=False; neither is trained on."""
    return not row.get("deleted") and row.get("review_result") is not False


def _oasst1(rows: Iterator[Row]) -> Iterator[Example]:
    """English prompter messages (roots and follow-ups) with their best-ranked reply.

    oasst1 stores one message per row; replies point at their prompt through `parent_id`.
    Among a prompt's usable assistant replies the lowest `rank` wins (0 is best; an unranked
    reply loses to a ranked one, ties go to the earlier row). Prompts without a usable reply
    are skipped. Examples come out in the order the prompts appear.
    """
    prompts: list[tuple[str, str]] = []  # (message_id, text) of usable English prompter rows
    best: dict[str, tuple[float, int, str]] = {}  # parent_id -> (rank, row index, text)
    for index, (where, row) in enumerate(rows):
        message_id = _text(where, row, "message_id", "oasst1")
        role = _text(where, row, "role", "oasst1")
        text = _text(where, row, "text", "oasst1")
        if "parent_id" not in row:
            raise UserInputError(f"{where}: missing field 'parent_id' for schema oasst1")
        if role not in ("prompter", "assistant"):
            raise UserInputError(f"{where}: role {role!r} is neither prompter nor assistant")
        if not _usable(row):
            continue
        if role == "prompter":
            if _text(where, row, "lang", "oasst1") == "en":
                prompts.append((message_id, text))
            continue
        parent = row["parent_id"]
        if parent is None:
            continue
        rank = row.get("rank")
        # Unranked replies read as None from JSON and as NaN from some Parquet exports.
        unranked = rank is None or rank != rank
        key = (float("inf") if unranked else float(rank), index, text)
        if parent not in best or key[:2] < best[parent][:2]:
            best[parent] = key
    for message_id, text in prompts:
        if message_id in best:
            yield Example(instruction=text, input="", response=best[message_id][2])


def _lima(rows: Iterator[Row]) -> Iterator[Example]:
    """LIMA's `conversations`: alternating user and assistant turns, the user's first.

    The first exchange of each conversation is one example (as Lit-GPT's prepare_lima does
    by default); a conversation with no reply (LIMA's test split) has nothing to train on
    and is skipped.
    """
    for where, row in rows:
        turns = row.get("conversations")
        if not isinstance(turns, list):
            got = "missing" if turns is None else f"a {type(turns).__name__}"
            raise UserInputError(
                f"{where}: field 'conversations' must be a list of strings for schema lima, "
                f"got {got}"
            )
        if not all(isinstance(t, str) for t in turns):
            raise UserInputError(f"{where}: field 'conversations' holds a non-string turn")
        if len(turns) >= 2:
            yield Example(instruction=turns[0], input="", response=turns[1])


_PARSERS = {"dolly": _dolly, "alpaca": _alpaca, "oasst1": _oasst1, "flan": _flan, "lima": _lima}


def load_examples(spec: SourceSpec) -> list[Example]:
    """Read a source and map its rows onto `Example`s (at most `spec.limit` of them)."""
    if spec.schema not in _PARSERS:
        raise UserInputError(
            f"source {spec.name!r}: schema {spec.schema!r} is unknown (choose {', '.join(SCHEMAS)})"
        )
    if spec.limit is not None and spec.limit < 1:
        raise UserInputError(f"source {spec.name!r}: limit must be >= 1")
    examples: list[Example] = []
    for example in _PARSERS[spec.schema](read_rows(spec)):
        examples.append(example)
        if spec.limit is not None and len(examples) >= spec.limit:
            break
    if not examples:
        raise UserInputError(f"{spec.path}: no examples (schema {spec.schema})")
    return examples
