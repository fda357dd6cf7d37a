"""The two calibrations end to end: `calibrate` on needle probes and `calibrate_rag` on RAG-shaped probes, each
recording, searching, verifying and writing the model's profile."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Profile, PromptDistillConfig, cache_dir, profile_key
from ..engine import PromptDistillEngine
from ..loading import DEFAULT_MODEL
from .cost import Schedule, predicted_prefill_ratio
from .frontier import plot_frontier
from .records import (
    RAG_ORDERS,
    ProbeRecord,
    load_records,
    make_probes,
    rag_probes,
    record_probes,
    record_rag_probes,
    save_records,
)
from .search import (
    candidate_schedules,
    choose_retrieval_heads,
    keeps_evidence,
    needle_rank_table,
    rag_search,
    report_budget,
)
from .verify import verification_probes, verify_schedules

# What every probe is recorded with: the question span as seeds, each head's softmax averaged.
RECORDING = {"query_source": "auto", "aggregation": "softmax_mean"}


def calibrate(
    model: str = DEFAULT_MODEL,
    *,
    engine: PromptDistillEngine | None = None,
    haystack: str | None = None,
    lengths: tuple[int, ...] = (2000, 4000),
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    kinds: tuple[str, ...] = ("passcode", "city", "magic_word"),
    seed: int = 0,
    verify: int = 10,
    plan_length: int = 8192,
    out: Path | None = None,
) -> Profile:
    """Calibrate `model` (or an already loaded `engine`) on needle probes and write its profile.

    Args:
        model, engine: the model's name, and an engine already holding it (else it is loaded).
        haystack, lengths, depths, kinds, seed: the needle probes (`records.make_probes`).
        verify: probes run end to end to verify the cheapest schedules (0: none).
        plan_length: the prompt length the cost model optimises.
        out: the profile's path (default: the cache's `profiles/<model>.json`).

    Returns:
        The written `Profile`.

    Raises:
        ValueError: lengths that don't fit the model, or an unknown needle kind.
    """
    engine = engine or PromptDistillEngine.from_pretrained(model)
    num_layers = engine.arch.num_layers
    probes = make_probes(engine, haystack, lengths, depths, kinds, seed)
    records = record_probes(engine.with_config(PromptDistillConfig(**RECORDING)), probes)
    ranked, search = _search_needles(records, num_layers, lengths, plan_length)
    verify_probes = verification_probes(probes, verify)
    chosen, chosen_rate, full_rate, runs = verify_schedules(engine, ranked, verify_probes)
    measurements = {
        "probes": len(probes),
        "lengths": list(lengths),
        "depths": list(depths),
        "kinds": list(kinds),
        "seed": seed,
        "plan_length": plan_length,
        **search,
        "predicted_prefill_cost": round(chosen.cost(num_layers, plan_length), 3),
        "verified_accuracy": chosen_rate,
        "full_attention_accuracy": full_rate,
        "verification_runs": runs,
        "verification_probes": len(verify_probes),
    }
    return write_profile(Profile(profile_key(model), num_layers, chosen.settings()), measurements, out)


def _search_needles(
    records: list[ProbeRecord], num_layers: int, lengths: tuple[int, ...], plan_length: int
) -> tuple[list[Schedule], dict]:
    """(the candidate schedules that keep the most probes' needles, cheapest first at `plan_length`, and what the
    search measured: recall per layer, retrieval heads, that kept share)."""
    table = needle_rank_table(records, report_budget(lengths))
    retrieval_heads = choose_retrieval_heads(table)
    schedules = candidate_schedules(num_layers, retrieval_heads, max(lengths))
    kept_share = {
        s: sum(keeps_evidence(s, r) for r in records) / len(records)
        for s in tqdm(schedules, desc="replaying schedules", unit="schedule")
    }
    best_share = max(kept_share.values())
    if best_share < 1:
        warnings.warn(
            f"no schedule kept every probe's needle (best {best_share:.0%}); choosing among the best", stacklevel=3
        )
    ranked = sorted(
        (s for s in schedules if kept_share[s] == best_share),
        key=lambda s: (s.cost(num_layers, plan_length), -s.stages[-1][1]),
    )
    return ranked, {
        "needle_recall_at_budget": report_budget(lengths),
        "layer_needle_recall": [round(float(v), 3) for v in table.mean(1)],
        "retrieval_heads": {str(k): list(v) for k, v in retrieval_heads.items()},
        "predicted_kept_share": best_share,
    }


def write_profile(profile: Profile, calibration: dict, out: Path | None) -> Profile:
    """Write `profile` with its `calibration` measurements to `out` (default: the cache) and read it back."""
    out = out or cache_dir() / "profiles" / f"{profile.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.to_json(out, {"calibration": calibration})
    return Profile.from_json(out)


def calibrate_rag(
    model: str = DEFAULT_MODEL,
    *,
    engine: PromptDistillEngine | None = None,
    rag_lengths: tuple[int, ...] = (1000, 2000),
    rag_samples: int = 4,
    seed: int = 100,
    rag_orders: tuple[str, ...] = RAG_ORDERS,
    records_path: Path | None = None,
    from_records: list[Path] | None = None,
    verify: int = 6,
    floor_length: int = 1536,
    plan_lengths: tuple[int, ...] = (2000, 4000, 8000),
    out: Path | None = None,
) -> Profile:
    """Calibrate on RAG-shaped probes (depot notes retrieved by MiniLM, in four prompt shapes; docs/calibration.md)
    and write the profile that keeps every answer sentence at the lowest predicted cost, verified end to end.

    Args:
        model, engine: the model's name, and an engine already holding it (else it is loaded).
        rag_lengths, rag_samples, seed, rag_orders: the probes (`records.rag_probes`).
        records_path: where records are saved (default: the cache's `calibration/<model>.rag.pt`), with every
            schedule tried beside them (`.search.json`) and, with matplotlib, its frontier (`.frontier.png`).
        from_records, verify: saved records to re-search instead of recording; probes run end to end (0: none).
        floor_length: the chosen stages keep at least what they keep of this many prunable tokens (0: no floors).
        plan_lengths, out: the lengths schedules are priced at; the profile's path (default: the cache).

    Returns:
        The written `Profile`.

    Raises:
        ValueError: a `floor_length` that is not an int >= 0, or an unknown passage order.
    """
    check_floor_length(floor_length)
    engine = engine or PromptDistillEngine.from_pretrained(model)
    records_path = records_path or cache_dir() / "calibration" / f"{profile_key(model)}.rag.pt"
    probes = rag_probes(engine.tokenizer, rag_lengths, rag_samples, seed, rag_orders)
    records = _rag_records(engine, probes, from_records, records_path)
    chosen, search = _search_rag(engine, records, probes, verify, records_path, plan_lengths, floor_length)
    measurements = {
        "rag_probes": len(records),
        "rag_lengths": list(rag_lengths),
        "rag_samples": rag_samples,
        "seed": seed,
        "rag_orders": list(rag_orders),
        "records": str(records_path),
        **search,
        "floor_length": floor_length,
    }
    return write_profile(Profile(profile_key(model), engine.arch.num_layers, chosen.settings()), measurements, out)


def check_floor_length(floor_length) -> None:
    """Raise `ValueError` unless `floor_length` is an int >= 0."""
    if isinstance(floor_length, bool) or not isinstance(floor_length, int) or floor_length < 0:
        raise ValueError(f"floor_length must be an int >= 0 (0: no floors), got {floor_length!r}")


def _search_rag(
    engine: PromptDistillEngine,
    records: list[ProbeRecord],
    probes: list,
    verify: int,
    records_path: Path,
    plan_lengths: tuple[int, ...],
    floor_length: int,
) -> tuple[Schedule, dict]:
    """(the schedule verified on `verify` of `probes`, floored at `floor_length` when not 0, and what the search and
    verification measured); the search is written beside `records_path` (`.search.json`), its frontier beside it."""
    num_layers = engine.arch.num_layers
    verify_probes = verification_probes(probes, verify)
    tried = rag_search(records, num_layers, plan_lengths)
    search_path = _save_search(tried, Path(records_path).with_suffix(".search.json"))
    best = tried[0]["kept_share"]
    ranked = [row["schedule"] for row in tried if row["kept_share"] == best]
    chosen, rate, full_rate, runs = verify_schedules(engine, ranked, verify_probes)
    chosen = chosen.floored(floor_length) if floor_length else chosen
    _plot_search(search_path, chosen, best, num_layers, max(plan_lengths))
    return chosen, {
        "schedules_tried": len(tried),
        "predicted_kept_share": best,
        "predicted_prefill_ratio": {
            str(n): round(predicted_prefill_ratio(chosen, num_layers, n), 3) for n in plan_lengths
        },
        "verified_accuracy": rate,
        "full_attention_accuracy": full_rate,
        "verification_probes": len(verify_probes),
        "verification_runs": runs,
    }


def _rag_records(
    engine: PromptDistillEngine, probes: list, from_records: list[Path] | None, records_path: Path
) -> list[ProbeRecord]:
    """The records saved at `from_records`, or `probes` recorded now and saved to `records_path`."""
    if from_records:
        return [record for path in from_records for record in load_records(path)]
    records = record_rag_probes(engine.with_config(PromptDistillConfig(**RECORDING)), probes)
    save_records(records, records_path)
    return records


def _save_search(tried: list[dict], path: Path) -> Path:
    """Write `rag_search`'s rows, schedules as settings dicts, to `path` (returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{**row, "schedule": row["schedule"].settings()} for row in tried]) + "\n")
    return path


def _plot_search(search_path: Path, chosen: Schedule, kept_share: float, num_layers: int, length: int) -> None:
    """The accuracy/speed frontier of the search written at `search_path`, at `length` tokens, with `chosen`
    marked, beside it (`.frontier.png`); skipped without matplotlib (the `bench` extra)."""
    if not importlib.util.find_spec("matplotlib"):
        return
    ratio = predicted_prefill_ratio(chosen, num_layers, length)
    plot_frontier(
        json.loads(search_path.read_text()),
        search_path.with_name(search_path.name.replace(".search.json", ".frontier.png")),
        length,
        {f"chosen profile (predicted {ratio:.2f})": (ratio, kept_share)},
    )
