"""pd-bench rag: the generated handbook, its questions, retrieval, the three prompt shapes, and a tiny end-to-end run.

The corpus embeddings (all-MiniLM-L6-v2, ~240 passages) are computed once per test session, in the first test that
retrieves."""

from __future__ import annotations

import json
import re
from collections import Counter
from statistics import mean

import pytest

from pd_integrations.bench import ragbench
from pd_integrations.bench.__main__ import main
from pd_integrations.calibration.mixed import wilson_interval
from pd_integrations.corpora import rag
from pd_integrations.corpora.handbook import CITIES, POLICIES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FACT_FORMS = {
    "person": r"[A-Z][a-z]+ [A-Z][a-z]+",
    "code": r"[A-Z]{3}-\d{4}",
    "amount": r"\d,\d{3}",
    "date": r"\d{1,2} [A-Z][a-z]+",
}


@pytest.fixture(scope="module")
def corpus():
    return rag.make_handbook()


def topic_and_city(passage: rag.Passage) -> tuple[str, str]:
    match = re.fullmatch(r"(.+) \((.+) office\)", passage.title)
    return match.group(1).lower(), match.group(2)


def fact_kind(passage: rag.Passage, answer: str) -> str:
    return next(kind for kind in rag.FACT_KINDS if rag.fact(passage, kind) == answer)


def test_handbook_is_deterministic_per_seed_and_big_enough_for_8k_prompts(corpus, tokenizer):
    assert rag.make_handbook(seed=0) == corpus
    assert [p.text for p in rag.make_handbook(seed=1)] != [p.text for p in corpus]
    assert [p.id for p in corpus] == list(range(240))
    assert len({p.title for p in corpus}) == 240  # one passage per (policy, office)
    assert {topic_and_city(p)[0] for p in corpus} == {policy.topic for policy in POLICIES}
    assert {topic_and_city(p)[1] for p in corpus} <= set(CITIES)
    sizes = [len(ids) for ids in tokenizer([p.text for p in corpus], add_special_tokens=False).input_ids]
    assert 70 <= min(sizes) and max(sizes) <= 130 and 85 <= mean(sizes) <= 105
    assert sum(sizes) > 2 * 8000
    assert [p.id for p in rag.make_handbook(size=50)] == list(range(50))
    with pytest.raises(ValueError, match="size must be between 1 and 300"):
        rag.make_handbook(size=301)


def test_each_passage_states_four_facts_of_the_same_form_none_shared(corpus):
    for kind, form in FACT_FORMS.items():
        values = [rag.fact(p, kind) for p in corpus]
        assert all(re.fullmatch(form, value) for value in values), kind
        assert len(set(values)) == len(values), kind
    topic, city = topic_and_city(corpus[0])
    # Every fact sentence names the office, and the policy or its own terms for the amount and the date.
    for kind in rag.FACT_KINDS:
        sentence = next(s for s in corpus[0].text.split(". ") if rag.fact(corpus[0], kind) in s)
        assert f"{city} office" in sentence and (topic in sentence.lower() or kind in ("amount", "date")), sentence


def test_questions_have_exactly_one_answering_passage(corpus):
    questions = rag.make_questions(corpus, 80, seed=3)
    assert len({q.passage_id for q in questions}) == 80
    for question in questions:
        assert [p.id for p in corpus if rag.contains(p.text, question.answer)] == [question.passage_id]
        topic, city = topic_and_city(corpus[question.passage_id])
        assert f"at the {city} office?" in question.question
        # No other passage is about the same policy at the same office.
        assert [p.id for p in corpus if topic_and_city(p) == (topic, city)] == [question.passage_id]
    assert Counter(fact_kind(corpus[q.passage_id], q.answer) for q in questions) == dict.fromkeys(rag.FACT_KINDS, 20)
    assert rag.make_questions(corpus, 5, seed=3) == questions[:5]
    assert rag.make_questions(corpus, 5, seed=4) != questions[:5]
    with pytest.raises(ValueError, match="only 240 answerable"):
        rag.make_questions(corpus, 241, seed=0)


