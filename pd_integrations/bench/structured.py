"""Structured output on the default model: what a JSON-schema constraint costs in decode speed, and whether
extraction over retrieved passages parses and stays accurate when PromptDistill prunes the passages.

    python -m pd_integrations.bench.structured --samples 20 --out docs/results/structured.json

- speed: one extraction prompt, greedy, decoded under the constraint and then free for as many tokens,
  alternating `--repeats` times; the median decode tokens/s of each, and the constraint's own time per token
  (mask + advance);
- `--adapters`: only LangChain's `with_structured_output` on `--samples` one-sentence extraction prompts at
  max_tokens=80 and a forced tool call at max_tokens=32: objects and complete calls, cut-off errors, anything else;
- `--compare-libraries`: only the per-token mask time of xgrammar and, where installed, outlines-core and
  lm-format-enforcer;
- extraction: `--samples` prompts, each asking for one person's 4-field record (name, city, department, start
  year) from `--passages` look-alike staff notes passed as `documents=`, under the record's JSON schema, through
  full attention, the default profile and the profile at a 25% budget: how many parse, field accuracy against
  the truth and against full attention, and how much of the answer's passage each run kept.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError

from .. import PromptDistillConfig, PromptDistillEngine
from ..constraints import Grammars

FIRST = [
    "Maria",
    "Tomas",
    "Aiko",
    "Samuel",
    "Leila",
    "Viktor",
    "Nadia",
    "Oscar",
    "Priya",
    "Jonas",
    "Elena",
    "Kofi",
    "Ines",
    "Rafael",
    "Mei",
    "Lukas",
    "Sara",
    "Dmitri",
    "Amara",
    "Hugo",
    "Freya",
    "Omar",
    "Clara",
    "Yusuf",
]
LAST = [
    "Okafor",
    "Lindqvist",
    "Tanaka",
    "Moreau",
    "Haddad",
    "Novak",
    "Petrov",
    "Silva",
    "Raman",
    "Becker",
    "Rossi",
    "Mensah",
    "Duarte",
    "Kowalski",
    "Chen",
    "Weber",
    "Nilsen",
    "Ivanov",
    "Diallo",
    "Laurent",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Montreal",
    "Osaka",
    "Krakow",
    "Lyon",
    "Denver",
    "Porto",
    "Tallinn",
    "Accra",
    "Seville",
    "Bergen",
    "Leeds",
    "Graz",
    "Malmo",
]
DEPARTMENTS = ["logistics", "finance", "research", "marketing", "security", "legal", "support", "design"]
CONFIGS = {
    "full": PromptDistillConfig(method="full"),
    "profile": None,
    "profile 25%": PromptDistillConfig(budgets=(0.25,)),
}


class StaffRecord(BaseModel):
    # Bounded strings are part of the grammar: a small model that repeats a phrase inside a string is stopped
    # there, so every output parses within --max-new-tokens.
    name: str = Field(max_length=32)
    city: str = Field(max_length=32)
    department: str = Field(max_length=32)
    start_year: int


@dataclass(frozen=True)
class Sample:
    passages: list[str]
    question: str
    truth: StaffRecord
    answer_passage: int


def make_samples(count: int, passages: int, seed: int = 0) -> list[Sample]:
    """`count` prompts, each over `passages` staff notes of different people, one of which is asked about."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        names = rng.sample([f"{first} {last}" for first in FIRST for last in LAST], passages)
        records = [
            StaffRecord(
                name=n, city=rng.choice(CITIES), department=rng.choice(DEPARTMENTS), start_year=rng.randint(1995, 2023)
            )
            for n in names
        ]
        notes = [
            f"{r.name} joined the {r.department} department in {r.start_year} and works from the {r.city} "
            f"office. {r.name.split()[0]} {rng.choice(_HABITS)}."
            for r in records
        ]
        target = rng.randrange(passages)
        samples.append(Sample(notes, f"What is the staff record of {records[target].name}?", records[target], target))
    return samples


_HABITS = [
    "keeps a plant on every desk",
    "cycles to work in all weather",
    "runs the quarterly quiz",
    "speaks four languages",
    "mentors new hires",
    "organises the winter party",
    "collects old maps",
    "bakes bread for the team on Fridays",
]


