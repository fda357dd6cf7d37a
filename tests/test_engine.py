"""Exactness against the unmodified model, per architecture, and the invariants of selection."""

from __future__ import annotations

import copy

import pytest
import torch

from pd_integrations import PromptDistillConfig, PromptDistillEngine

from .conftest import TINY_CONFIGS, random_ids, tiny_model

FAMILIES = list(TINY_CONFIGS)
N = 64  # longer than the tiny sliding windows, so they exclude keys


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    out = model.generate(
        ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False, max_new_tokens=max_new_tokens
    )
    return out[0, ids.shape[0] :].tolist()


EXACT_CONFIGS = {
    "full": PromptDistillConfig(method="full"),
    "budget>=context": PromptDistillConfig(selection_layers=(1, 2), budgets=(10_000, 10_000)),
    "fraction 1.0": PromptDistillConfig(selection_layers=(1,), budgets=(1.0,), cache_truncation=False),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(EXACT_CONFIGS))
def test_exact_when_nothing_is_pruned(family, name, tokenizer):
    model = tiny_model(family)
    engine = PromptDistillEngine(model, tokenizer, EXACT_CONFIGS[name])
    ids = random_ids(N)
    with torch.inference_mode():
        reference_logits = model(ids[None]).logits[0, -1]
    state = engine.prefill(input_ids=ids)
    torch.testing.assert_close(state.logits[0], reference_logits, atol=1e-4, rtol=0)
    # Both sides stop at EOS; 12 steps past a 64-token prompt exercise sliding windows during decode too.
    result = engine.generate(input_ids=ids, max_new_tokens=12)
    assert result.output_token_ids == hf_greedy(model, ids, 12)
    assert result.kept_tokens == N


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exact_across_attention_backends(attn, tokenizer):
    model = tiny_model("llama", attn)
    engine = PromptDistillEngine(model, tokenizer, EXACT_CONFIGS["budget>=context"])
    ids = random_ids(N, seed=1)
    assert engine.generate(input_ids=ids, max_new_tokens=8).output_token_ids == hf_greedy(model, ids, 8)


@pytest.mark.parametrize("name", ["budget>=context", "fraction 1.0"])  # with and without cache truncation
def test_probe_leaves_no_trace(tokenizer, name):
    """A question-first prompt seeds selection with a transient probe; with nothing pruned the output must equal
    the unmodified model's, and no cache holds a probe position."""
    model = tiny_model("qwen3")
    engine = PromptDistillEngine(model, tokenizer, EXACT_CONFIGS[name])
    prompt = "Question: what is the code?\nContext: " + "the sky is blue. " * 20 + "\nAnswer:"
    query = "Which number opens the vault?"
    state = engine.prefill(prompt, query=query)
    n = len(tokenizer(prompt)["input_ids"])
    with torch.inference_mode():
        reference = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(state.logits[0], reference, atol=1e-4, rtol=0)
    assert all(layer.keys.shape[-2] == n for layer in state.cache.layers)
    assert all(int(p.max()) == n - 1 for p in state.key_positions)
    assert state.sequences[0].next_position == n


