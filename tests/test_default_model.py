"""The embedded SmolLM2-135M-Instruct with its shipped profile answers a needle question from a pruned prompt."""

from __future__ import annotations

import pytest

from pd_integrations.probes import needle_probe


@pytest.mark.parametrize("depth", [0.25, 0.7])
def test_needle_answered_from_kept_tokens(default_engine, tokenizer, depth):
    # The shipped profile keeps max(461, 15%) of the context after layer 17; at 4k it keeps about a sixth.
    probe = needle_probe(tokenizer, 4000, depth, seed=3)
    result = default_engine.generate(messages=probe.messages(), query=probe.question, max_new_tokens=24)
    assert result.kept_tokens < result.prompt_tokens * 0.6, "the profile must prune at 4k tokens"
    assert probe.is_answered(result.text), result.text
    kept_text = "".join(result.prompt_text[a:b] for a, b in result.kept_char_spans)
    assert probe.needle in kept_text
    assert result.decode_start_position == result.prompt_tokens
