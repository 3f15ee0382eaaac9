"""Serve a merged model over the HTTP API of the NeurIPS 2023 LLM Efficiency Challenge.

The challenge scored submissions with HELM, whose HTTP client posts to `/process` (and
`/tokenize`); the schemas below are those of the challenge's sample submission (Lit-GPT's
`main.py`/`api.py`), plus the extra fields HELM sends. `budgetune serve` and the Docker image
that `export-submission` writes both run this module.

Choices where the reference is silent or wrong, so HELM's scores mean what they should:

- Prompts go to the model raw (HELM sends complete prompts; no instruction template),
  encoded as `/tokenize` encodes them (with BOS when the tokenizer adds one; not truncated).
- Every `logprob` and `top_logprob` comes from the model's own distribution (log-softmax
  of the raw logits, temperature 1, before top-k/top-p). The reference used the
  temperature-scaled, top-k-truncated distribution, which at HELM's temperature 1e-7 makes
  every log-probability 0 (and -inf outside the top k), useless for likelihood scoring.
- `echo_prompt`: the prompt's tokens come first, token i with log P(t_i | t_<i); the first
  token has no context, so it gets logprob 0.0 and an empty `top_logprob` (as HELM's own
  HuggingFace client does). `text` then begins with the prompt exactly as sent.
- Temperature <= 1e-5 is greedy (HELM sends 1e-7 for 0); otherwise tokens are sampled
  after temperature, top-k (0 disables) and top-p, from a `torch.Generator` seeded with
  `seed` (a fresh random seed when it is None), so a seed makes a request reproducible.
- Generation stops at the model's EOS token (kept in `tokens`: its probability is part of
  the sequence's; left out of `text`), at the first stop sequence (text cut before it;
  tokens kept up to the one that reaches the cut, as HELM's own truncation keeps them), at
  `max_new_tokens`, or when the model's context is full.
- One sequence per request: the response schema holds one (as in the reference), so
  `num_samples`/`num_return_sequences` are accepted but must be 1 or more and are not used.
- One request at a time touches the model (a lock); concurrent requests wait their turn in
  the server's thread pool. `request_time` counts the model work, not the wait.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from budgetune.engine.errors import UserInputError

GREEDY_TEMPERATURE = 1e-5
"""At or below this temperature decoding is greedy (HELM maps temperature 0 to 1e-7)."""
DETOKENIZE_WINDOW = 6
"""Tokens of left context used to render one token's text (leading spaces, split bytes)."""

log = logging.getLogger(__name__)


# --- the challenge's schemas ------------------------------------------------------------


class ProcessRequest(BaseModel):
    """POST /process: the reference's fields and defaults, plus the ones HELM sends."""

    prompt: str
    num_samples: int = Field(1, ge=1)
    max_new_tokens: int = Field(50, ge=0)
    top_k: int = Field(200, ge=0)
    """Sample among the k most likely tokens; 0 disables the cut."""
    temperature: float = Field(0.8, ge=0.0)
    seed: int | None = None
    echo_prompt: bool | None = False
    num_return_sequences: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k_per_token: int = Field(1, ge=1, le=100)
    """How many alternatives each token's `top_logprob` lists (HELM's name)."""
    stop_sequences: list[str] = Field(default_factory=list)


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    """Sum of the returned tokens' log-probabilities."""
    request_time: float


class TokenizeRequest(BaseModel):
    text: str
    truncation: bool = True
    max_length: int = Field(2048, ge=1)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(BaseModel):
    tokens: list[int]


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class InvalidRequest(ValueError):
    """A well-formed request this model cannot answer (a prompt longer than its context)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


# --- where the model is ---------------------------------------------------------------


def resolve_model_dir(path: Path) -> Path:
    """Accept an exported Hugging Face folder or a study run dir holding `final/export`."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    export = path / "final" / "export"
    if (export / "config.json").is_file():
        return export
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    raise UserInputError(
        f"{path}: neither a model folder (config.json) nor a run directory "
        "(final/export/config.json)"
    )


# --- the model, one request at a time ---------------------------------------------------


@dataclass
class _Generated:
    ids: list[int]
    logprobs: list[float]
    tops: list[dict[int, float]]
    """Per generated token: the top alternatives (token id -> log-probability)."""


