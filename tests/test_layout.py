"""Only retrieved context is pruned: the instruction, the question and earlier turns reach every layer, in every
common RAG prompt shape, whether the caller names the documents or the rule finds the context."""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.inputs import PromptInput
from pd_integrations.kept_view import document_retention

from .conftest import TINY

# Handbook passages that all resemble each other: same form, different facts.
OFFICES = [
    "Lisbon",
    "Nairobi",
    "Montreal",
    "Kyoto",
    "Tallinn",
    "Perth",
    "Quito",
    "Bergen",
    "Hobart",
    "Granada",
    "Cusco",
    "Tbilisi",
    "Reykjavik",
    "Da Nang",
    "Zanzibar",
    "Valparaiso",
]
PEOPLE = [
    "Marta Silva",
    "Joseph Mwangi",
    "Claire Gagnon",
    "Aiko Tanaka",
    "Kadri Tamm",
    "Liam Walsh",
    "Sofia Paredes",
    "Ingrid Dahl",
    "Oliver Reid",
    "Lucia Moreno",
    "Rosa Quispe",
    "Nino Beridze",
    "Gunnar Olafsson",
    "Linh Nguyen",
    "Amina Salim",
    "Diego Rojas",
]
PASSAGES = [
    f"Travel desk, {office} office. Expense claims from the {office} office are approved by {person}, who "
    f"also handles visa letters and hotel bookings. Claims over {200 + 37 * k} euros need form TR-{k:02d} "
    f"and must be filed within {10 + k} days of returning."
    for k, (office, person) in enumerate(zip(OFFICES, PEOPLE))
]
CONTEXT = "\n\n".join(PASSAGES)
QUESTION = "Who approves expense claims from the Kyoto office?"
INSTRUCTION = "Use the following pieces of retrieved context to answer the question."
RAG_PROMPT = (
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
    "answer the question. If you don't know the answer, just say that you don't know. Use three sentences "
    "maximum and keep the answer concise."
)

# Each shape: its messages and the texts that must never be pruned.
SHAPES = {
    "question last": (
        [{"role": "user", "content": f"{INSTRUCTION}\n\n{CONTEXT}\n\nQuestion: {QUESTION}\nAnswer briefly."}],
        [INSTRUCTION, f"Question: {QUESTION}", "Answer briefly."],
    ),
    "question first": (
        [{"role": "user", "content": f"{RAG_PROMPT}\nQuestion: {QUESTION} \nContext: {CONTEXT} \nAnswer:"}],
        [RAG_PROMPT, f"Question: {QUESTION}", "Answer:"],
    ),
    "system context": (
        [{"role": "system", "content": f"{INSTRUCTION}\n\n{CONTEXT}"}, {"role": "user", "content": QUESTION}],
        [INSTRUCTION, QUESTION],
    ),
    "multi-turn": (
        [
            {"role": "system", "content": f"{INSTRUCTION}\n\n{CONTEXT}"},
            {"role": "user", "content": "Who approves expense claims from the Kyoto office?"},
            {"role": "assistant", "content": "Aiko Tanaka approves them."},
            {"role": "user", "content": "What else does she handle?"},
        ],
        [
            INSTRUCTION,
            "Who approves expense claims from the Kyoto office?",
            "Aiko Tanaka approves them.",
            "What else does she handle?",
        ],
    ),
}


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 4096})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def engine_for(model, tokenizer, **overrides) -> PromptDistillEngine:
    config = PromptDistillConfig(
        **{
            "selection_layers": (1,),
            "budgets": (0.25,),
            "aggregation": "softmax_mean",
            "pool_kernel": 1,
            "span": "chunk",
            "chunk_size": 8,
            **overrides,
        }
    )
    return PromptDistillEngine(model, tokenizer, config)


def rendered_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def kept_share(result, text: str) -> float:
    """Share of the characters of `text` in the rendered prompt that lie in kept spans (`result` is a
    `GenerationResult` or its `stats()`)."""
    stats = result if isinstance(result, dict) else result.stats()
    return document_retention(stats["prompt_text"], stats["kept_char_spans"], [text])[0]


