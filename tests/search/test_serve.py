"""The submission server over real HTTP: a uvicorn server on localhost, called with httpx.

The model is the quickstart's shipped tiny model when it is there, else a tiny random Llama
with a byte-level BPE tokenizer built in a temporary folder (same shapes of files).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from budgetune.engine.errors import UserInputError
from budgetune.search.serve import ModelRunner, ProcessRequest, create_app, resolve_model_dir

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "studies" / "quickstart" / "model"
HEALTH_CHECK = {"prompt": "The capital of France is "}
"""The request the challenge's evaluation script sent to check a submission was up."""
PROMPTS = ["The capital of France is ", "Question: what is 3 plus 4?\nAnswer:"]


def build_tiny_model(folder: Path, max_positions: int = 256) -> Path:
    """A random Llama + byte-level BPE tokenizer (BOS prepended), saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The capital of France is Paris.", "Question: what is 3 plus 4? Answer: 7"]
    tok.train_from_iterator(corpus * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_positions,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (SHIPPED_MODEL / "config.json").is_file() and any(SHIPPED_MODEL.glob("*.safetensors")):
        return SHIPPED_MODEL
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


class LocalServer:
    """uvicorn in a background thread on a socket bound before it starts (no port race)."""

    def __init__(self, app: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[torch.nn.Module, object]:
    """The same model loaded independently, to compute expected answers directly."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(runner: ModelRunner) -> Iterator[httpx.Client]:
    with LocalServer(create_app(runner)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            yield c


def post(client: httpx.Client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def direct_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1, from one full forward pass (no cache)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_process_equals_model_generate(client, reference, prompt):
    model, tokenizer = reference
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
    expected = out[0, len(ids) :].tolist()

    # HELM sends temperature 0 as 1e-7: both must be greedy.
    for temperature in (0.0, 1e-7):
        got = post(
            client, "/process", {"prompt": prompt, "temperature": temperature, "max_new_tokens": 12}
        )
        assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert len(got["tokens"]) == len(expected)
        # Each token's logprob is the raw model's, recomputed here without a KV cache.
        want = direct_logprobs(model, ids + expected)[len(ids) - 1 :]
        assert [t["logprob"] for t in got["tokens"]] == pytest.approx(want.tolist(), abs=1e-4)
        assert got["logprob"] == pytest.approx(float(want.sum()), abs=1e-3)
        # Greedy picks the most likely token, so it is its own top-1 alternative.
        for t in got["tokens"]:
            assert t["top_logprob"] == {t["text"]: pytest.approx(t["logprob"])}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_process_equals_the_engine_generation(client, reference, prompt):
    from budgetune.engine.export import generate_text

    model, tokenizer = reference
    # Raw prompts: HELM sends complete prompts, so no instruction template on either side.
    want = generate_text(model, tokenizer, prompt, max_new_tokens=12, template=False)
    got = post(client, "/process", {"prompt": prompt, "temperature": 0, "max_new_tokens": 12})
    assert got["text"] == want


def test_echo_prompt_logprobs_equal_log_softmax(client, reference):
    model, tokenizer = reference
    prompt = "The capital of France is Paris"
    ids = tokenizer(prompt)["input_ids"]
    got = post(client, "/process", {"prompt": prompt, "echo_prompt": True, "max_new_tokens": 0})

    assert got["text"] == prompt
    # HELM counts conditioning tokens with /tokenize, so echo must return exactly those.
    assert (
        len(got["tokens"]) == len(post(client, "/tokenize", {"text": prompt})["tokens"]) == len(ids)
    )
    # The first token has no context: logprob 0 and no alternatives.
    assert got["tokens"][0] == {
        "text": tokenizer.decode(ids[:1]),
        "logprob": 0.0,
        "top_logprob": {},
    }
    want = direct_logprobs(model, ids)
    assert [t["logprob"] for t in got["tokens"][1:]] == pytest.approx(want.tolist(), abs=1e-4)
    assert got["logprob"] == pytest.approx(float(want.sum()), abs=1e-3)
    # Token texts rebuild the prompt (after the BOS token).
    assert "".join(t["text"] for t in got["tokens"][1:]) == prompt


def test_echo_with_generation_prepends_the_prompt(client):
    prompt = PROMPTS[1]
    plain = post(client, "/process", {"prompt": prompt, "temperature": 0, "max_new_tokens": 6})
    echo = post(
        client,
        "/process",
        {"prompt": prompt, "temperature": 0, "max_new_tokens": 6, "echo_prompt": True},
    )
    assert echo["text"] == prompt + plain["text"]
    generated = echo["tokens"][-len(plain["tokens"]) :]
    assert [t["text"] for t in generated] == [t["text"] for t in plain["tokens"]]
    # The echoed run computes the same logits over a longer input: equal up to float noise.
    for got, want in zip(generated, plain["tokens"]):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
    n_prompt = len(echo["tokens"]) - len(plain["tokens"])
    assert n_prompt == len(post(client, "/tokenize", {"text": prompt})["tokens"])


def test_seed_makes_sampling_reproducible(client):
    body = {"prompt": HEALTH_CHECK["prompt"], "temperature": 1.0, "max_new_tokens": 15}
    first = post(client, "/process", {**body, "seed": 3})
    again = post(client, "/process", {**body, "seed": 3})
    assert first["text"] == again["text"] and first["tokens"] == again["tokens"]
    # Different seeds draw different samples (15 tokens at temperature 1: never all equal).
    texts = {post(client, "/process", {**body, "seed": s})["text"] for s in (1, 2, 4, 5)}
    assert len(texts) > 1


def test_top_p_and_top_k_are_honoured(client):
    prompt = PROMPTS[0]
    greedy = post(client, "/process", {"prompt": prompt, "temperature": 0, "max_new_tokens": 10})
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    nucleus = post(
        client,
        "/process",
        {"prompt": prompt, "temperature": 1.5, "top_p": 1e-6, "max_new_tokens": 10, "seed": 9},
    )
    assert nucleus["text"] == greedy["text"]
    top1 = post(
        client,
        "/process",
        {"prompt": prompt, "temperature": 1.5, "top_k": 1, "max_new_tokens": 10, "seed": 9},
    )
    assert top1["text"] == greedy["text"]
    # top_k_per_token widens each token's alternatives, best first.
    wide = post(
        client,
        "/process",
        {"prompt": prompt, "temperature": 0, "max_new_tokens": 3, "top_k_per_token": 3},
    )
    for t in wide["tokens"]:
        values = list(t["top_logprob"].values())
        assert 1 <= len(values) <= 3 and values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(t["logprob"])


def test_stop_sequences_cut_text_and_tokens(client, reference):
    _, tokenizer = reference
    body = {"prompt": PROMPTS[0], "temperature": 0, "max_new_tokens": 30}
    full = post(client, "/process", body)
    text = full["text"]
    # Special tokens (EOS, UNK) are not part of `text`.
    pieces = [
        "" if t["text"] in tokenizer.all_special_tokens else t["text"] for t in full["tokens"]
    ]
    assert "".join(pieces) == text
    # A stop sequence made of two whole tokens from the middle of the completion.
    k = next(i for i in range(len(pieces) // 2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k] + pieces[k + 1]
    cut = text.find(stop)
    got = post(client, "/process", {**body, "stop_sequences": ["never-in-text-\u2603", stop]})

    assert got["text"] == text[:cut]
    # Tokens end with the one that reaches the cut: none of the stop sequence's own.
    n_keep = next(n for n in range(len(pieces) + 1) if len("".join(pieces[:n])) >= cut)
    assert got["tokens"] == full["tokens"][:n_keep]
    assert got["logprob"] == pytest.approx(sum(t["logprob"] for t in got["tokens"]))
    # A stop sequence that never appears changes nothing.
    assert post(client, "/process", {**body, "stop_sequences": ["never-in-text-\u2603"]}) | {
        "request_time": 0
    } == full | {"request_time": 0}


@pytest.mark.parametrize("text", ["The capital of France is ", "naïve café, 東京 \u2014 42!\n  x"])
def test_tokenize_round_trips_through_decode(client, reference, text):
    _, tokenizer = reference
    tokens = post(client, "/tokenize", {"text": text})["tokens"]
    assert tokens == tokenizer(text)["input_ids"]
    assert post(client, "/decode", {"tokens": tokens})["text"] == text
    # max_length applies only with truncation, as in Hugging Face tokenizers.
    assert len(post(client, "/tokenize", {"text": text, "max_length": 3})["tokens"]) == 3
    untruncated = {"text": text, "max_length": 3, "truncation": False}
    assert post(client, "/tokenize", untruncated)["tokens"] == tokens


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/process", b'{"prompt": "The capital', "body"),
        ("/process", {}, "prompt"),
        ("/process", {"prompt": 5}, "prompt"),
        ("/process", {"prompt": "x", "max_new_tokens": "many"}, "max_new_tokens"),
        ("/process", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/process", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/process", {"prompt": "x", "stop_sequences": "\n"}, "stop_sequences"),
        ("/process", {"prompt": "word " * 4000}, "prompt"),
        ("/tokenize", {"text": ["a"]}, "text"),
        ("/tokenize", {"text": "a", "max_length": 0}, "max_length"),
        ("/decode", {"tokens": "abc"}, "tokens"),
        ("/decode", {"tokens": [-1]}, "tokens"),
        ("/decode", {"tokens": [10**9]}, "tokens"),
    ],
)
def test_bad_requests_get_422_naming_the_field(client, path, body, field):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    locs = [err["loc"] for err in r.json()["detail"]]
    assert any(loc[0] == "body" and (field == "body" or field in loc) for loc in locs), locs


def test_concurrent_requests_all_succeed(client, runner, monkeypatch):
    bodies = [
        {
            "prompt": PROMPTS[i % 2],
            "temperature": 0,
            "max_new_tokens": 10,
            "echo_prompt": i % 3 == 0,
        }
        for i in range(8)
    ]
    sequential = [post(client, "/process", b) for b in bodies]
    # Count forward passes in flight; the pause makes overlapping requests likely to collide.
    forward, in_flight, most = runner.model.forward, [0], [0]
    count_lock = threading.Lock()

    def counting_forward(*args, **kwargs):
        with count_lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.002)
        try:
            return forward(*args, **kwargs)
        finally:
            with count_lock:
                in_flight[0] -= 1

    monkeypatch.setattr(runner.model, "forward", counting_forward)
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda b: client.post("/process", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    # One request at a time on the model; the others waited instead of failing.
    assert most[0] == 1
    # The lock serializes the model: concurrent answers equal the one-at-a-time ones.
    assert [r.json()["text"] for r in responses] == [s["text"] for s in sequential]
    assert [r.json()["tokens"] for r in responses] == [s["tokens"] for s in sequential]


def test_the_challenge_health_check(client):
    r = client.post("/process", json=HEALTH_CHECK)
    assert r.status_code == 200, r.text
    got = r.json()
    print(json.dumps(got))
    assert set(got) == {"text", "tokens", "logprob", "request_time"}
    # Defaults as in the reference: up to 50 new tokens, one alternative per token.
    assert 1 <= len(got["tokens"]) <= 50
    for t in got["tokens"]:
        assert set(t) == {"text", "logprob", "top_logprob"} and len(t["top_logprob"]) == 1
        assert t["logprob"] <= max(t["top_logprob"].values()) + 1e-5
    assert got["logprob"] == pytest.approx(sum(t["logprob"] for t in got["tokens"]))
    assert got["request_time"] > 0
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"


def test_resolve_model_dir_accepts_model_and_run_dirs(tmp_path):
    export = tmp_path / "run" / "final" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path / "run") == export
    assert resolve_model_dir(export) == export
    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(UserInputError) as e:
            resolve_model_dir(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_runner_matches_generate_and_log_softmax(model_dir):
    runner = ModelRunner.load(model_dir)
    model, tokenizer = runner.model, runner.tokenizer
    # With a GPU the server loads the model on CUDA in bf16.
    assert runner.device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=12
            )
        got = runner.process(ProcessRequest(prompt=prompt, temperature=0, max_new_tokens=12))
        assert got.text == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        echo = runner.process(ProcessRequest(prompt=prompt, echo_prompt=True, max_new_tokens=0))
        # bf16 logits: the cached and uncached passes agree to bf16 precision, not exactly.
        want = direct_logprobs(model, ids)
        assert [t.logprob for t in echo.tokens[1:]] == pytest.approx(want.tolist(), abs=0.05)
    sampled = ProcessRequest(prompt=PROMPTS[0], temperature=1.0, seed=5, max_new_tokens=10)
    assert runner.process(sampled).tokens == runner.process(sampled).tokens
