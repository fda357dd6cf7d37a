"""Safe and quiet loading: pickle checkpoints are refused unread, model code runs only with trust_remote_code, a
damaged default-model cache is detected and converted again, concurrent conversions end with one good cache, and a
cached load prints no progress bars."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import runpy
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

from pd_integrations import loading
from pd_integrations.loading import DEFAULT_MODEL, default_model_path, load_model

# Child processes load the default model and answer greedily; stdout carries only the answer.
LOAD_AND_ANSWER = textwrap.dedent("""
    import torch
    from pd_integrations import load_model
    model, tokenizer = load_model(device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(repr(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
""")


class Bait:
    """Unpickling it creates `marker`: proof that a checkpoint was unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_pickle(path: pathlib.Path) -> pathlib.Path:
    """Write a pickle checkpoint at `path` whose unpickling creates a marker file; return the marker's path."""
    marker = path.parent.parent / f"unpickled-{path.parent.name}-{path.name}"
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Bait(marker)}))
    return marker


def copy_without_weights(tiny_model_dir: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    shutil.copytree(tiny_model_dir, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    return directory


def edit_json(path: pathlib.Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- pickle checkpoints -----------------------------------------------------------------------------------------


def test_the_bait_runs_code_when_unpickled(tmp_path):
    (tmp_path / "model").mkdir()
    marker = plant_pickle(tmp_path / "model" / "pytorch_model.bin")
    pickle.loads((tmp_path / "model" / "pytorch_model.bin").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.ckpt"])
def test_pickle_only_directory_is_refused_unread(tmp_path, tiny_model_dir, weights):
    directory = copy_without_weights(tiny_model_dir, tmp_path / "pickled")
    marker = plant_pickle(directory / weights)
    with pytest.raises(ValueError) as error:
        load_model(str(directory))
    message = str(error.value)
    assert str(directory) in message and weights in message and "convert it to safetensors" in message
    assert not marker.exists()


def test_config_naming_a_pickle_weights_file_is_refused(tmp_path, tiny_model_dir):
    # transformers reads the file config.json's transformers_weights names, even next to a model.safetensors.
    directory = shutil.copytree(tiny_model_dir, tmp_path / "redirected")
    marker = plant_pickle(directory / "adapter_model.bin")
    edit_json(directory / "config.json", transformers_weights="adapter_model.bin")
    with pytest.raises(ValueError, match="transformers_weights.*safetensors"):
        load_model(str(directory))
    assert not marker.exists()


def test_pickle_only_hub_cache_is_refused_unread(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    commit = "0" * 40
    repo = tmp_path / "models--some-org--pickled-llama"
    snapshot = copy_without_weights(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    marker = plant_pickle(snapshot / "pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="pytorch_model.bin.*convert it to safetensors") as error:
        load_model("some-org/pickled-llama")
    assert str(snapshot) in str(error.value)
    assert not marker.exists()


# --- trust_remote_code ------------------------------------------------------------------------------------------


def plant_model_code(directory: pathlib.Path) -> pathlib.Path:
    """Put a module in `directory` that creates a marker when imported and name it in auto_map."""
    marker = directory.parent / f"imported-{directory.name}"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    auto_map = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilForCausalLM",
        "AutoTokenizer": [None, "evil.EvilTokenizer"],
    }
    edit_json(directory / "config.json", auto_map=auto_map)
    edit_json(directory / "tokenizer_config.json", auto_map={"AutoTokenizer": auto_map["AutoTokenizer"]})
    return marker


def test_the_model_code_bait_runs_when_imported(tmp_path, tiny_model_dir):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    marker = plant_model_code(directory)
    runpy.run_path(str(directory / "evil.py"))
    assert marker.exists()


def test_auto_map_code_does_not_run_by_default(tmp_path, tiny_model_dir):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    marker = plant_model_code(directory)
    model, tokenizer = load_model(str(directory))
    # transformers' own Llama classes, not the directory's code.
    assert type(model) is transformers.LlamaForCausalLM and tokenizer.is_fast
    assert not marker.exists()


def test_auto_map_of_an_unknown_model_type_is_refused_not_run(tmp_path, tiny_model_dir):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    marker = plant_model_code(directory)
    edit_json(directory / "config.json", model_type="evil")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(directory))
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_model_dir):
    seen = []
    for auto_class in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = auto_class.from_pretrained

        def recording(*args, original=original, name=auto_class.__name__, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", recording)
    load_model(str(tiny_model_dir))
    assert seen == [("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    seen.clear()
    load_model(str(tiny_model_dir), trust_remote_code=True)
    assert seen == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]


# --- a damaged default-model cache ------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(monkeypatch, tmp_path):
    """A private PD_INTEGRATIONS_CACHE holding a copy of the converted default model (converted first if this
    machine has none). Yields the copy's model directory."""
    source = default_model_path()
    cache = tmp_path / "cache"
    target = shutil.copytree(source, cache / DEFAULT_MODEL)
    monkeypatch.setenv("PD_INTEGRATIONS_CACHE", str(cache))
    yield target
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB: don't leave it to pytest's tmp retention


def truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: pathlib.Path) -> None:
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {
    "truncated weights": (lambda target: truncate(target / "model.safetensors"), "model.safetensors has"),
    "flipped byte": (lambda target: flip_a_byte(target / "model.safetensors"), "model.safetensors does not match"),
    "missing tokenizer": (lambda target: (target / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "no manifest": (lambda target: (target / loading._MANIFEST).unlink(), "missing or unreadable"),
}


def test_intact_cache_copy_is_used_as_is(cache_copy, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("an intact cache was converted again")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    assert loading._cache_problem(cache_copy) is None
    assert default_model_path() == cache_copy


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_cache_is_detected(cache_copy, damage):
    apply, problem = DAMAGES[damage]
    apply(cache_copy)
    assert problem in loading._cache_problem(cache_copy)


def test_damaged_cache_that_cannot_be_removed_says_how_to_clear_it(cache_copy, monkeypatch):
    truncate(cache_copy / "model.safetensors")

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "rename", read_only)
    with pytest.raises(RuntimeError) as error:
        load_model()
    message = str(error.value)
    assert f"rm -rf '{cache_copy}'" in message and "model.safetensors has" in message


@pytest.mark.slow
def test_truncated_cache_is_converted_again(cache_copy, caplog):
    size = (cache_copy / "model.safetensors").stat().st_size
    truncate(cache_copy / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        model, tokenizer = load_model(device="cpu")
    assert "converting it again" in caplog.text and str(cache_copy) in caplog.text
    assert (cache_copy / "model.safetensors").stat().st_size == size
    assert loading._cache_problem(cache_copy) is None
    assert sorted(path.name for path in cache_copy.parent.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.lock"]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


# --- concurrent conversion --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_converting_at_once_end_with_one_good_cache(tmp_path):
    cache = tmp_path / "cache"  # fresh: both processes find no cache and race to convert it
    env = {**os.environ, "PD_INTEGRATIONS_CACHE": str(cache)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_AND_ANSWER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    answers = [stdout for stdout, _ in results]
    assert answers[0] == answers[1] and "Paris" in answers[0]
    # The lock made one of them convert while the other waited, then loaded the finished cache.
    assert sum("Converting smollm2-135m-instruct" in stderr for _, stderr in results) == 1
    assert sorted(path.name for path in cache.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.lock"]
    assert loading._cache_problem(cache / DEFAULT_MODEL) is None


# --- quiet loads ------------------------------------------------------------------------------------------------


def test_cached_load_prints_no_progress_bars(tmp_path):
    default_model_path()  # the subprocess must find a converted cache
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"}
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_ANSWER], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout and result.stdout.count("\n") == 1
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "%|" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 1, result.stderr


@pytest.mark.parametrize("enabled", [True, False])
def test_quiet_load_restores_the_progress_bar_setting(default_model, enabled):
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        load_model(device="cpu")
        assert hf_logging.is_progress_bar_enabled() == enabled
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