def messages_for(sample: Sample) -> list[dict[str, str]]:
    context = "\n\n".join(sample.passages)
    return [
        {"role": "system", "content": "You extract staff records from the notes you are given."},
        {
            "role": "user",
            "content": f"Staff notes:\n\n{context}\n\n{sample.question} Reply with JSON: name, "
            f"city, department and start_year.",
        },
    ]


def field_matches(record: StaffRecord, truth: StaffRecord) -> list[bool]:
    return [
        str(getattr(record, f)).strip().lower() == str(getattr(truth, f)).strip().lower()
        for f in StaffRecord.model_fields
    ]


class _TimedConstraint:
    """A constraint that records the time its mask and advance take (the decode loop calls both per token)."""

    def __init__(self, constraint):
        self.constraint, self.seconds, self.tokens = constraint, 0.0, 0

    def mask(self, scores):
        started = time.perf_counter()
        scores = self.constraint.mask(scores)
        self.seconds += time.perf_counter() - started
        return scores

    def advance(self, token):
        started = time.perf_counter()
        self.constraint.advance(token)
        self.seconds += time.perf_counter() - started
        self.tokens += 1

    def is_finished(self):
        return self.constraint.is_finished()


def measure_speed(engine: PromptDistillEngine, sample: Sample, repeats: int, max_new_tokens: int) -> dict:
    grammar = Grammars.of(engine).json_schema(StaffRecord.model_json_schema())
    free, constrained, per_token = [], [], []
    for _ in range(repeats):  # alternating, so that load from other processes hits both alike
        timed = _TimedConstraint(grammar.constraint())
        result = engine.generate(messages=messages_for(sample), max_new_tokens=max_new_tokens, constraint=timed)
        constrained.append((result.decode_tokens_per_second, result.output_tokens))
        per_token.append(timed.seconds / max(timed.tokens, 1))
        # As many tokens free as the record took (a step costs more as the cache grows), unless EOS comes first.
        result = engine.generate(messages=messages_for(sample), max_new_tokens=result.output_tokens)
        free.append((result.decode_tokens_per_second, result.output_tokens))
    free_tps = statistics.median(t for t, _ in free)
    constrained_tps = statistics.median(t for t, _ in constrained)
    return {
        "free_tokens_per_second": free_tps,
        "constrained_tokens_per_second": constrained_tps,
        "slowdown": 1 - constrained_tps / free_tps,
        "free_output_tokens": [n for _, n in free],
        "constrained_output_tokens": [n for _, n in constrained],
        "constraint_ms_per_token": 1000 * statistics.median(per_token),
    }


def measure_extraction(engine: PromptDistillEngine, samples: list[Sample], max_new_tokens: int) -> dict:
    grammar = Grammars.of(engine).json_schema(StaffRecord.model_json_schema())
    runs = {}
    for label, config in CONFIGS.items():
        configured = engine.with_config(config) if config is not None else engine
        rows = []
        for sample in samples:
            result = configured.generate(
                messages=messages_for(sample),
                documents=sample.passages,
                query=sample.question,
                max_new_tokens=max_new_tokens,
                constraint=grammar.constraint(),
            )
            try:
                record = StaffRecord.model_validate_json(result.text)
            except ValidationError:
                record = None
            rows.append(
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "parsed": record is not None,
                    "fields": field_matches(record, sample.truth) if record else [False] * 4,
                    "answer_passage_kept": result.document_retention[sample.answer_passage],
                    "kept_tokens": result.kept_tokens,
                    "prompt_tokens": result.prompt_tokens,
                }
            )
        runs[label] = rows
    summary = {}
    for label, rows in runs.items():
        fields = [f for row in rows for f in row["fields"]]
        same_as_full = [row["text"] == full["text"] for row, full in zip(rows, runs["full"])]
        summary[label] = {
            "parsed": sum(row["parsed"] for row in rows),
            "samples": len(rows),
            "field_accuracy": sum(fields) / len(fields),
            "same_output_as_full": sum(same_as_full),
            "answer_passage_kept": statistics.mean(row["answer_passage_kept"] for row in rows),
            "kept_tokens": statistics.mean(row["kept_tokens"] for row in rows),
            "prompt_tokens": statistics.mean(row["prompt_tokens"] for row in rows),
        }
    return {"summary": summary, "runs": runs}