class ModelRunner:
    """One loaded model and tokenizer; every public method holds the lock for its work."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()
        self._keep_arg = "logits_to_keep" in _forward_params(model)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = {eos} if isinstance(eos, int) else set(eos or [])
        cfg = model.config
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )

    @classmethod
    def load(cls, model_dir: Path, device: str | None = None) -> ModelRunner:
        """Load with plain transformers: CUDA in bf16 when there is a GPU, else CPU fp32."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        return cls(model, tokenizer, name=str(model_dir))

    # -- endpoints' work

    def process(self, req: ProcessRequest) -> ProcessResponse:
        with self._lock:
            t0 = time.perf_counter()
            response = self._process(req)
            response.request_time = time.perf_counter() - t0
        return response

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        with self._lock:
            t0 = time.perf_counter()
            ids = self.tokenizer(req.text, truncation=req.truncation, max_length=req.max_length)
            return TokenizeResponse(tokens=ids["input_ids"], request_time=time.perf_counter() - t0)

    def decode(self, req: DecodeRequest) -> DecodeResponse:
        vocab = len(self.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest("tokens", f"token ids {bad[:5]} are outside [0, {vocab})")
        with self._lock:
            t0 = time.perf_counter()
            # Special tokens (BOS) are dropped, as the reference's sentencepiece decode did,
            # so /decode(/tokenize(text)) gives the text back.
            text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
            return DecodeResponse(text=text, request_time=time.perf_counter() - t0)

    # -- generation

    def _process(self, req: ProcessRequest) -> ProcessResponse:
        prompt_ids: list[int] = self.tokenizer(req.prompt)["input_ids"]
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt encodes to no tokens")
        room = req.max_new_tokens
        if self.max_positions is not None:
            if len(prompt_ids) > self.max_positions:
                raise InvalidRequest(
                    "prompt",
                    f"the prompt is {len(prompt_ids)} tokens; the model's context is "
                    f"{self.max_positions}",
                )
            room = min(room, self.max_positions - len(prompt_ids))
        echo = bool(req.echo_prompt)
        ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            keep = {} if echo or not self._keep_arg else {"logits_to_keep": 1}
            out = self.model(input_ids=ids, use_cache=True, **keep)
            k = req.top_k_per_token
            tokens = self._prompt_tokens(prompt_ids, out.logits[0], k) if echo else []
            gen = self._generate(req, prompt_ids, out.cache, out.logits[0, -1], room)

        seq = prompt_ids + gen.ids
        n_prompt = len(prompt_ids)
        for i, (lp, top) in enumerate(zip(gen.logprobs, gen.tops), start=n_prompt):
            context = seq[max(0, i - DETOKENIZE_WINDOW) : i]
            tokens.append(self._token(context, seq[i], lp, top))
        text = self._completion_text(prompt_ids, gen.ids)
        if req.stop_sequences:
            # Special tokens are absent from `text`, so they take no room before the cut.
            special = set(self.tokenizer.all_special_ids)
            generated = tokens[len(tokens) - len(gen.ids) :]
            pieces = ["" if i in special else t.text for i, t in zip(gen.ids, generated)]
            text, n_keep = _cut_at_stop(text, pieces, req.stop_sequences)
            del tokens[len(tokens) - len(gen.ids) + n_keep :]
        if echo:
            text = req.prompt + text
        return ProcessResponse(
            text=text, tokens=tokens, logprob=sum(t.logprob for t in tokens), request_time=0.0
        )

    def _generate(
        self,
        req: ProcessRequest,
        prompt_ids: list[int],
        cache: Any,
        logits: torch.Tensor,
        room: int,
    ) -> _Generated:
        """Decode up to `room` tokens after the prompt, reusing the prompt's KV cache."""
        greedy = req.temperature <= GREEDY_TEMPERATURE
        generator = torch.Generator(device=self.device)
        if req.seed is None:
            generator.seed()
        else:
            generator.manual_seed(req.seed)
        stops = [s for s in req.stop_sequences if s]
        gen = _Generated([], [], [])
        for step in range(room):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            if greedy:
                tid = int(torch.argmax(logprobs))
            else:
                tid = _sample(logits.float(), req.temperature, req.top_k, req.top_p, generator)
            gen.ids.append(tid)
            gen.logprobs.append(float(logprobs[tid]))
            gen.tops.append(_top(logprobs, req.top_k_per_token))
            if tid in self.eos_ids or step == room - 1:
                break
            if stops and any(s in self._completion_text(prompt_ids, gen.ids) for s in stops):
                break
            ids = torch.tensor([[tid]], device=self.device)
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[0, -1]
        return gen

    def _prompt_tokens(self, prompt_ids: list[int], logits: torch.Tensor, k: int) -> list[Token]:
        """Token i's log-probability is read from the logits at position i - 1."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(prompt_ids[1:], device=logprobs.device)[:, None]
        chosen = logprobs[:-1].gather(1, targets)[:, 0].tolist()
        tokens = [Token(text=self._piece([], prompt_ids[0]), logprob=0.0, top_logprob={})]
        for i in range(1, len(prompt_ids)):
            context = prompt_ids[max(0, i - DETOKENIZE_WINDOW) : i]
            top = _top(logprobs[i - 1], k)
            tokens.append(self._token(context, prompt_ids[i], chosen[i - 1], top))
        return tokens

    def _token(self, context: list[int], tid: int, logprob: float, top: dict[int, float]) -> Token:
        """A token and its top alternatives, each rendered after the same left context."""
        named: dict[str, float] = {}
        for cand, lp in top.items():
            text = self._piece(context, cand)
            named[text] = max(lp, named.get(text, float("-inf")))
        return Token(text=self._piece(context, tid), logprob=logprob, top_logprob=named)

    # -- text

    def _completion_text(self, prompt_ids: list[int], gen_ids: list[int]) -> str:
        """Decode after the prompt's last tokens: sentencepiece drops a text's leading space."""
        context = prompt_ids[-DETOKENIZE_WINDOW:]
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        full = self.tokenizer.decode(context + gen_ids, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
        return self.tokenizer.decode(gen_ids, skip_special_tokens=True)

    def _piece(self, context: list[int], tid: int) -> str:
        """One token's text after a few tokens of context (keeps leading spaces intact)."""
        if not context:
            return self.tokenizer.decode([tid])
        head = self.tokenizer.decode(context)
        full = self.tokenizer.decode(context + [tid])
        return full[len(head) :] if full.startswith(head) else self.tokenizer.decode([tid])


def _top(logprobs: torch.Tensor, k: int) -> dict[int, float]:
    values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return {int(i): float(v) for i, v in zip(indices.tolist(), values.tolist())}


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """Temperature, then top-k, then nucleus (top-p) filtering, then one multinomial draw."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cut_at_stop(text: str, pieces: list[str], stops: list[str]) -> tuple[str, int]:
    """Cut `text` before its first stop sequence; keep the tokens needed to reach the cut."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return text, len(pieces)
    cut = min(cuts)
    n_keep, length = 0, 0
    while n_keep < len(pieces) and length < cut:
        length += len(pieces[n_keep])
        n_keep += 1
    return text[:cut], n_keep


def _forward_params(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


# --- the app ----------------------------------------------------------------------------


def create_app(runner: ModelRunner) -> FastAPI:
    """The challenge's endpoints on one runner.

    Handlers are plain `def`s, so FastAPI runs them in its thread pool: a long generation
    holds the runner's lock, the others wait for it, and the event loop stays free (health
    checks answer while a request is being generated).
    """
    app = FastAPI(title="budgetune submission server")

    def invalid(e: InvalidRequest, value: Any) -> RequestValidationError:
        return RequestValidationError(
            [{"type": "value_error", "loc": ("body", e.field), "msg": str(e), "input": value}]
        )

    @app.post("/process")
    def process(req: ProcessRequest) -> ProcessResponse:
        try:
            return runner.process(req)
        except InvalidRequest as e:
            raise invalid(e, getattr(req, e.field)) from e

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        return runner.tokenize(req)

    @app.post("/decode")
    def decode(req: DecodeRequest) -> DecodeResponse:
        try:
            return runner.decode(req)
        except InvalidRequest as e:
            raise invalid(e, req.tokens) from e

    @app.get("/health")
    def health() -> dict[str, str]:
        return {
            "status": "ok",
            "model": runner.name,
            "device": str(runner.device),
            "dtype": str(next(runner.model.parameters()).dtype).removeprefix("torch."),
        }

    return app


def serve(path: Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """`budgetune serve`: load the model once, then answer until interrupted."""
    import uvicorn

    model_dir = resolve_model_dir(path)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    runner = ModelRunner.load(model_dir)
    dtype = next(runner.model.parameters()).dtype
    log.info("serving %s on %s (%s) at http://%s:%d", model_dir, runner.device, dtype, host, port)
    uvicorn.run(create_app(runner), host=host, port=port, log_level="info")