def test_answers_match_whole_phrases_case_insensitively():
    assert rag.contains("The deadline is 4 march.", "4 March")
    assert not rag.contains("The deadline is 14 March.", "4 March")
    assert not rag.contains("Use form TRV-48210.", "TRV-4821")
    assert rag.contains("It is approved by MARIA OKAFOR", "Maria Okafor")


def test_retrieval_fills_the_budget_with_look_alike_passages_in_rank_order(corpus, tokenizer):
    for question in rag.make_questions(corpus, 4, seed=0):
        passages = rag.retrieve(question, corpus, tokenizer, 1000)
        ids = [p.id for p in passages]
        assert question.passage_id in ids and len(set(ids)) == len(ids)
        context = tokenizer(rag.SEPARATOR.join(p.text for p in passages), add_special_tokens=False).input_ids
        assert 1000 - 130 < len(context) <= 1020  # one more passage would not have fit
        scores = (rag.embed([question.question]) @ rag.embed([p.text for p in passages]).T)[0].tolist()
        assert scores == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
        # Distractors resemble the question: each is about its policy or its office, most about its policy, and
        # each states a person, a code, an amount and a date like the answer's passage.
        topic, city = topic_and_city(corpus[question.passage_id])
        assert all(topic in p.text or f"{city} office" in p.text for p in passages)
        assert sum(topic in p.text for p in passages) >= 0.6 * len(passages)
        assert sum(f"{city} office" in p.text for p in passages) >= 2
        for passage in passages:
            assert all(re.fullmatch(form, rag.fact(passage, kind)) for kind, form in FACT_FORMS.items())
    assert len(rag.retrieve(question, corpus, tokenizer, 8000)) > 70


def test_answer_passage_replaces_the_last_when_ranked_out(corpus, tokenizer):
    question = rag.make_questions(corpus, 1, seed=0)[0]
    topic, city = topic_and_city(corpus[question.passage_id])
    unrelated = next(p for p in corpus if topic not in p.text and city not in p.text)
    ranked = rag.retrieve(question.question, corpus, tokenizer, 1000)  # a plain string: no answer to keep
    assert unrelated not in ranked
    forced = rag.retrieve(
        rag.RagQuestion(question.question, rag.fact(unrelated, "code"), unrelated.id), corpus, tokenizer, 1000
    )
    assert forced == ranked[:-1] + [unrelated]
    assert rag.retrieve(question, corpus, tokenizer, 1) == [corpus[question.passage_id]]


def test_move_answer_places_the_answer_passage_at_a_depth(corpus):
    passages = corpus[:9]
    assert [p.id for p in rag.move_answer(passages, 4, 0.0)] == [4, 0, 1, 2, 3, 5, 6, 7, 8]
    assert [p.id for p in rag.move_answer(passages, 0, 1.0)] == [1, 2, 3, 4, 5, 6, 7, 8, 0]
    assert [p.id for p in rag.move_answer(passages, 0, 0.5)] == [1, 2, 3, 4, 0, 5, 6, 7, 8]
    with pytest.raises(ValueError):
        rag.move_answer(passages, 0, 1.5)


@pytest.mark.parametrize("shape", rag.SHAPES)
def test_shapes_put_the_question_in_place_and_every_document_verbatim(shape, corpus, tokenizer):
    question = rag.make_questions(corpus, 1, seed=0)[0]
    passages = rag.move_answer(rag.retrieve(question, corpus, tokenizer, 600), question.passage_id, 0.5)
    prompt = rag.rag_prompt(shape, question, passages)
    assert prompt.documents == [p.text for p in passages]
    assert passages[prompt.answer_index].id == question.passage_id and 0 < prompt.answer_index < len(passages) - 1
    assert rag.contains(prompt.documents[prompt.answer_index], prompt.answer)
    assert (prompt.query, prompt.answer) == (question.question, question.answer)

    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    assert all(text.count(document) == 1 for document in prompt.documents)
    starts = [text.index(document) for document in prompt.documents]
    assert starts == sorted(starts)
    context_start, context_end = starts[0], starts[-1] + len(prompt.documents[-1])
    assert text.count(question.question) == 1
    asked = text.index(question.question)
    roles = [m["role"] for m in prompt.messages]
    if shape == "question_first":
        assert roles == ["user"] and asked < context_start
        assert prompt.messages[0]["content"].startswith("You are an assistant for question-answering tasks.")
        assert prompt.messages[0]["content"].endswith(" \nAnswer:")
    else:
        assert asked > context_end
    if shape == "question_last":
        assert roles == ["user"] and prompt.messages[0]["content"].endswith(
            f"Question: {question.question}\nAnswer briefly."
        )
    if shape == "system_context":
        assert roles == ["system", "user"] and prompt.messages[1]["content"] == question.question
        assert all(document in prompt.messages[0]["content"] for document in prompt.documents)
    if shape == "multi_turn":
        assert roles == ["user", "assistant", "user"]
        assert all(document in prompt.messages[0]["content"] for document in prompt.documents)
        assert prompt.messages[2]["content"] == f"Question: {question.question}\nAnswer briefly."


