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


def answer_rate(engine: PromptDistillEngine, probes: list[NeedleProbe | RagProbe], desc: str) -> tuple[float, float]:
    """Run needle and RAG `probes` end to end.

    Args:
        engine: the engine run.
        probes: needle probes, RAG probes, or both.
        desc: the progress bar's description.

    Returns:
        (share of probes answered, share whose evidence sentence (needle, or answer sentence) the engine kept).
    """
    answers = kept = 0
    for probe in tqdm(probes, desc=desc, unit="probe", leave=False):
        if isinstance(probe, NeedleProbe):
            call = {"messages": probe.messages(), "query": probe.question, "documents": [probe.context]}
            evidence, answered = probe.needle, probe.is_answered
        else:
            prompt = probe.prompt
            call = {"messages": prompt.messages, "query": prompt.query, "documents": prompt.documents}
            evidence, answered = probe.answer_sentence, lambda text, answer=prompt.answer: contains(text, answer)
        result = engine.generate(**call, max_new_tokens=24)
        answers += answered(result.text)
        kept += needles_kept(result.prompt_text, result.kept_char_spans, (evidence,))
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
        rate_of: `rate_of(engine, probes, description)` -> (answered share, evidence-kept share).

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