def compare_libraries(tokenizer, rounds: int = 8) -> dict[str, dict[str, float]]:
    """Median and best ms per token to compute and apply the next-token mask along one 35-token StaffRecord output, for
    xgrammar and, where installed, outlines-core and lm-format-enforcer (not dependencies: install them to
    compare). The libraries alternate each round, so that load from other processes hits all alike; the first
    round warms up."""
    import torch
    import xgrammar as xgr

    schema = json.dumps(StaffRecord.model_json_schema())
    ids = tokenizer(
        '{"name": "Maria Okafor", "city": "Lisbon", "department": "logistics", "start_year": 2014}',
        add_special_tokens=False,
    )["input_ids"]
    width, scores = len(tokenizer), torch.randn(1, len(tokenizer))
    runs = {"xgrammar": _xgrammar_run(xgr, tokenizer, schema, ids, scores, width)}
    for name, make_run in (("outlines-core", _outlines_run), ("lm-format-enforcer", _lmfe_run)):
        run = make_run(tokenizer, schema, ids, scores, width)
        if run is not None:
            runs[name] = run
    return _time_runs(runs, len(ids), rounds)


def _xgrammar_run(xgr, tokenizer, schema: str, ids: list[int], scores, width: int):
    """One pass of `compare_libraries` with xgrammar: a fresh matcher masks `scores` before each token of `ids`."""
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer)).compile_json_schema(
        schema, any_whitespace=False
    )
    bitmask = xgr.allocate_token_bitmask(1, width)

    def xgrammar_run():
        matcher = xgr.GrammarMatcher(compiled)
        for token in ids:
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(scores.clone(), bitmask)
            matcher.accept_token(token)

    return xgrammar_run


