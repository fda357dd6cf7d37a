"""Measure where a model's question→context retrieval happens and pick the fastest schedule that keeps it.

The `pd-calibrate` command (also `python -m pd_integrations.calibration`); docs/calibration.md describes each mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..engine import PromptDistillEngine
from ..loading import DEFAULT_MODEL
from ..probes import NEEDLE_KINDS
from .mixed import calibrate_mixed, report
from .records import RAG_ORDERS, make_probes
from .run import calibrate, calibrate_rag
from .search import compare_scoring, report_budget


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pd-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--kinds", nargs="+", default=["passcode", "city", "magic_word"], choices=NEEDLE_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", type=int, default=10, help="probes for end-to-end verification (0 = skip)")
    parser.add_argument("--plan-length", type=int, default=8192, help="prompt length the cost model optimises")
    parser.add_argument("--out", type=Path, default=None, help="profile path (default: the cache)")
    _add_rag_arguments(parser)
    parser.add_argument(
        "--compare-scoring",
        action="store_true",
        help="only measure, per layer, how often each seed/aggregation choice ranks the needle in the "
        "top candidates, print it and exit",
    )
    return parser


def _add_rag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rag",
        action="store_true",
        help="calibrate on RAG-shaped probes (retrieved look-alike passages, four prompt shapes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="calibrate on several kinds of text (two RAG corpora in four shapes, needles) with a held-out "
        "split, and print the generalization gap: about 3 minutes for a 135M model on 2 CPU cores",
    )
    parser.add_argument("--rag-lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument(
        "--rag-samples", type=int, default=None, help="questions per length and shape (default: 4; --quick: 2)"
    )
    parser.add_argument(
        "--rag-orders",
        nargs="+",
        default=list(RAG_ORDERS),
        choices=RAG_ORDERS,
        help="passage orders probed: answer spread over depths, and the retriever's rank order",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=None,
        help="where --rag saves its recorded attention (default: the cache's calibration/)",
    )
    parser.add_argument(
        "--from-records",
        type=Path,
        nargs="+",
        default=None,
        help="re-search saved --rag records instead of running the model on probes",
    )
    parser.add_argument(
        "--floor-length",
        type=int,
        default=1536,
        help="--rag profiles keep at least what they keep of this many prunable tokens (0: no floors)",
    )


def main(argv: list[str] | None = None) -> None:
    """Run `pd-calibrate` with `argv` (default: the process's arguments).

    Args:
        argv: the command-line arguments, without the program name.
    """
    args = _parser().parse_args(argv)
    if args.compare_scoring:
        _compare_scoring(args)
    elif args.quick:
        _quick(args)
    elif args.rag or args.from_records:
        started = time.perf_counter()
        profile = calibrate_rag(
            args.model,
            rag_lengths=tuple(args.rag_lengths),
            rag_samples=args.rag_samples or 4,
            seed=args.seed if args.seed else 100,
            rag_orders=tuple(args.rag_orders),
            records_path=args.records,
            from_records=args.from_records,
            verify=args.verify,
            floor_length=args.floor_length,
            out=args.out,
        )
        print(
            f"profile written to {profile.source} in {time.perf_counter() - started:.0f} s:\n"
            f"{Path(profile.source).read_text()}"
        )
    else:
        profile = calibrate(
            args.model,
            haystack=args.haystack,
            lengths=tuple(args.lengths),
            depths=tuple(args.depths),
            kinds=tuple(args.kinds),
            seed=args.seed,
            verify=args.verify,
            plan_length=args.plan_length,
            out=args.out,
        )
        print(f"profile written to {profile.source}:\n{Path(profile.source).read_text()}")


def _quick(args: argparse.Namespace) -> None:
    """Calibrate on several kinds of text with a held-out split (`calibrate_mixed`) and print what it measured."""
    profile, measurements = calibrate_mixed(
        args.model,
        lengths=tuple(args.rag_lengths),
        samples=args.rag_samples or 2,
        seed=args.seed if args.seed else 300,
        haystack=args.haystack,
        floor_length=args.floor_length,
        out=args.out,
    )
    print(f"profile written to {profile.source}:\n{Path(profile.source).read_text()}\n{report(measurements)}")


def _compare_scoring(args: argparse.Namespace) -> None:
    """Print, per scoring, how often the needle ranks in the top candidates at each layer."""
    engine = PromptDistillEngine.from_pretrained(args.model)
    probes = make_probes(engine, args.haystack, args.lengths, args.depths, args.kinds, args.seed)
    budget = report_budget(args.lengths)
    print(
        f"share of {len(probes)} probes whose needle ranks in the top {budget} candidates, layers 0 → "
        f"{engine.arch.num_layers - 1} (all heads):"
    )
    for name, recall in compare_scoring(engine, probes, budget).items():
        print(f"{name:>32}: mean {sum(recall) / len(recall):.2f} | " + " ".join(f"{v:.2f}" for v in recall))


if __name__ == "__main__":
    main()
