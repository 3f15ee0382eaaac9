"""The engine's data layer: tokenized sources, an on-disk cache, and the mixture sampler.

Flow: `SourceSpec` -> `load_examples` (engine/sources.py) -> Alpaca template -> tokens, cached
on disk so a search that runs fifty trials over the same datasets tokenizes each one once ->
`MixtureSampler` draws length-grouped micro-batches by the trial's mix weights ->
`collate`. The validation set goes through `validation_batches`, which ignores the mix, so
every trial of a study is scored on the same tokens.

Tokenization follows Lit-GPT's `prepare_sample`: the prompt and prompt+response are encoded
separately (with the tokenizer's own BOS handling), EOS is appended to the latter, and with
`mask_prompt` the first len(prompt) labels are -100. Labels are *not* shifted; the model (or
the loss) shifts them, as Hugging Face causal LMs do when given `labels`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from budgetune.engine.config import RunConfig, SourceSpec
from budgetune.engine.errors import UserInputError
from budgetune.engine.sources import load_examples, source_fingerprint
from budgetune.engine.template import TEMPLATE_VERSION, Example, format_prompt

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "MixtureSampler",
    "TokenizedSource",
    "collate",
    "default_cache_dir",
    "format_prompt",
    "load_examples",
    "pad_id_for",
    "prepare_data",
    "tokenize_source",
    "tokenizer_fingerprint",
    "validation_batches",
]

IGNORE_INDEX = -100
"""Label value the cross-entropy loss skips (PyTorch's and Hugging Face's default)."""
CACHE_FORMAT = 1
"""Bump when the cache file layout changes."""
_CHUNK = 1024


@dataclass
class TokenizedSource:
    """One source, tokenized and truncated: what the sampler draws from."""

    name: str
    input_ids: list[torch.Tensor]
    """1-D int64 each: prompt + response + EOS, truncated to max_seq_length."""
    labels: list[torch.Tensor]
    """Same shapes; -100 on prompt tokens when masked. Without masking these are the very
    tensors in `input_ids` (no copy): treat both as read-only."""
    n_truncated: int
    """Examples kept but cut to max_seq_length (their EOS, maybe part of the response, lost)."""
    n_prompt_too_long: int
    """Examples dropped because the prompt alone filled max_seq_length."""
    cache_file: Path | None = None
    """The cache file this came from or was written to."""
    from_cache: bool = False
    """True when loaded from the cache without calling the tokenizer."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        """Tokens in the source after truncation (no padding)."""
        return sum(len(t) for t in self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.input_ids]


# --- tokenization and cache ----------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "budgetune" / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides which ids a text becomes.

    Fast tokenizers are hashed through their full `tokenizer.json` (vocab, merges,
    normalizer, pre-tokenizer, post-processor: BOS handling lives there), minus the
    truncation/padding state that calling the tokenizer may toggle. Others fall back to their
    vocabulary and special tokens.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(spec: SourceSpec, tokenizer: Any) -> dict[str, Any]:
    """What the cached tokens depend on.

    max_seq_length and mask_prompt are deliberately absent: the cache holds untruncated ids
    and prompt lengths, and both are applied on load, so trials that differ only in those
    share one tokenization.
    """
    return {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": source_fingerprint(spec),
        "schema": spec.schema,
        "template": TEMPLATE_VERSION,
        "limit": spec.limit,
    }


def _cache_file(spec: SourceSpec, key: dict[str, Any], cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec.path).name)
    return cache_dir / f"{spec.schema}-{stem[:40]}-{digest}.pt"


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        # No attention mask: every id is real here, and building the masks costs a third.
        enc = tokenizer(
            texts[start : start + _CHUNK],
            add_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )
        out.extend(enc["input_ids"])
    return out


def _tokenize_examples(examples: list[Example], tokenizer: Any, where: str) -> dict[str, Any]:
    """Untruncated ids (int32, concatenated), lengths and prompt lengths of every example."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserInputError(f"{where}: the tokenizer has no EOS token to end responses with")
    prompts = [format_prompt(e) for e in examples]
    prompt_ids = _encode(tokenizer, prompts)
    full_ids = _encode(tokenizer, [p + e.response for p, e in zip(prompts, examples)])
    flat: list[int] = []
    lengths, prompt_lengths = [], []
    for p, f in zip(prompt_ids, full_ids):
        # A tokenizer whose post-processor already appends EOS would otherwise count it as
        # prompt and end every example with two.
        if p and p[-1] == eos:
            p = p[:-1]
        if f and f[-1] == eos:
            f = f[:-1]
        flat.extend(f)
        flat.append(eos)
        lengths.append(len(f) + 1)
        prompt_lengths.append(len(p))
    return {
        "ids": torch.tensor(flat, dtype=torch.int32),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.int64),
    }


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder and rename, so a crash never leaves half a file
    that a later run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached tensors, or None when absent, unreadable or written under another key."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # a damaged cache file is rebuilt, never fatal
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)):
        return None
    return data