def _outlines_run(tokenizer, schema: str, ids: list[int], scores, width: int):
    """The same pass with outlines-core, or None where it isn't installed."""
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import (
            allocate_token_bitmask,
            apply_token_bitmask_inplace,
            fill_next_token_bitmask,
        )
    except ImportError:
        return None
    tokens: dict[str, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i != tokenizer.eos_token_id:
            tokens.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(i)
    index = Index(build_regex_from_schema(schema), Vocabulary(tokenizer.eos_token_id, tokens))
    outlines_mask = allocate_token_bitmask(width)

    def outlines_run():
        guide = Guide(index)
        for token in ids:
            fill_next_token_bitmask(guide, outlines_mask)
            apply_token_bitmask_inplace(scores.clone(), outlines_mask)
            guide.advance(token)

    return outlines_run


def _lmfe_run(tokenizer, schema: str, ids: list[int], scores, width: int):
    """The same pass with lm-format-enforcer (allowed token ids, then a -inf mask), or None where it isn't installed."""
    import sys

    import torch

    try:
        import transformers.tokenization_utils_base

        # lm-format-enforcer 0.11 imports a module transformers 5 no longer has; alias it to measure the library.
        sys.modules.setdefault("transformers.tokenization_utils", transformers.tokenization_utils_base)
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data
    except ImportError:
        return None
    data = build_token_enforcer_tokenizer_data(tokenizer)

    def lmfe_run():
        enforcer = TokenEnforcer(data, JsonSchemaParser(json.loads(schema)))
        for k in range(len(ids)):
            allowed = enforcer.get_allowed_tokens(ids[:k]).allowed_tokens  # a list of token ids
            masked = torch.full_like(scores, float("-inf"))
            masked[0, allowed] = scores[0, allowed]

    return lmfe_run


def _time_runs(runs: dict, tokens: int, rounds: int) -> dict[str, dict[str, float]]:
    """Run each of `runs` once per round, alternating; median and best ms per token, skipping the warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) / tokens)
    return {
        name: {"median_ms": 1000 * statistics.median(t[1:]), "best_ms": 1000 * min(t[1:])} for name, t in times.items()
    }


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str  # unbounded, as users write schemas: a small model may loop inside it until max_tokens
    age: int


def extraction_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` one-sentence extraction prompts, a few with braces, quotes and tags in them."""
    rng = random.Random(seed)
    tails = ["", ' Her badge reads "}</tool_call>".', " He signs notes with {braces}.", ' Her motto: "a \\ b".']
    return [
        f"Extract the person: {rng.choice(FIRST)} {rng.choice(LAST)} is {rng.randint(19, 70)} years old and "
        f"lives in {rng.choice(CITIES)}.{tails[i % len(tails)]}"
        for i in range(count)
    ]


def measure_adapters(prompts: list[str], max_tokens: int, call_max_tokens: int) -> dict:
    """LangChain's `with_structured_output(Person)` (json_schema and function_calling) at `max_tokens`, and a
    forced `bind_tools` call at `call_max_tokens`: how many come back as an object or complete call, as a cut-off
    error saying so, or as anything else (None, leaked wrapper text, a wrong error)."""
    from langchain_core.tools import tool

    from ..langchain import ChatPromptDistill

    @tool
    def magic_function(input: int) -> int:
        """Applies a magic function to an input."""
        return input + 2

    llm = ChatPromptDistill(max_tokens=max_tokens)
    results = {}
    for method in ("json_schema", "function_calling"):
        runnable = llm.with_structured_output(Person, method=method, include_raw=True)
        counts = {"object": 0, "cut_off_error": 0, "other": 0}
        for prompt in prompts:
            out = runnable.invoke(prompt)
            if isinstance(out["parsed"], Person):
                counts["object"] += 1
            elif out["parsing_error"] is not None and "cut off" in str(out["parsing_error"]):
                counts["cut_off_error"] += 1
            else:
                counts["other"] += 1
        results[f"with_structured_output {method}, max_tokens={max_tokens}"] = counts
    forced = ChatPromptDistill(max_tokens=call_max_tokens).bind_tools([magic_function], tool_choice="any")
    counts = {"complete": 0, "reported_cut_off": 0, "other": 0}
    for x in range(len(prompts)):
        message = forced.invoke(f"What is the value of magic_function({3 + 7 * x})? Use the tool.")
        arguments = [call["args"] for call in message.tool_calls + message.invalid_tool_calls]
        wrapper = "tool_call" in str(message.content) + str(arguments)  # leaked text of the <tool_call> wrapper
        if message.tool_calls and message.response_metadata["finish_reason"] == "tool_calls" and not wrapper:
            counts["complete"] += 1
        elif (
            message.invalid_tool_calls
            and "cut off" in message.invalid_tool_calls[0]["error"]
            and not wrapper
            and message.response_metadata["finish_reason"] == "length"
        ):
            counts["reported_cut_off"] += 1
        else:
            counts["other"] += 1
    results[f"forced tool call, max_tokens={call_max_tokens}"] = counts
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--passages", type=int, default=10, help="staff notes per prompt (~32 tokens each)")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs with and without the constraint")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="room for the longest record the schema allows")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--compare-libraries",
        action="store_true",
        help="only compare the mask time per token of the installed grammar libraries",
    )
    parser.add_argument(
        "--adapters",
        action="store_true",
        help="only count objects, cut-off errors and anything "
        "else from LangChain's structured output (max_tokens 80) and forced calls (max_tokens 32)",
    )
    args = parser.parse_args(argv)
    if args.adapters:
        print(json.dumps(measure_adapters(extraction_prompts(args.samples), 80, 32), indent=1))
        return
    engine = PromptDistillEngine.from_pretrained(device="cpu", dtype="float32")
    if args.compare_libraries:
        print(json.dumps(compare_libraries(engine.tokenizer), indent=1))
        return
    samples = make_samples(args.samples, args.passages)
    results = {"speed": measure_speed(engine, samples[0], args.repeats, args.max_new_tokens)}
    print(json.dumps(results["speed"], indent=1), flush=True)
    results["extraction"] = measure_extraction(engine, samples, args.max_new_tokens)
    print(json.dumps(results["extraction"]["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: o.model_dump())


if __name__ == "__main__":
    main()
