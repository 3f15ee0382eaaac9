"""Model loading and LoRA: every permitted family, targets, precisions, clear user errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    StableLmConfig,
)
from transformers.pytorch_utils import Conv1D

from budgetune.engine.config import LoraSettings
from budgetune.engine.errors import UserInputError
from budgetune.engine.model import (
    add_lora,
    count_trainable,
    load_base_model,
    lora_targets,
    remove_lora,
    resolve_model_path,
)

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def _family_configs() -> dict[str, PretrainedConfig]:
    split = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    return {
        "llama": LlamaConfig(**split, **SMALL),
        "mistral": MistralConfig(**split, **SMALL),
        "stablelm": StableLmConfig(**split, **SMALL),
        "gpt_neox": GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            **SMALL,
        ),  # fmt: skip
        "falcon": FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SMALL),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, **SMALL),
    }


EXPECTED_ATTENTION = {
    "llama": {"q_proj", "v_proj"},
    "mistral": {"q_proj", "v_proj"},
    "stablelm": {"q_proj", "v_proj"},
    "gpt_neox": {"query_key_value"},
    "falcon": {"query_key_value"},
    "gpt2": {"c_attn"},
}


def _lora_params(module: torch.nn.Module, r: int) -> int:
    """Parameters a rank-r adapter adds to one layer: A is r x in, B is out x r."""
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape
    else:
        fan_out, fan_in = module.weight.shape
    return r * (fan_in + fan_out)


def _expected_trainable(model: torch.nn.Module, leaves: set[str] | None, r: int) -> int:
    """Independent count: walk the bare model, sum adapter sizes of the layers that match."""
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        if leaves is None or name.rsplit(".", 1)[-1] in leaves:
            total += _lora_params(module, r)
    return total


@pytest.mark.parametrize("family", sorted(EXPECTED_ATTENTION))
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_lora_on_every_family_trains_exactly_the_targets(family: str, targets: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_family_configs()[family])
    model.requires_grad_(False)
    leaves = EXPECTED_ATTENTION[family] if targets == "attention" else None
    expected = _expected_trainable(model, leaves, r=4)
    if targets == "attention":
        assert set(lora_targets(model, targets)) == EXPECTED_ATTENTION[family]
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets))
    assert count_trainable(peft_model) == expected
    # Only LoRA matrices train; the output head is never adapted.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any("lm_head" in n or "embed_out" in n for n in trainable)

    ids = torch.randint(2, VOCAB, (2, 12))
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # lora_B starts at zero, so gradients reach it (and only adapter weights get any).
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_all_linear_covers_mlp_and_attention_but_not_the_head() -> None:
    model = AutoModelForCausalLM.from_config(_family_configs()["llama"])
    leaves = set(lora_targets(model, "all-linear"))
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_attaching_an_adapter_prints_no_library_deprecation_warning() -> None:
    model = AutoModelForCausalLM.from_config(_family_configs()["llama"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        add_lora(model, LoraSettings(r=4))
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], seen


def test_remove_lora_restores_the_base_exactly() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_family_configs()["gpt2"])
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, LoraSettings(r=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    base = remove_lora(peft_model)
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert count_trainable(base) == 0


def test_unknown_family_names_its_model_type() -> None:
    model = AutoModelForCausalLM.from_config(
        OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                  word_embed_proj_dim=32, **SMALL)  # fmt: skip
    )
    with pytest.raises(UserInputError, match="model_type 'opt' has no known LoRA targets"):
        add_lora(model, LoraSettings(targets="attention"))


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "~/nope-model"])
def test_missing_local_model_folder(name: str) -> None:
    with pytest.raises(UserInputError, match="no such model folder"):
        resolve_model_path(name)


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_uncached_hub_id_says_how_to_fetch_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError) as err:
        resolve_model_path("budgetune-tests/no-such-model")
    message = str(err.value)
    assert "budgetune-tests/no-such-model" in message
    assert "budgetune prepare" in message and "huggingface-cli download" in message
    assert "\n" not in message


def _save_tiny(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_family_configs()["llama"])
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32-true", torch.float32), ("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32),
     ("16-true", torch.float16)],
)  # fmt: skip
def test_base_is_loaded_in_the_precision_it_trains_in(
    tmp_path: Path, precision: str, dtype: torch.dtype
) -> None:
    loaded = load_base_model(str(_save_tiny(tmp_path)), precision)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    # Frozen and in eval mode: adapters are what trains.
    assert count_trainable(loaded.model) == 0 and not loaded.model.training


def test_unknown_precision_and_quantize_are_user_errors(tmp_path: Path) -> None:
    path = str(_save_tiny(tmp_path))
    with pytest.raises(UserInputError, match="precision 'fp8' is unknown"):
        load_base_model(path, "fp8")
    with pytest.raises(UserInputError, match="quantize 'int3' is unknown"):
        load_base_model(path, quantize="int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nf4_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="quantize=nf4 needs a CUDA GPU and bitsandbytes"):
        load_base_model(str(_save_tiny(tmp_path)), quantize="nf4")
