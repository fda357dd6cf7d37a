"""Profiles: calibration writes them, engines find and validate them, the shipped one is used by default."""

from __future__ import annotations

import json
import warnings

import pytest

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.calibrate import SCORINGS, calibrate, compare_scoring, main
from pd_integrations.config import PROFILES_DIR
from pd_integrations.haystack import needle_probe

from .conftest import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch, tokenizer):
    """An empty package cache (the `tokenizer` fixture is loaded before the cache moves)."""
    monkeypatch.setenv("PD_INTEGRATIONS_CACHE", str(tmp_path))
    return tmp_path


def test_calibration_writes_a_profile_engines_use(cache, tokenizer):
    model = tiny_model("qwen3")
    engine = PromptDistillEngine(model, tokenizer, PromptDistillConfig(method="full"), model_name="tiny-qwen3")
    profile = calibrate("tiny-qwen3", engine=engine, lengths=(300,), depths=(0.2, 0.8), kinds=("passcode",),
                        verify=1, plan_length=1024)
    written = json.loads((cache / "profiles" / "tiny-qwen3.json").read_text())
    assert written["num_hidden_layers"] == 4 and written["calibration"]["probes"] == 2
    assert len(written["calibration"]["layer_needle_recall"]) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with a profile must not fall back
        resolved = PromptDistillEngine(model, tokenizer, model_name="tiny-qwen3").config
    assert list(resolved.selection_layers) == profile.settings["selection_layers"]
    assert list(resolved.budgets) == profile.settings["budgets"]
    assert resolved.span == profile.settings["span"]


def test_compare_scoring_ranks_needles_per_layer_for_every_scoring(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"),
                                 model_name="tiny-llama")
    probes = [needle_probe(tokenizer, 200, depth, seed=k) for k, depth in enumerate((0.2, 0.8))]
    everything = compare_scoring(engine, probes, budget=10_000)
    assert list(everything) == list(SCORINGS)
    assert all(recall == [1.0] * 4 for recall in everything.values())  # every candidate is within the budget
    # With a budget of one candidate, a random model's needle is almost never the top token.
    top_one = compare_scoring(engine, probes, budget=1)
    assert all(len(recall) == 4 and sum(recall) < 4 for recall in top_one.values())


def test_compare_scoring_command_prints_every_scoring(tmp_path, tokenizer, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no PromptDistill profile"):
        main(["--compare-scoring", "--model", str(tmp_path), "--lengths", "200", "--depths", "0.5",
              "--kinds", "passcode"])
    lines = capsys.readouterr().out.splitlines()
    assert "share of 1 probes whose needle ranks in the top 50 candidates, layers 0 → 3" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(SCORINGS)
    assert all(len(line.split("|")[1].split()) == 4 for line in lines[1:])  # one share per layer


def write_profile(cache, name, **fields):
    data = {"model": name, "num_hidden_layers": 4,
            "settings": {"selection_layers": [1], "budgets": [64], "span": "token"}}
    data.update(fields)
    (cache / "profiles").mkdir(exist_ok=True)
    (cache / "profiles" / f"{name}.json").write_text(json.dumps(data))


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 30}, "calibrated for 30 layers but the model has 4"),
    ({"settings": {"selection_layers": [1], "budgets": [0]}}, "invalid: budgets must be ints >= 1"),
    ({"settings": {"selection_layers": [1], "budgets": [8], "speed": "max"}}, "unknown settings"),
    ({"settings": {"selection_layers": [3], "budgets": [8]}}, r"selection_layers entries must be in \[0, 2\]"),
])
def test_bad_profiles_are_rejected(cache, tokenizer, fields, message):
    write_profile(cache, "tiny-bad", **fields)
    with pytest.raises(ValueError, match=message):
        PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-bad")


def test_corrupt_profile_file(cache, tokenizer):
    (cache / "profiles").mkdir()
    (cache / "profiles" / "tiny-corrupt.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-corrupt")


def test_model_without_profile_warns_and_uses_the_fallback_rule(cache, tokenizer):
    with pytest.warns(UserWarning, match="no PromptDistill profile for 'tiny-unknown'"):
        config = PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-unknown").config
    assert config.selection_layers == (2,) and config.budgets == (1024,) and config.span == "chunk"


def test_shipped_default_profile_is_used(default_engine):
    shipped = json.loads((PROFILES_DIR / "smollm2-135m-instruct.json").read_text())["settings"]
    config = default_engine.config
    assert list(config.selection_layers) == shipped["selection_layers"]
    assert list(config.budgets) == shipped["budgets"]
    assert config.span == shipped["span"]


def test_sentence_spans_keep_the_needle_sentence(default_engine, tokenizer):
    probe = needle_probe(tokenizer, 2000, 0.55, seed=11)
    engine = default_engine.with_config(default_engine.config.replace(budgets=(256,), span="sentence"))
    result = engine.generate(messages=probe.messages(), query=probe.question, max_new_tokens=16)
    kept_text = "".join(result.prompt_text[a:b] for a, b in result.kept_char_spans)
    assert result.kept_tokens < result.prompt_tokens / 4
    assert probe.needle in kept_text
    assert probe.is_answered(result.text), result.text


def test_profile_heads_do_not_follow_caller_chosen_layers(default_engine):
    """Retrieval heads are calibrated per layer: choosing other layers must not inherit them."""
    assert default_engine.config.heads is not None
    assert default_engine.with_config(PromptDistillConfig(selection_layers=(14,), budgets=(512,))).config.heads is None