def test_rag_prompt_rejects_unknown_shapes_and_missing_answers(corpus):
    question = rag.make_questions(corpus, 1, seed=0)[0]
    with pytest.raises(ValueError, match="shape must be one of"):
        rag.rag_prompt("question_middle", question, [corpus[question.passage_id]])
    with pytest.raises(ValueError, match="was not retrieved"):
        rag.rag_prompt("question_last", question, [p for p in corpus[:5] if p.id != question.passage_id])


@pytest.mark.parametrize("source", ragbench.CONTEXT_SOURCES)
def test_pd_bench_rag_end_to_end(source, capsys, tmp_path, tiny_model_dir):
    methods = ["full", "gemfilter", "single-stage"]
    with pytest.warns(UserWarning, match="no PromptDistill profile"):
        main(
            [
                "rag",
                "--model",
                tiny_model_dir,
                "--lengths",
                "400",
                "--samples",
                "1",
                "--methods",
                ",".join(methods),
                "--layer",
                "1",
                "--budget",
                "64",
                "--max-new-tokens",
                "3",
                "--context-source",
                source,
                "--out",
                str(tmp_path),
            ]
        )
    data = json.loads((tmp_path / "rag.json").read_text())
    table = (tmp_path / "rag.md").read_text()
    assert table.strip() in capsys.readouterr().out
    for png in ("rag_scaling.png", "rag_heatmap.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG_SIGNATURE)
    records = data["records"]
    log = (tmp_path / "rag.records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == records
    assert [(r["shape"], r["method"]) for r in records] == [(s, m) for s in rag.SHAPES for m in methods]

    for record in records:
        assert record["context_source"] == source and record["length"] == 400
        assert record["score"] == float(rag.contains(record["output"], record["answer"]))
        assert 0 <= record["answer_index"] < record["passages"]
        assert 0 <= record["answer_kept"] <= 1 and 0 < record["documents_kept"] <= 1
        assert record["prefill_seconds"] > 0
        # The answer sentence lies inside the answer passage.
        assert record["needles_kept"] == 1.0 or record["answer_kept"] < 1
        same_prompt = [r for r in records if r["shape"] == record["shape"]]
        assert {r["prompt_tokens"] for r in same_prompt} == {record["prompt_tokens"]}
        if record["method"] == "full":
            assert record["kept_tokens"] == record["prompt_tokens"]
            assert record["answer_kept"] == record["documents_kept"] == record["needles_kept"] == 1.0
        else:
            assert record["kept_tokens"] < record["prompt_tokens"]

    rows = data["summary"]
    assert [(r["shape"], r["method"]) for r in rows] == [(s, m) for s in rag.SHAPES for m in methods]
    for row in rows:
        group = [r for r in records if r["shape"] == row["shape"] and r["method"] == row["method"]]
        assert row["correct"] == sum(r["score"] for r in group) and row["runs"] == 1
        assert row["answer_kept"] == group[0]["answer_kept"]
        assert row["interval"] == pytest.approx(wilson_interval(row["correct"], 1))
        assert row["kept_runs"] == sum(r["needles_kept"] == 1 for r in group)
        assert row["kept_answered"] == sum(r["score"] for r in group if r["needles_kept"] == 1)
        full = next(r for r in records if r["shape"] == row["shape"] and r["method"] == "full")
        assert row["full_answered"] == full["score"] and row["both_answered"] == group[0]["score"] * full["score"]
        if row["method"] == "full":
            assert row["prefill_ratio"] == 1.0 and row["kv_ratio"] == 1.0
        else:  # the KV cache holds the kept tokens only
            assert row["kv_ratio"] == pytest.approx(row["kept_tokens"] / row["prompt_tokens"], rel=0.02)
    header, *cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    assert header[:3] == ["length", "shape", "method"] and header[-3:] == [
        "accuracy (95% interval)",
        "answered when kept",
        "answered where full did",
    ]
    assert len(cells) == len(rows) and cells[0][3] == f"{rows[0]['kept_tokens']:.0f} / {rows[0]['prompt_tokens']:.0f}"
    assert [r["method"] for r in data["summary_by_length"]] == methods
    assert data["command"].startswith("pd-bench rag --model")


def test_prompts_over_the_context_window_stop_the_run_before_it_starts(capsys, tmp_path, tiny_model_dir):
    # 400 tokens fit the tiny model's 4096-token window, 4000 (+ template, + probe) do not: nothing may run.
    with pytest.warns(UserWarning, match="no PromptDistill profile"), pytest.raises(SystemExit):
        main(
            [
                "rag",
                "--model",
                tiny_model_dir,
                "--lengths",
                "400,4000",
                "--samples",
                "1",
                "--shapes",
                "question_first",
                "--methods",
                "full,single-stage",
                "--layer",
                "1",
                "--budget",
                "64",
                "--out",
                str(tmp_path),
            ]
        )
    error = capsys.readouterr().err
    assert "4000-token question_first prompt: the prompt has" in error and "context window is 4096" in error
    assert not (tmp_path / "rag.records.jsonl").exists()


# The depot notes: the default corpus, one genre and one fact form, answerable by the default model.


def test_depot_notes_are_deterministic_look_alikes_with_unique_answers(tokenizer):
    from pd_integrations.corpora.depots import DEPOTS, make_depot_questions, make_depots

    corpus = make_depots()
    assert corpus == make_depots(seed=0) and [p.text for p in make_depots(seed=1)] != [p.text for p in corpus]
    assert len(corpus) == len(DEPOTS)
    sizes = [len(ids) for ids in tokenizer([p.text for p in corpus], add_special_tokens=False).input_ids]
    assert 60 <= min(sizes) and max(sizes) <= 100 and sum(sizes) > 8000  # enough notes for 8k-token prompts
    for passage in corpus:  # every note states an access code and a site manager, in the same sentence forms
        depot = passage.title.split(" depot")[0]
        assert re.search(rf"The access code for the {depot} depot is \d{{4}}\.", passage.text)
        assert re.search(rf"The site manager of the {depot} depot is [A-Z][a-z]+ [A-Z][a-z]+\.", passage.text)
        assert sum(depot in p.text for p in corpus) == 1
    questions = make_depot_questions(corpus, 12, seed=3)
    assert questions == make_depot_questions(corpus, 12, seed=3)
    assert Counter(q.question.split()[0] for q in questions) == {"What": 6, "Who": 6}
    for q in questions:
        assert [p.id for p in corpus if rag.contains(p.text, q.answer)] == [q.passage_id]
    with pytest.raises(ValueError, match="size must be between 1 and"):
        make_depots(size=len(DEPOTS) + 1)


def test_spread_moves_each_samples_answer_to_its_own_depth(tokenizer):
    plain = rag.probes(tokenizer, [1000], ["question_last"], 4, seed=5)
    spread = rag.probes(tokenizer, [1000], ["question_last"], 4, seed=5, spread=True)
    assert [p.labels["answer_index"] for p in plain] == [0, 0, 0, 0]  # the retriever ranks the answer first
    positions = [p.labels["answer_position"] for p in spread]
    assert positions == [0.125, 0.375, 0.625, 0.875]
    for p, position in zip(spread, positions):
        assert p.labels["corpus"] == "depots"
        assert p.labels["answer_index"] == round(position * (p.labels["passages"] - 1))
        assert p.answer_sentence in p.prompt.documents[p.labels["answer_index"]] and p.answer_sentence.endswith(".")
    assert sorted(spread[0].prompt.documents) == sorted(plain[0].prompt.documents)
    with pytest.raises(ValueError, match="corpus must be one of depots, handbook"):
        rag.probes(tokenizer, [1000], ["question_last"], 1, corpus="essays")
