"""Calibration on several kinds of text with a split it never sees: `pd-calibrate --quick`.

Probes come from the depots and handbook RAG corpora (four prompt shapes each, answer passage spread over depths)
and from needles in a haystack. Each kind is split in two, alternately: the schedule is searched and verified on the
*calibration* half only, then run end to end on the *held-out* half, and the generalization gap (calibration answer
rate minus held-out answer rate) is reported beside full attention's on the same probes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Profile, PromptDistillConfig, profile_key
from ..corpora import rag
from ..engine import PromptDistillEngine
from ..loading import DEFAULT_MODEL
from ..probes import NeedleProbe
from .cost import Schedule, predicted_prefill_ratio
from .records import make_probes, record_probes, record_rag_probes
from .run import RECORDING, check_floor_length, write_profile
from .search import rag_search
from .verify import Verification, answer_rate, verify_schedules

# What `--quick` searches: 64-token chunks ranked by their 8 best tokens, detrended or not (the units and scorings
# that held on essays and RAG prompts for the default model); the full `--rag` search tries passages and more.
QUICK_SEARCH = {"spans": (("chunk", 64),), "scorings": ("topk_mean",), "detrend_windows": (0, 1024)}
CORPORA = ("depots", "handbook")


@dataclass(frozen=True)
class Rate:
    """Answers and kept evidence of one method on some probes."""

    answered: int
    kept: int
    probes: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The Wilson score interval (95% by default) of the answered share."""
        return wilson_interval(self.answered, self.probes, z)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a share `successes / n`; (0, 1) for no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def split_probes(probes: list) -> tuple[list, list]:
    """(calibration half, held-out half) of `probes`: alternate probes, so both halves span every cell."""
    return probes[0::2], probes[1::2]


def mixed_probes(engine: PromptDistillEngine, lengths, samples: int, seed: int, haystack: str | None) -> dict:
    """Per kind of text, its probes: each RAG corpus in the four shapes with the answer spread, and needles.

    Args:
        engine: the engine whose tokenizer measures the lengths.
        lengths: context lengths in tokens.
        samples: questions (needles) per length, shape and corpus.
        seed: the first question's seed.
        haystack: a folder of `.txt` files for the needles, or None for the built-in haystack.

    Returns:
        {kind: probes}, kinds "depots", "handbook" and "needles".
    """
    kinds = {
        corpus: rag.probes(engine.tokenizer, list(lengths), list(rag.SHAPES), samples, seed, corpus=corpus, spread=True)
        for corpus in CORPORA
    }
    depths = [(k + 0.5) / samples for k in range(samples)]
    kinds["needles"] = make_probes(engine, haystack, lengths, depths, ("passcode", "city", "magic_word"), seed)
    return kinds


def counted(engine: PromptDistillEngine, probes: list, desc: str) -> Rate:
    """`answer_rate` of `probes` as counts."""
    answered, kept = answer_rate(engine, probes, desc)
    return Rate(round(answered * len(probes)), round(kept * len(probes)), len(probes))


def calibrate_mixed(
    model: str = DEFAULT_MODEL,
    *,
    engine: PromptDistillEngine | None = None,
    lengths: tuple[int, ...] = (1000, 2000),
    samples: int = 2,
    seed: int = 300,
    haystack: str | None = None,
    verify_candidates: int = 3,
    floor_length: int = 1536,
    plan_lengths: tuple[int, ...] = (2000, 4000, 8000),
    out: Path | None = None,
) -> tuple[Profile, dict]:
    """Calibrate on the calibration half of `mixed_probes`, then measure the chosen schedule on the held-out half.

    Args:
        model, engine: the model's name, and an engine already holding it (else it is loaded).
        lengths, samples, seed, haystack: the probes (`mixed_probes`).
        verify_candidates: how many of the search's cheapest schedules are run end to end on the calibration half.
        floor_length: the chosen stages keep at least what they keep of this many prunable tokens (0: no floors).
        plan_lengths, out: the lengths schedules are priced at; the profile's path (default: the cache).

    Returns:
        (the written `Profile`, its measurements: answers per kind, split and method, and the generalization gap).

    Raises:
        ValueError: a bad `samples` or `floor_length`, or lengths that don't fit the model or the haystack.
    """
    check_floor_length(floor_length)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    started = time.perf_counter()
    engine = engine or PromptDistillEngine.from_pretrained(model)
    probes = mixed_probes(engine, lengths, samples, seed, haystack)
    kinds = {kind: split_probes(kind_probes) for kind, kind_probes in probes.items()}
    verification, search = _search_and_verify(engine, [p for c, _ in kinds.values() for p in c], verify_candidates)
    chosen = verification.chosen.floored(floor_length) if floor_length else verification.chosen
    measurements = {
        "probes": {kind: {"calibration": len(c), "heldout": len(h)} for kind, (c, h) in kinds.items()},
        **{"lengths": list(lengths), "samples": samples, "seed": seed, **search},
        "predicted_prefill_ratio": {
            str(n): round(predicted_prefill_ratio(chosen, engine.arch.num_layers, n), 3) for n in plan_lengths
        },
        "verification_runs": verification.runs,
        **_measure_splits(engine, chosen, kinds),
        "floor_length": floor_length,
        "seconds": round(time.perf_counter() - started),
    }
    profile = Profile(profile_key(model), engine.arch.num_layers, chosen.settings())
    return write_profile(profile, measurements, out), measurements