def dropped_texts(result, tokenizer) -> list[str]:
    offsets = tokenizer(result.prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    kept = set(result.kept_token_indices)
    return [result.prompt_text[a:b] for i, (a, b) in enumerate(offsets) if i not in kept]


@pytest.mark.parametrize("named", [True, False], ids=["documents", "heuristic"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_only_retrieved_context_is_pruned(tiny_llama, tokenizer, shape, named):
    messages, protected = SHAPES[shape]
    engine = engine_for(tiny_llama, tokenizer)
    result = engine.generate(messages=messages, documents=PASSAGES if named else None, max_new_tokens=1)
    assert result.context_source == ("documents" if named else "heuristic")
    # The question, the instruction and the earlier turns are kept whole.
    assert {text: kept_share(result, text) for text in protected} == {text: 1.0 for text in protected}
    # Only passage text is dropped.
    dropped = dropped_texts(result, tokenizer)
    assert dropped and all(piece.strip() in CONTEXT for piece in dropped)
    # The counts agree with the kept tokens, and the budget is a quarter of the prunable tokens.
    assert result.protected_tokens + result.prunable_tokens == result.prompt_tokens
    assert result.kept_tokens == result.protected_tokens + result.kept_prunable_tokens
    assert result.kept_prunable_tokens == math.ceil(0.25 * result.prunable_tokens)
    assert result.prompt_tokens - result.kept_tokens == len(dropped)
    # The passages are prunable and nearly nothing more. Named documents leave the blank lines between them
    # protected; the rule keeps a last line of instruction size (these passages are ~60 tokens) in case it is an
    # instruction, and prunes a label that shares the first passage's line ("Context: Travel desk, ...").
    context_tokens = len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"])
    last_passage = len(tokenizer(PASSAGES[-1], add_special_tokens=False)["input_ids"])
    slack = 2 * len(PASSAGES) if named else last_passage + 2
    assert context_tokens - slack <= result.prunable_tokens <= context_tokens + 4


@pytest.mark.parametrize(
    "shape, probe", [("question last", False), ("question first", True), ("system context", False)]
)
def test_the_question_seeds_selection_from_the_tail_or_as_a_probe(tiny_llama, tokenizer, shape, probe):
    """A question after the context seeds from where it stands; one before it (found by the rule, or named by
    `query`) is copied after the prompt as a probe, since only later rows can attend to the context."""
    messages, _ = SHAPES[shape]
    engine = engine_for(tiny_llama, tokenizer)
    for query in (None, QUESTION):
        layout = engine.prefill(messages=messages, query=query).sequences[0].layout
        probe_text = tokenizer.decode(layout.query_suffix_ids)
        assert (QUESTION in probe_text) if probe else layout.query_suffix_ids == ()
        if not probe:
            seed_ids = rendered_ids(tokenizer, messages)[-layout.query_tokens :]
            assert QUESTION in tokenizer.decode(seed_ids)


def test_named_query_span_is_protected_even_inside_the_context_message(tiny_llama, tokenizer):
    """A question that sits inside the long message without a "Question:" label is protected once named."""
    content = f"{INSTRUCTION}\n\n{CONTEXT}\n\nTell me this: {QUESTION.rstrip('?')} please, and be brief about it."
    messages = [{"role": "user", "content": content}]
    engine = engine_for(tiny_llama, tokenizer)
    result = engine.generate(messages=messages, query=QUESTION.rstrip("?"), max_new_tokens=1)
    assert kept_share(result, QUESTION.rstrip("?")) == 1.0


@pytest.mark.parametrize("protect_recent", [0, 24])
@pytest.mark.parametrize("protect_structure", [False, True])
def test_protected_structure_and_recent_context_survive_selection_outside_the_budget(
    tiny_llama, tokenizer, protect_structure, protect_recent
):
    """Line and sentence ends and the last `protect_recent` context tokens are protected: kept at every stage and
    taken out of what the budget counts; unset, they are pruned like any context token."""
    messages, _ = SHAPES["question last"]
    plain = engine_for(tiny_llama, tokenizer).prefill(messages=messages, documents=PASSAGES).sequences[0]
    engine = engine_for(tiny_llama, tokenizer, protect_structure=protect_structure, protect_recent=protect_recent)
    row = engine.prefill(messages=messages, documents=PASSAGES).sequences[0]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    context = torch.nonzero(plain.layout.prunable).flatten()
    # A sentence end is a . ! ? followed by a space or a line break; a line break ends its line.
    stops = {m.start() for m in re.finditer(r"[.!?](?=\s)", text)} | {m.end() - 1 for m in re.finditer(r"\n+", text)}
    ends = context[torch.tensor([any(c in stops for c in range(*offsets[i])) for i in context.tolist()])]
    expected = ends if protect_structure else context[:0]
    rest = context[~torch.isin(context, expected)]
    expected = torch.cat([expected, rest[len(rest) - protect_recent :] if protect_recent else rest[:0]])
    assert torch.equal(torch.nonzero(plain.layout.prunable & ~row.layout.prunable).flatten(), expected.sort().values)
    assert torch.isin(expected, row.kept_indices.cpu()).all()
    assert ends.numel() > 30  # the passages' sentence ends and blank lines
    protected = int((~row.layout.prunable).sum())
    assert row.kept_indices.numel() == math.ceil(0.25 * row.layout.num_prunable) + protected


def test_short_prompts_have_no_context_and_are_not_pruned(tiny_llama, tokenizer):
    engine = engine_for(tiny_llama, tokenizer)
    result = engine.generate(messages=[{"role": "user", "content": f"{PASSAGES[0]}\n\n{QUESTION}"}], max_new_tokens=1)
    assert result.context_source == "none" and result.prunable_tokens == 0
    assert result.kept_tokens == result.prompt_tokens


@pytest.mark.parametrize("named", [True, False], ids=["documents", "heuristic"])
@pytest.mark.parametrize("shape", ["question first", "multi-turn"])
def test_exact_when_the_budget_covers_the_context(tiny_llama, tokenizer, shape, named):
    """With a budget of every prunable token the layout changes nothing: the unmodified model's tokens."""
    messages, _ = SHAPES[shape]
    engine = engine_for(tiny_llama, tokenizer, budgets=(1.0,))
    result = engine.generate(messages=messages, documents=PASSAGES if named else None, max_new_tokens=6)
    ids = torch.tensor([rendered_ids(tokenizer, messages)])
    reference = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
    assert result.kept_tokens == result.prompt_tokens
    assert result.output_token_ids == reference[0, ids.shape[1] :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_default_model_keeps_question_and_instruction_in_every_rag_shape(default_engine, tokenizer, budget):
    """Handbook questions over MiniLM-retrieved passages that all resemble each other, the context found by the rule
    alone (no documents, no query): in every shape the question and the instruction survive pruning whole."""
    from pd_integrations.corpora import rag
    from pd_integrations.corpora.handbook import make_handbook, make_questions

    instructions = {
        "question_last": rag.QUESTION_LAST.split("\n")[0],
        "question_first": rag.QUESTION_FIRST.split("\n")[0],
        "system_context": rag.SYSTEM_CONTEXT.split("\n")[0],
        "multi_turn": rag.MULTI_TURN_CONTEXT.split("\n")[0],
    }
    corpus = make_handbook(seed=0)
    engine = default_engine.with_config(
        default_engine.config.replace(selection_layers=(7,), budgets=(budget,), heads=None, span="chunk")
    )
    for question in make_questions(corpus, 2, seed=1):
        passages = rag.retrieve(question, corpus, tokenizer, target_tokens=700)
        for shape in rag.SHAPES:
            prompt = rag.rag_prompt(shape, question, passages)
            result = engine.generate(messages=prompt.messages, max_new_tokens=1)
            assert result.context_source == "heuristic"
            assert kept_share(result, question.question) == 1.0 and kept_share(result, instructions[shape]) == 1.0
            assert result.kept_prunable_tokens == math.ceil(budget * result.prunable_tokens)
            assert result.prunable_tokens > 0.9 * sum(len(tokenizer(d)["input_ids"]) for d in prompt.documents)


@pytest.mark.parametrize("named", [True, False], ids=["documents", "heuristic"])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": f"{CONTEXT}\n\nSummarise these documents."}],
        [
            {"role": "system", "content": f"{INSTRUCTION}\n\n{CONTEXT}"},
            {"role": "user", "content": "Give me an overview of the passages above."},
        ],
        [{"role": "user", "content": CONTEXT}],
    ],
    ids=["summarise-last", "overview-user-turn", "context-only"],
)
def test_query_free_prompts_fall_back_to_full_attention_and_say_so(tiny_llama, tokenizer, messages, named):
    """No query, no question line, only a summary instruction or the template's tail: attention has nothing to look
    for, so nothing is pruned (the unmodified model's tokens) and the result reports `query_free`."""
    engine = engine_for(tiny_llama, tokenizer, budgets=({"fraction": 0.25, "floor": 8},))
    result = engine.generate(messages=messages, documents=PASSAGES if named else None, max_new_tokens=4)
    assert result.query_free and result.stats()["query_free"] is True
    assert result.context_source == ("documents" if named else "heuristic") and result.prunable_tokens > 500
    assert result.kept_tokens == result.prompt_tokens
    ids = torch.tensor([rendered_ids(tokenizer, messages)])
    reference = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4)
    assert result.output_token_ids == reference[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prompts_with_a_question_are_not_query_free(tiny_llama, tokenizer, shape):
    messages, _ = SHAPES[shape]
    engine = engine_for(tiny_llama, tokenizer, budgets=({"fraction": 0.25, "floor": 8},))
    for query in (None, QUESTION):
        result = engine.generate(messages=messages, query=query, max_new_tokens=1)
        assert not result.query_free
        assert result.kept_prunable_tokens == max(8, math.ceil(0.25 * result.prunable_tokens))
    # Named, even a summary request is a query: the caller said what to look for.
    summary = [{"role": "user", "content": f"{CONTEXT}\n\nSummarise these documents."}]
    assert not engine.generate(messages=summary, query="Kyoto office", max_new_tokens=1).query_free


@pytest.mark.parametrize("named", [True, False], ids=["documents", "heuristic"])
def test_passage_units_keep_whole_passages_with_or_without_named_documents(tiny_llama, tokenizer, named):
    """span="passage" ranks the blank-line-separated passages as units: without `documents=` too (where span
    "document" is refused), every passage is kept whole or dropped, except the last one the budget cuts."""
    messages, _ = SHAPES["question last"]
    engine = engine_for(tiny_llama, tokenizer, budgets=(0.3,), span="passage", unit_score="topk_mean")
    result = engine.generate(messages=messages, documents=PASSAGES if named else None, max_new_tokens=1)
    shares = document_retention(result.prompt_text, result.kept_char_spans, PASSAGES)
    whole, dropped = shares.count(1.0), shares.count(0.0)
    assert whole >= 3 and dropped >= 9 and whole + dropped >= len(PASSAGES) - 1


def test_a_question_line_ending_the_user_turn_is_found(tiny_llama, tokenizer):
    """The chat template closes the turn on the question's own line ("...?<|im_end|>"); the question is still
    found, protected and seeds selection, so the prompt is not taken as query-free."""
    messages = [{"role": "user", "content": f"{CONTEXT}\n\nAnswer briefly. {QUESTION}"}]
    rendered, layout = engine_for(tiny_llama, tokenizer)._prepare(PromptInput(messages=messages))
    assert not layout.query_free and layout.num_prunable > 0
    question = rendered.text.rindex(QUESTION)
    protected = rendered.char_spans(torch.nonzero(~layout.prunable).flatten())
    assert any(a <= question and question + len(QUESTION) <= b for a, b in protected)


def test_protect_structure_refuses_ids_without_text(tiny_llama, tokenizer):
    """Raw ids that don't round-trip have no sentences to find: the setting raises rather than doing nothing."""
    ids = torch.tensor([17, 17, 17, 9, 250, 250, 3, 3] * 40)
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] != ids.tolist()
    with pytest.raises(ValueError, match="protect_structure needs the prompt's text"):
        engine_for(tiny_llama, tokenizer, protect_structure=True).prefill(input_ids=ids)