def pruning_engine(tokenizer, family="llama", **overrides):
    config = PromptDistillConfig(
        **{
            "selection_layers": (1, 2),
            "budgets": (20, 10),
            "protect_head": 2,
            "tail_tokens": 4,
            "aggregation": "softmax_mean",
            "pool_kernel": 1,
            "span": "token",
            **overrides,
        }
    )
    return PromptDistillEngine(tiny_model(family), tokenizer, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_invariants(family, tokenizer):
    engine = pruning_engine(tokenizer, family)
    state = engine.prefill(input_ids=random_ids(N, seed=2))
    protected = 2 + 4
    assert [s.numel() for s in state.sequences[0].stage_kept] == [20 + protected, 10 + protected]
    kept = state.sequences[0].kept_indices.tolist()
    assert kept == sorted(set(kept))
    assert kept[:2] == [0, 1] and kept[-4:] == list(range(N - 4, N))
    assert set(state.sequences[0].stage_kept[1].tolist()) <= set(state.sequences[0].stage_kept[0].tolist())
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == [10 + protected] * 4
    assert state.sequences[0].next_position == N


def test_without_cache_truncation_early_layers_keep_their_inputs(tokenizer):
    state = pruning_engine(tokenizer, cache_truncation=False).prefill(input_ids=random_ids(N, seed=3))
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == [N, N, 26, 16]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_kept_rows_keep_original_positions_and_decode_continues_at_n(family, tokenizer):
    engine = pruning_engine(tokenizer, family)
    seen = []
    hook = engine.arch.decoder.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    try:
        result = engine.generate(input_ids=random_ids(N, seed=4), max_new_tokens=3, stop=None)
    finally:
        hook.remove()
    assert result.kept_tokens == 16 < N and result.decode_start_position == N
    # Prefill computes RoPE (once per layer type) for all positions; decode steps use N, N+1.
    decode_positions = sorted({int(p) for p in seen if p.numel() == 1})
    assert decode_positions == [N, N + 1]
    assert seen[0].flatten().tolist() == list(range(N))


def test_chunk_span_keeps_whole_chunks(tokenizer):
    engine = pruning_engine(tokenizer, selection_layers=(1,), budgets=(16,), span="chunk", chunk_size=8)
    kept = set(engine.prefill(input_ids=random_ids(N, seed=5)).sequences[0].kept_indices.tolist())
    context = kept - {0, 1} - set(range(N - 4, N))
    # Chunks are counted from the first prunable token (after the 2 protected ones).
    chunks = {(i - 2) // 8 for i in context}
    assert len(context) == 16 and all(set(range(2 + c * 8, 2 + c * 8 + 8)) <= context for c in chunks)


DOCUMENTS = [f"Document {i}: " + " ".join(f"fact{i}-{j} holds." for j in range(6 + 3 * i)) for i in range(4)]


def document_prompt(separator: str) -> str:
    return "Use the context." + separator + separator.join(DOCUMENTS) + separator + "Question: which fact holds?"


def document_of_token(tokenizer, prompt: str) -> list[int | None]:
    """Per prompt token, the document holding its first non-space character (whitespace-only tokens: their first
    character), None outside the documents."""
    ranges = [(prompt.index(d), prompt.index(d) + len(d)) for d in DOCUMENTS]
    owners = []
    for start, end in tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]:
        piece = prompt[start:end]
        first = start + len(piece) - len(piece.lstrip()) if piece.strip() else start
        owners.append(next((i for i, (a, b) in enumerate(ranges) if a <= first < b), None))
    return owners


@pytest.mark.parametrize("separator", ["\n\n", " "])  # the space attaches to each document's first word
@pytest.mark.parametrize("span", ["document", "chunk"])
def test_span_units_follow_document_boundaries(tokenizer, span, separator):
    prompt = document_prompt(separator)
    engine = pruning_engine(tokenizer, span=span, chunk_size=8)
    units = engine.prefill(prompt, documents=DOCUMENTS).sequences[0].layout.units.tolist()
    owners = document_of_token(tokenizer, prompt)
    pieces = [prompt[a:b] for a, b in tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]]
    for i in range(len(DOCUMENTS)):
        tokens = [t for t, owner in enumerate(owners) if owner == i]
        inside = [units[t] for t in tokens]
        outside = {units[t] for t, owner in enumerate(owners) if owner != i}
        assert not set(inside) & outside  # no unit is shared with text outside the document
        if span == "document":
            assert len(set(inside)) == 1
        else:
            # Chunks of whole sentences: each starts at the document's start or right after a sentence's end.
            firsts = [t for t in tokens if t == tokens[0] or units[t] != units[t - 1]]
            assert len(firsts) > 2 and all(t == tokens[0] or pieces[t - 1].endswith(".") for t in firsts)


def test_document_span_keeps_whole_documents(tokenizer):
    prompt = document_prompt("\n\n")
    owners = document_of_token(tokenizer, prompt)
    sizes = [owners.count(i) for i in range(len(DOCUMENTS))]
    budget = sizes[1] + sizes[2] + 5  # room for two whole documents and five tokens of a third
    engine = pruning_engine(tokenizer, selection_layers=(1,), budgets=(budget,), span="document")
    result = engine.generate(prompt, documents=DOCUMENTS, query="which fact holds?", max_new_tokens=1)
    # Only the documents are prunable: every other token is kept, and the budget counts document tokens.
    context = [t for t in result.kept_token_indices if owners[t] is not None]
    assert set(result.kept_token_indices) - set(context) == {t for t, owner in enumerate(owners) if owner is None}
    assert len(context) == budget and result.kept_prunable_tokens == budget
    assert result.prunable_tokens == sum(sizes) and result.context_source == "documents"
    kept_per_document = {}
    for t in context:
        kept_per_document.setdefault(owners[t], []).append(t)
    # Every document is kept whole, or (at most one, the first that did not fit) as one contiguous run.
    partial = [d for d, ts in kept_per_document.items() if d is not None and len(ts) < sizes[d]]
    assert len(partial) <= 1
    for d in partial:
        run = kept_per_document[d]
        assert run == list(range(run[0], run[0] + len(run)))
    # The result reports each document's kept share: whole documents 1.0, dropped ones 0.0.
    assert [share == 1.0 for share in result.document_retention] == [
        d in kept_per_document and d not in partial for d in range(len(DOCUMENTS))
    ]