def _search_and_verify(engine: PromptDistillEngine, calibration: list, candidates: int) -> tuple[Verification, dict]:
    """(the verification, end to end on the recorded `calibration` probes, of the `candidates` cheapest schedules
    that `rag_search` finds keep the most evidence, and how many schedules it tried with that kept share)."""
    recorder = engine.with_config(PromptDistillConfig(**RECORDING))
    records = record_probes(recorder, [p for p in calibration if isinstance(p, NeedleProbe)]) + record_rag_probes(
        recorder, [p for p in calibration if not isinstance(p, NeedleProbe)]
    )
    tried = rag_search(records, engine.arch.num_layers, **QUICK_SEARCH)
    best = tried[0]["kept_share"]
    ranked = [row["schedule"] for row in tried if row["kept_share"] == best][:candidates]
    search = {"schedules_tried": len(tried), "predicted_kept_share": best}
    return verify_schedules(engine, ranked, calibration), search


def _measure_splits(engine: PromptDistillEngine, chosen: Schedule, kinds: dict) -> dict:
    """The chosen schedule and full attention end to end on both halves of every kind, and the gap."""
    methods = {
        "profile": engine.with_config(PromptDistillConfig(**chosen.settings())),
        "full": engine.with_config(PromptDistillConfig(method="full")),
    }
    table = {
        kind: {
            split: {name: vars(counted(e, probes, f"{name}, {kind}, {split}")) for name, e in methods.items()}
            for split, probes in (("calibration", calib), ("heldout", heldout))
        }
        for kind, (calib, heldout) in kinds.items()
    }
    totals = {
        split: {name: sum(table[k][split][name]["answered"] for k in table) for name in methods}
        for split in ("calibration", "heldout")
    }
    sizes = {split: sum(table[k][split]["full"]["probes"] for k in table) for split in ("calibration", "heldout")}
    gap = {
        name: totals["calibration"][name] / sizes["calibration"] - totals["heldout"][name] / sizes["heldout"]
        for name in methods
    }
    return {"answers": table, "totals": totals, "split_sizes": sizes, "generalization_gap": gap}


def report(measurements: dict) -> str:
    """The measurements of `calibrate_mixed` as a table: per kind and split, answered (95% interval) and kept."""
    lines = [
        "| kind | split | profile answered | 95% interval | evidence kept | full attention answered |",
        "|" + "---|" * 6,
    ]
    for kind, splits in measurements["answers"].items():
        for split, methods in splits.items():
            profile, full = Rate(**methods["profile"]), Rate(**methods["full"])
            low, high = profile.interval()
            lines.append(
                f"| {kind} | {split} | {profile.answered}/{profile.probes} | {low:.2f}–{high:.2f} | "
                f"{profile.kept}/{profile.probes} | {full.answered}/{full.probes} |"
            )
    gap = measurements["generalization_gap"]
    lines.append(
        f"\ngeneralization gap (calibration answer rate − held-out answer rate): profile {gap['profile']:+.2f}, "
        f"full attention {gap['full']:+.2f}; {measurements['seconds']} s in all"
    )
    return "\n".join(lines)
