"""Shared fixtures: the embedded default model (loaded once), tiny random models of every supported family, and
pd-serve over a tiny one."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from pd_integrations import PromptDistillConfig, PromptDistillEngine, load_model

TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    eos_token_id=2,
    bos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=False,
)
SERVED_MODEL = "tiny"  # the name pd-serve serves `tiny_engine` under

# One tiny config per supported family. Sliding windows are small so that they exclude keys in the tests' prompts.
TINY_CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=24),
    "qwen2": transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=24, max_window_layers=2),
    "qwen3": transformers.Qwen3Config(**TINY),
    "phi3": transformers.Phi3Config(**{k: v for k, v in TINY.items() if k != "head_dim"}, sliding_window=24),
    "gemma2": transformers.Gemma2Config(
        **TINY, sliding_window=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16
    ),
    "gemma3_text": transformers.Gemma3TextConfig(
        **TINY, sliding_window=24, sliding_window_pattern=2, query_pre_attn_scalar=16
    ),
}


def tiny_model(family: str, attn_implementation: str = "eager"):
    """A random tiny `*ForCausalLM` of `family` in fp32, seeded so every run builds the same weights. It gets its own
    copy of the config: the model holds the object it was built from, and a test changing it must not reach others."""
    torch.manual_seed(0)
    config = copy.deepcopy(TINY_CONFIGS[family])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on CPU."""
    return load_model(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def default_engine(default_model):
    model, tokenizer = default_model
    return PromptDistillEngine(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with a 4096-token window and the default model's tokenizer and chat template, saved like a
    user's model directory (adapters load it by path)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 4096})
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    """A tiny random Llama with full attention under the name `SERVED_MODEL`, as the pd-serve tests serve it: a
    fraction of a second per request; greedy, it repeats itself. One per module, as each module serves it."""
    return PromptDistillEngine(
        tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"), model_name=SERVED_MODEL
    )


@pytest.fixture(scope="module")
def tiny_url(tiny_engine):
    """The base URL of pd-serve over `tiny_engine` with its default settings, for the module's tests."""
    from pd_integrations.serve import ServerSettings, create_app  # the serve extra, only where a test serves

    from .serving import running

    with running(create_app(tiny_engine, ServerSettings(model=SERVED_MODEL))) as base:
        yield base


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    """Token ids 3..vocab-1 (no BOS/EOS/PAD), reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=generator)