def tokenize_source(
    spec: SourceSpec,
    tokenizer: Any,
    max_seq_length: int,
    mask_prompt: bool = False,
    cache_dir: Path | None = None,
) -> TokenizedSource:
    """Tokenize a source (or load its cached tokens) and truncate it to `max_seq_length`.

    Examples whose prompt alone reaches `max_seq_length` leave no room for a response token:
    they are dropped and counted in `n_prompt_too_long` rather than trained on as prompt-only
    rows. A source left with no examples is a user error naming the file.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(spec, tokenizer)
    path = _cache_file(spec, key, cache_dir)
    data = _load_cached(path, key)
    from_cache = data is not None
    if data is None:
        examples = load_examples(spec)
        data = {"key": key, **_tokenize_examples(examples, tokenizer, spec.path)}
        _save_atomic(data, path)

    lengths: list[int] = data["lengths"].tolist()
    prompt_lengths: list[int] = data["prompt_lengths"].tolist()
    pieces = torch.split(data["ids"].to(torch.int64), lengths)
    input_ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n_truncated = n_prompt_too_long = 0
    for ids, n_prompt in zip(pieces, prompt_lengths):
        if n_prompt >= max_seq_length:
            n_prompt_too_long += 1
            continue
        if len(ids) > max_seq_length:
            n_truncated += 1
            ids = ids[:max_seq_length]
        input_ids.append(ids)
        if mask_prompt:
            lab = ids.clone()
            lab[:n_prompt] = IGNORE_INDEX
            labels.append(lab)
        else:
            labels.append(ids)
    if not input_ids:
        raise UserInputError(
            f"{spec.path}: every prompt is at least max_seq_length={max_seq_length} tokens "
            f"(schema {spec.schema})"
        )
    return TokenizedSource(
        name=spec.name,
        input_ids=input_ids,
        labels=labels,
        n_truncated=n_truncated,
        n_prompt_too_long=n_prompt_too_long,
        cache_file=path,
        from_cache=from_cache,
    )


# --- batching ------------------------------------------------------------------------------


def pad_id_for(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's PAD, else EOS (Llama has no PAD), else 0.

    Padded positions are masked in `attention_mask` and -100 in `labels`, so the choice only
    has to be a valid embedding row.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(
    samples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs to the longest one in the batch."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.int64)
    for row, (ids, lab) in enumerate(samples):
        n = len(ids)
        input_ids[row, :n] = ids
        labels[row, :n] = lab
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _seed_for(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() changes between processes)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _normalize(
    sources: list[TokenizedSource], weights: dict[str, float] | None
) -> dict[str, float]:
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    if weights is None:
        raw = {s.name: float(len(s)) for s in sources}
    else:
        unknown = sorted(n for n, w in weights.items() if n not in names and w > 0)
        if unknown:
            raise ValueError(f"weights name sources that were not given: {', '.join(unknown)}")
        raw = {n: float(weights.get(n, 0.0)) for n in names}
    if any(w < 0 for w in raw.values()):
        raise ValueError(f"weights must be >= 0, got {raw}")
    for s in sources:
        if raw[s.name] > 0 and len(s) == 0:
            raise ValueError(f"source {s.name!r} has weight {raw[s.name]} but no examples")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("weights must give at least one source a positive weight")
    return {n: w / total for n, w in raw.items()}


class MixtureSampler:
    """An endless stream of length-grouped micro-batches drawn from sources by weight.

    Batches come in pools of `pool_batches` micro-batches. Each pool draws its examples by a
    per-source quota (systematic sampling, so every pool holds each source's share up to one
    example, rather than a multinomial's noise), sorts them by length so each micro-batch
    holds similar lengths and little compute goes to padding, then shuffles the order of its
    micro-batches so the loss does not see a length ramp.

    Each source is read in a fresh random order per epoch, derived from (seed, name, epoch)
    alone: trials with different mixes see the same order of each source. Pool k uses a
    generator seeded from (seed, k), so the state to resume exactly is a few counters.
    """

    def __init__(
        self,
        sources: list[TokenizedSource],
        weights: dict[str, float] | None,
        micro_batch: int,
        pad_id: int,
        seed: int,
        pool_batches: int = 32,
    ) -> None:
        if micro_batch < 1 or pool_batches < 1:
            raise ValueError("micro_batch and pool_batches must be >= 1")
        self.sources = sources
        self.micro_batch = micro_batch
        self.pad_id = pad_id
        self.seed = seed
        self.pool_batches = pool_batches
        self._mixture = _normalize(sources, weights)
        self._active = [i for i, s in enumerate(sources) if self._mixture[s.name] > 0]
        self._cursors: dict[str, list[int]] = {s.name: [0, 0] for s in sources}  # [epoch, pos]
        self._pool_start = copy.deepcopy(self._cursors)
        self._pool_index = 0
        self._batch_index = 0
        self._pool: list[list[tuple[int, int]]] | None = None
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}
        self._served = {s.name: 0 for s in sources}
        self._n_tokens = 0
        self._n_pad_tokens = 0

    @property
    def mixture(self) -> dict[str, float]:
        """Normalized weights actually used (0.0 for excluded sources)."""
        return dict(self._mixture)

    @property
    def padding_fraction(self) -> float:
        """Share of the batch tensors served so far that is padding."""
        total = self._n_tokens + self._n_pad_tokens
        return self._n_pad_tokens / total if total else 0.0

    @property
    def n_served(self) -> dict[str, int]:
        """Examples served per source so far: the mix as trained, not as asked."""
        return dict(self._served)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            self._build_pool()
        elif self._batch_index >= len(self._pool):
            self._pool_index += 1
            self._build_pool()
        assert self._pool is not None
        picks = self._pool[self._batch_index]
        self._batch_index += 1
        samples = [(self.sources[i].input_ids[j], self.sources[i].labels[j]) for i, j in picks]
        batch = collate(samples, self.pad_id)
        n_real = int(batch["attention_mask"].sum())
        self._n_tokens += n_real
        self._n_pad_tokens += batch["attention_mask"].numel() - n_real
        for i, _ in picks:
            self._served[self.sources[i].name] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Counters only (the pool is rebuilt from them): JSON-serializable and small."""
        return {
            "seed": self.seed,
            "micro_batch": self.micro_batch,
            "pool_batches": self.pool_batches,
            "mixture": {n: round(w, 12) for n, w in self._mixture.items()},
            "pool_index": self._pool_index,
            "batch_index": self._batch_index if self._pool is not None else 0,
            "pool_start": copy.deepcopy(self._pool_start),
            "served": dict(self._served),
            "n_tokens": self._n_tokens,
            "n_pad_tokens": self._n_pad_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume so that the next batch is the one the saved run would have drawn next."""
        mine = self.state_dict()
        for field in ("seed", "micro_batch", "pool_batches"):
            if state[field] != mine[field]:
                raise ValueError(
                    f"sampler state has {field}={state[field]}, this run {mine[field]}"
                )
        if set(state["pool_start"]) != set(self._cursors):
            raise ValueError(
                f"sampler state is for sources {sorted(state['pool_start'])}, "
                f"this run has {sorted(self._cursors)}"
            )
        if any(abs(state["mixture"][n] - w) > 1e-9 for n, w in self._mixture.items()):
            raise ValueError(
                f"sampler state has mixture {state['mixture']}, this run {mine['mixture']}"
            )
        self._cursors = {n: [int(e), int(p)] for n, (e, p) in state["pool_start"].items()}
        self._pool_index = int(state["pool_index"])
        self._build_pool()
        self._batch_index = int(state["batch_index"])
        self._served = {n: int(v) for n, v in state["served"].items()}
        self._n_tokens = int(state["n_tokens"])
        self._n_pad_tokens = int(state["n_pad_tokens"])

    def _take(self, i: int) -> int:
        """The next example index of source i, starting a new shuffled epoch when one ends."""
        src = self.sources[i]
        cursor = self._cursors[src.name]
        if cursor[1] >= len(src):
            cursor[0] += 1
            cursor[1] = 0
        epoch = cursor[0]
        cached = self._orders.get(src.name)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(_seed_for(self.seed, "epoch", src.name, epoch))
            cached = (epoch, torch.randperm(len(src), generator=g))
            self._orders[src.name] = cached
        index = int(cached[1][cursor[1]])
        cursor[1] += 1
        return index

    def _quota(self, n: int, g: torch.Generator) -> list[int]:
        """Examples per active source in a pool of n: floor of the share, plus the fractional
        remainders placed by systematic sampling (each source gets exactly its expected
        share on average, and never more than one off)."""
        shares = torch.tensor(
            [self._mixture[self.sources[i].name] for i in self._active], dtype=torch.float64
        )
        expected = shares * n
        counts = torch.floor(expected)
        remaining = n - int(counts.sum())
        if remaining > 0:
            order = torch.randperm(len(self._active), generator=g)
            cumulative = torch.cumsum((expected - counts)[order], 0)
            points = torch.rand(1, generator=g, dtype=torch.float64) + torch.arange(remaining)
            hits = torch.searchsorted(cumulative, points, right=True).clamp(max=len(order) - 1)
            for h in hits.tolist():
                counts[order[h]] += 1
        return [int(c) for c in counts]

    def _build_pool(self) -> None:
        self._pool_start = copy.deepcopy(self._cursors)
        g = torch.Generator().manual_seed(_seed_for(self.seed, "pool", self._pool_index))
        n = self.pool_batches * self.micro_batch
        picks = [
            (i, self._take(i))
            for i, count in zip(self._active, self._quota(n, g))
            for _ in range(count)
        ]
        tiebreak = torch.rand(len(picks), generator=g).tolist()
        lengths = [len(self.sources[i].input_ids[j]) for i, j in picks]
        order = sorted(range(len(picks)), key=lambda k: (lengths[k], tiebreak[k]))
        batches = [
            [picks[k] for k in order[start : start + self.micro_batch]]
            for start in range(0, len(order), self.micro_batch)
        ]
        self._pool = [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]
        self._batch_index = 0


def validation_batches(
    val: TokenizedSource,
    micro_batch: int,
    pad_id: int,
    max_batches: int | None = None,
    *,
    max_examples: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The fixed validation micro-batches: the same for every mix and seed.

    The examples used are the first ones in file order (a fixed subset, not the shortest):
    at most `max_batches * micro_batch` and at most `max_examples`. Within that subset they
    are sorted by length so little of the eval's compute goes to padding.

    When trials differ in micro_batch, pass `max_examples` (not `max_batches`) so every
    trial is scored on the same examples, and average the loss over tokens, not batches.
    """
    if micro_batch < 1:
        raise ValueError("micro_batch must be >= 1")
    n = len(val)
    if max_batches is not None:
        n = min(n, max_batches * micro_batch)
    if max_examples is not None:
        n = min(n, max_examples)
    order = sorted(range(n), key=lambda k: (len(val.input_ids[k]), k))
    return [
        collate([(val.input_ids[k], val.labels[k]) for k in order[s : s + micro_batch]], pad_id)
        for s in range(0, n, micro_batch)
    ]


def prepare_data(
    config: RunConfig, tokenizer: Any
) -> tuple[list[TokenizedSource], TokenizedSource]:
    """Tokenize (or load from the cache) every training source of a run, and its val set.

    Sources the run's weights give 0 are skipped: a trial that does not train on a hub
    dataset should not have to fetch or tokenize it.
    """
    kwargs = {
        "max_seq_length": config.max_seq_length,
        "mask_prompt": config.mask_prompt,
        "cache_dir": config.cache_dir,
    }
    weights = config.weights
    train = [
        tokenize_source(spec, tokenizer, **kwargs)
        for spec in config.sources
        if weights is None or weights.get(spec.name, 0.0) > 0
    ]
    val = tokenize_source(config.val, tokenizer, **kwargs)
    return train, val
