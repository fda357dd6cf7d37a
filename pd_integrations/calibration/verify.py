"""End-to-end verification of the search's cheapest schedules against full attention: answer rates, verification
probes, and the choice among the candidates."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

from tqdm.auto import tqdm

from ..config import PromptDistillConfig
from ..corpora.rag import RagProbe, contains
from ..engine import PromptDistillEngine
from ..probes import NeedleProbe, needles_kept
from .cost import Schedule


def answer_rate(engine: PromptDistillEngine, probes: list[NeedleProbe], desc: str) -> tuple[float, float]:
    """Run needle `probes` end to end.

    Args:
        engine: the engine run.
        probes: the needle probes.
        desc: the progress bar's description.

    Returns:
        (share of probes answered, share whose needle sentence the engine kept).
    """
    return _rates(
        engine,
        probes,
        desc,
        lambda probe: {"messages": probe.messages(), "query": probe.question, "documents": [probe.context]},
        lambda probe, text: probe.is_answered(text),
        lambda probe: probe.needle,
    )


def rag_answer_rate(engine: PromptDistillEngine, probes: list[RagProbe], desc: str) -> tuple[float, float]:
    """Run RAG `probes` end to end.

    Args:
        engine: the engine run.
        probes: the RAG probes.
        desc: the progress bar's description.

    Returns:
        (share of probes answered, share whose answer sentence the engine kept).
    """
    return _rates(
        engine,
        probes,
        desc,
        lambda probe: {
            "messages": probe.prompt.messages,
            "query": probe.prompt.query,
            "documents": probe.prompt.documents,
        },
        lambda probe, text: contains(text, probe.prompt.answer),
        lambda probe: probe.answer_sentence,
    )


def _rates(
    engine: PromptDistillEngine, probes: list, desc: str, call: Callable, answered: Callable, evidence: Callable
) -> tuple[float, float]:
    """(share of `probes` `answered(probe, text)`, share whose `evidence(probe)` sentence the engine kept), each
    generated from `call(probe)`'s keyword arguments."""
    answers = kept = 0
    for probe in tqdm(probes, desc=desc, unit="probe", leave=False):
        result = engine.generate(**call(probe), max_new_tokens=24)
        answers += answered(probe, result.text)
        kept += needles_kept(result.prompt_text, result.kept_char_spans, (evidence(probe),))
    return answers / len(probes), kept / len(probes)


def verification_probes(probes: list, count: int) -> list:
    """`count` of `probes`, evenly spaced over them.

    Args:
        probes: the calibration probes.
        count: how many to verify with.

    Returns:
        The probes chosen (none for 0).
    """
    return probes[:: max(1, len(probes) // count)][:count] if count else []


class Verification(NamedTuple):
    """The schedule verification chose, its answer rate and full attention's (None when unverified), and every
    candidate run: its layers, budgets and heads with the shares of probes it answered and whose evidence it kept."""

    chosen: Schedule
    rate: float | None
    full_rate: float | None
    runs: list[dict]


def verify_schedules(
    engine: PromptDistillEngine, ranked: list[Schedule], probes: list, rate_of: Callable = answer_rate
) -> Verification:
    """Choose the first of the five cheapest `ranked` schedules whose real runs keep every probe's evidence (the
    search replays stage 2 on the unpruned pass, which a real run can disagree with) and answer as often as full
    attention; else, with a warning, the cheapest. Without probes, the cheapest, unverified.

    Args:
        engine: the engine whose weights run the schedules.
        ranked: the search's schedules, cheapest first.
        probes: the verification probes.
        rate_of: `rate_of(engine, probes, description)` -> (answered share, evidence-kept share): `answer_rate` for
            needles, `rag_answer_rate` for RAG probes.

    Returns:
        The `Verification`.
    """
    if not probes:
        return Verification(ranked[0], None, None, [])
    full_rate, _ = rate_of(engine.with_config(PromptDistillConfig(method="full")), probes, "full attention")
    runs = []
    for schedule in ranked[:5]:
        settings = schedule.settings()
        rate, kept = rate_of(
            engine.with_config(PromptDistillConfig(**settings)),
            probes,
            f"verifying layers {settings['selection_layers']}",
        )
        runs.append(
            {key: settings[key] for key in ("selection_layers", "budgets", "heads")}
            | {"answered": rate, "evidence_kept": kept}
        )
        if kept == 1.0 and rate >= full_rate:
            return Verification(schedule, rate, full_rate, runs)
    warnings.warn(
        "no candidate kept every verification probe's evidence and matched full attention's accuracy; "
        "keeping the cheapest schedule that keeps it in the search",
        stacklevel=3,
    )
    return Verification(ranked[0], None, full_rate, runs)