def test_gemfilter_reruns_on_kept_tokens_with_renumbered_positions(tokenizer):
    engine = pruning_engine(tokenizer, method="gemfilter", selection_layers=(1,), budgets=(20,))
    ids = random_ids(N, seed=6)
    result = engine.generate(input_ids=ids, max_new_tokens=4)
    kept = torch.tensor(result.kept_token_indices)
    # Paper scoring seeds from (and protects) the last token only: 20 + 2 head + 1.
    assert result.kept_tokens == 23 and result.decode_start_position == 23
    # Equal to the unmodified model run on the kept tokens alone.
    assert result.output_token_ids == hf_greedy(engine.model, ids[kept], 4)


def test_result_reports_sizes(tokenizer):
    engine = pruning_engine(tokenizer)
    full = PromptDistillEngine(engine.model, tokenizer, PromptDistillConfig(method="full"))
    ids = random_ids(N, seed=7)
    pruned, reference = engine.generate(input_ids=ids, max_new_tokens=2), full.generate(input_ids=ids, max_new_tokens=2)
    per_token = reference.kv_cache_bytes / N
    assert reference.kv_cache_bytes == 4 * 2 * 2 * 16 * 4 * N  # layers · (k, v) · kv heads · head dim · fp32
    assert pruned.kv_cache_bytes == per_token * 16
    assert pruned.prompt_tokens == N and pruned.output_tokens == 2 and pruned.prefill_seconds > 0


def test_grouped_query_scores_match_repeated_keys(tokenizer):
    """Scoring pairs each query head with its key head as HF's repeat_kv does."""
    from transformers.models.llama.modeling_llama import repeat_kv

    engine = pruning_engine(tokenizer)
    queries, keys = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 10, 16)
    expected = queries @ repeat_kv(keys, 2).transpose(-1, -2) * engine.arch.layers[0].self_attn.scaling
    torch.testing.assert_close(engine.arch.attention_logits(0, queries, keys), expected)


# The tiny models' output layer is scaled so greedy choices are not bfloat16 ties: logits reach |x| ~ 15, where a
# bfloat16 step is 0.0625.
BF16_LOGIT_SCALE = 20.0
BF16_LOGIT_ATOL = 0.25


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])  # HF's Gemma2 has no SDPA attention
def test_bfloat16_matches_hf_generate(family, amx, tokenizer, monkeypatch):
    """In bfloat16, with the CPU kernels that `load_model` installs on a CPU with and without AMX: along HF
    `generate`'s greedy tokens (HF's own SDPA), every step's logits agree within `BF16_LOGIT_ATOL`, and the engine's
    greedy tokens equal HF's up to the first step where HF's best two logits are within twice the measured deviation
    (a tie that rounding may break either way)."""
    from pd_integrations import cpu_kernels
    from pd_integrations.cpu_kernels import CPU_HALF_ATTENTION, use_cpu_half_kernels
    from pd_integrations.decode import DecodeBatch

    monkeypatch.setattr(cpu_kernels, "cpu_has_amx", lambda: amx)
    reference = tiny_model(family, "sdpa")
    with torch.no_grad():
        reference.lm_head.weight.mul_(BF16_LOGIT_SCALE)
    reference = reference.to(torch.bfloat16)
    ours = copy.deepcopy(reference)  # its own config: switching attention must not reach the reference
    use_cpu_half_kernels(ours)
    assert ours.config._attn_implementation == CPU_HALF_ATTENTION
    engine = PromptDistillEngine(ours, tokenizer, EXACT_CONFIGS["full"])
    ids, steps = random_ids(N, seed=2), 12
    expected_tokens = hf_greedy(reference, ids, steps)
    with torch.inference_mode():
        expected = reference(torch.cat([ids, torch.tensor(expected_tokens)])[None]).logits[0, N - 1 : -1].float()
        prefill = engine.prefill(input_ids=ids)
        batch, logits = DecodeBatch.after(engine.runtime, prefill), [prefill.logits[0]]
        for token in expected_tokens[:-1]:
            logits.append(batch.step(torch.tensor([token]))[0])
    logits = torch.stack(logits).float()
    torch.testing.assert_close(logits, expected, atol=BF16_LOGIT_ATOL, rtol=0)
    # A greedy choice can only differ where HF's best two logits are within twice the measured deviation: at every
    # other step the engine's choice must be HF's, and its own greedy run must follow HF's up to the first tie.
    deviation = float((logits - expected).abs().max())
    margins = [a - b for a, b in expected.topk(2).values.tolist()]
    decisive = [i for i, margin in enumerate(margins) if margin > 2 * deviation]
    assert len(decisive) >= steps // 2
    assert [int(logits[i].argmax()) for i in decisive] == [expected_tokens[i] for i in decisive]
    first_tie = next((i for i in range(steps) if i not in decisive), steps)
    tokens = engine.generate(input_ids=ids, max_new_tokens=steps).output_token_ids
    assert tokens[:first_tie] == expected_tokens[:first_tie]
