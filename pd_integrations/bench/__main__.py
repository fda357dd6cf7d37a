"""pd-bench: full attention vs GemFilter vs PromptDistill, in one run per subcommand.

    pd-bench speed  [--lengths 1k,2k,4k]                   prefill s, decode tok/s, peak memory, KV cache
    pd-bench needle [--lengths 1k,2k,4k] [--depths 0,0.5,1] needle-in-a-haystack grid, heatmap per method
    pd-bench tasks  [--lengths 1k,2k] [--tasks ...]        RULER-style tasks with exact-match scoring
    pd-bench rag    [--lengths 1000,2000] [--shapes ...]    retrieved handbook passages, four prompt shapes
    pd-bench heldout --haystack DIR [--split heldout]      needles in essays calibration never saw, 3 shapes
    pd-bench throughput [--lengths 2k,4k] [--concurrency 1,4,8,16]  concurrent requests vs sequential ones
    pd-bench serve --url URL [--concurrency 1,4,16]          load against a running pd-serve (see --help)
    pd-bench peers --vllm-python P --llamacpp-python P       TTFT and decode vs vLLM and llama.cpp (see --help)

Each prints a Markdown table (ratios are method ÷ full attention at the same length) and writes
OUT/<command>.json, OUT/<command>.md and PNG plots to OUT (default bench-results/); OUT/<command>.records.jsonl
grows one line per measured run, so an interrupted run keeps its records. The defaults finish in a few
minutes on 2 CPU cores; on a GPU scale up, e.g. `pd-bench needle --lengths 2k,4k,8k --samples 5 --dtype bf16`.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from ..corpora import rag as corpora_rag
from ..engine import PromptDistillEngine
from ..loading import DEFAULT_MODEL, ModelNotAvailableError, load_model
from ..probes import HAYSTACK_SPLITS, NEEDLE_KINDS
from . import cli, heldout, measure, ragbench, report, tasks, throughput


def main(argv: list[str] | None = None) -> None:
    """Run `pd-bench` with `argv` (default: the command line)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # drives a running server, so it takes none of the model options below
        from . import serve_load  # needs the serve extra's httpx

        return serve_load.main(argv[1:])
    if argv[:1] == ["peers"]:  # its own options: the peers' virtualenvs, repetitions, thread counts
        from . import peers

        return peers.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "split", None) and not args.haystack:  # checked before the model loads
        parser.error(f"--split {args.split} needs --haystack DIR: a folder of .txt files to split")
    try:
        _bench(args, "pd-bench " + shlex.join(argv))
    except (ValueError, ModelNotAvailableError) as error:
        parser.exit(2, f"pd-bench: error: {error}\n")


def _parser() -> argparse.ArgumentParser:
    common = _common_arguments()
    parser = argparse.ArgumentParser(
        prog="pd-bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments in _SUBCOMMANDS:
        add_arguments(commands.add_parser(name, parents=[common], help=help_text))
    return parser


def _common_arguments() -> argparse.ArgumentParser:
    """The model, method and output options every subcommand of `_parser` takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="model name, directory or hub id (default: %(default)s)")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    common.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    common.add_argument(
        "--attn",
        default="auto",
        help="attention backend: eager, sdpa, flash_attention_2, ...; auto = flash_attention_2 on "
        "CUDA when flash-attn is installed, else the model's default",
    )
    _add_subset(common, "--methods", measure.METHODS, None)
    common.add_argument(
        "--layer",
        type=int,
        default=None,
        help="selection layer of gemfilter, paper-rule and single-stage (default: the profile's first)",
    )
    common.add_argument(
        "--budget",
        type=cli.budget,
        default=None,
        help="context tokens those methods keep, or a fraction in (0, 1] of the prunable tokens "
        "(default: the profile's first budget)",
    )
    common.add_argument("--samples", type=cli.positive, default=1, help="seeds per grid cell (default: %(default)s)")
    common.add_argument("--seed", type=int, default=0, help="first seed; seeds pick haystack windows and needles")
    common.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    common.add_argument(
        "--max-new-tokens",
        type=cli.positive,
        default=None,
        help="tokens to generate per prompt (default: 24, 80 for multi-answer tasks)",
    )
    common.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    return common


def _add_subset(parser: argparse.ArgumentParser, flag: str, names: tuple[str, ...], default: list[str] | None) -> None:
    """Add the option `flag`: a comma-separated subset of `names`."""
    help_text = f"comma-separated subset of {','.join(names)}"
    parser.add_argument(flag, type=cli.names(names), default=default, help=help_text)


def _speed_arguments(speed: argparse.ArgumentParser) -> None:
    speed.add_argument("--lengths", type=cli.lengths, default=[1024, 2048, 4096], help="e.g. 1k,2k,4k")


def _needle_arguments(needle: argparse.ArgumentParser) -> None:
    needle.add_argument("--lengths", type=cli.lengths, default=[1024, 2048, 4096], help="e.g. 1k,2k,4k")
    needle.add_argument("--depths", type=cli.depths, default=[0.0, 0.5, 1.0], help="e.g. 0,0.25,0.5,0.75,1")
    needle.add_argument("--kind", choices=NEEDLE_KINDS, default="passcode")


def _tasks_arguments(task: argparse.ArgumentParser) -> None:
    task.add_argument("--lengths", type=cli.lengths, default=[1024, 2048], help="e.g. 1k,2k")
    _add_subset(task, "--tasks", tasks.TASKS, list(tasks.TASKS))
    _add_split(task, None, "; default: the whole folder")


def _add_split(parser: argparse.ArgumentParser, default: str | None, default_note: str = "") -> None:
    parser.add_argument(
        "--split",
        choices=HAYSTACK_SPLITS,
        default=default,
        help=f"essay files at odd (heldout) or even (dev) positions of the sorted --haystack folder{default_note}",
    )


def _heldout_arguments(held: argparse.ArgumentParser) -> None:
    held.add_argument("--lengths", type=cli.lengths, default=[2000, 4000], help="e.g. 2000,4000,8000")
    _add_subset(held, "--shapes", heldout.SHAPES, list(heldout.SHAPES))
    _add_split(held, "heldout")


def _throughput_arguments(throughput: argparse.ArgumentParser) -> None:
    throughput.add_argument("--lengths", type=cli.lengths, default=[2000, 4000], help="e.g. 2000,4000")
    throughput.add_argument("--concurrency", type=cli.counts, default=[1, 4, 8, 16], help="values of B, e.g. 1,4,8,16")
    throughput.add_argument(
        "--sequential", type=cli.positive, default=4, help="requests in the sequential baseline (default: %(default)s)"
    )


def _rag_arguments(rag: argparse.ArgumentParser) -> None:
    rag.add_argument(
        "--lengths",
        type=cli.lengths,
        default=[1000, 2000, 4000, 8000],
        help="context tokens retrieved per prompt, e.g. 1000,2000 (default: 1000,2000,4000,8000)",
    )
    _add_subset(rag, "--shapes", corpora_rag.SHAPES, list(corpora_rag.SHAPES))
    rag.add_argument(
        "--context-source",
        choices=ragbench.CONTEXT_SOURCES,
        default="documents",
        help="documents: pass the retrieved passages as documents= (chunks stop at their boundaries); "
        "none: don't (default: %(default)s)",
    )
    rag.add_argument(
        "--answer-depths",
        type=cli.depths,
        default=None,
        help="move the answer's passage to these relative depths among the retrieved ones, e.g. "
        "0,0.5,1 (default: leave it where the retriever ranked it)",
    )
    rag.add_argument(
        "--spread",
        action="store_true",
        help="move sample k's answer passage to relative depth (k + 0.5) / samples (the retriever ranks "
        "it first otherwise)",
    )
    rag.add_argument(
        "--corpus",
        choices=list(corpora_rag.CORPORA),
        default="depots",
        help="generated corpus: depots (answerable by small models) or handbook (default: %(default)s)",
    )
    rag.add_argument("--corpus-seed", type=int, default=0, help="seed of the generated corpus (default: 0)")


# (name, help, adds its own arguments), in the order `pd-bench --help` lists them
_SUBCOMMANDS = (
    ("speed", "prefill, decode, memory and KV cache vs length", _speed_arguments),
    ("needle", "needle-in-a-haystack grid", _needle_arguments),
    ("tasks", "RULER-style synthetic tasks", _tasks_arguments),
    (
        "heldout",
        "needles in a split of essays that calibration never saw, three prompt shapes",
        _heldout_arguments,
    ),
    ("throughput", "B concurrent requests vs sequential ones, batched by the scheduler", _throughput_arguments),
    ("rag", "RAG prompts: retrieved passages that all resemble the question, in four prompt shapes", _rag_arguments),
)


def _load(args) -> PromptDistillEngine:
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    attn = args.attn
    if attn == "auto" and model.device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        attn = "flash_attention_2"
    if attn != "auto":
        model.set_attn_implementation(attn)
    return PromptDistillEngine(model, tokenizer, model_name=args.model)


def _probes(args, tokenizer) -> list[tasks.Probe]:
    seeds = range(args.seed, args.seed + args.samples)
    if args.command == "speed":
        probes = [
            tasks.needle(tokenizer, n, cli.SPEED_DEPTH, s, haystack=args.haystack) for n in args.lengths for s in seeds
        ]
    elif args.command == "needle":
        probes = [
            tasks.needle(tokenizer, n, d, s, kind=args.kind, haystack=args.haystack)
            for n in args.lengths
            for d in args.depths
            for s in seeds
        ]
    else:
        probes = [
            tasks.task(t, tokenizer, n, s, haystack=args.haystack, split=args.split)
            for n in args.lengths
            for t in args.tasks
            for s in seeds
        ]
    if args.max_new_tokens is not None:
        probes = [replace(p, max_new_tokens=args.max_new_tokens) for p in probes]
    return probes


def _bench(args, command_line: str) -> None:
    # paper-rule costs what single-stage costs, random what profile costs; they matter only where answers are scored.
    default_methods = {
        "speed": [m for m in measure.METHODS if m not in ("paper-rule", "random")],
        "throughput": ["full", "profile"],
    }.get(args.command, measure.METHODS)
    engine, engines, out, log = _start(args, default_methods)
    if args.command == "rag":
        return _bench_rag(args, command_line, engine, engines, out, log)
    if args.command == "throughput":
        return _bench_throughput(args, command_line, engine, engines, out)
    if args.command == "heldout":
        return _bench_heldout(args, command_line, engine, engines, out, log)
    records = measure.run(engines, _probes(args, engine.tokenizer), desc=f"pd-bench {args.command}", log=log)
    rows = report.summarize(records, breakdown="task" if args.command == "tasks" else None)
    tables, notes, answers = [report.markdown_table(rows)], [report.COLUMNS_NOTE], {}
    if args.command == "tasks":  # per task, with intervals: the table a quality claim rests on
        answers["answers"] = report.answer_summary(records, "task")
        tables.append(report.answer_table(answers["answers"], "task"))
        notes.append(report.ANSWER_COLUMNS_NOTE)
    files = cli.write(
        out,
        args.command,
        command_line,
        engine,
        measure.describe(engines),
        "\n\n".join(tables),
        " ".join(notes),
        summary=rows,
        **answers,
        records=records,
    )
    files.append(out / f"{args.command}_scaling.png")
    report.plot_scaling(rows, files[-1])
    if args.command != "speed":
        label = "depth" if args.command == "needle" else "task"
        files.append(out / f"{args.command}_heatmap.png")
        report.plot_heatmaps(records, label, files[-1], f"{args.command} accuracy, {engine.model_name}")
    print("wrote " + ", ".join(map(str, files)))


def _bench_rag(args, command_line: str, engine, engines, out: Path, log: Path) -> None:
    probes = corpora_rag.probes(
        engine.tokenizer,
        args.lengths,
        args.shapes,
        args.samples,
        args.seed,
        corpus_seed=args.corpus_seed,
        answer_depths=args.answer_depths,
        corpus=args.corpus,
        spread=args.spread,
        max_new_tokens=args.max_new_tokens or corpora_rag.MAX_NEW_TOKENS,
    )
    records = ragbench.run(engines, probes, context_source=args.context_source, log=log)
    rows = ragbench.summarize(records)
    by_length = report.summarize(records, breakdown="shape")  # all shapes together: the scaling plot
    methods = measure.describe(engines)
    files = cli.write(
        out,
        "rag",
        command_line,
        engine,
        methods,
        ragbench.markdown_table(rows),
        ragbench.COLUMNS_NOTE,
        summary=rows,
        summary_by_length=by_length,
        records=records,
    )
    files += [out / "rag_scaling.png", out / "rag_heatmap.png"]
    report.plot_scaling(by_length, files[2])
    report.plot_heatmaps(records, "shape", files[3], f"RAG answer accuracy, {engine.model_name}")
    print("wrote " + ", ".join(map(str, files)))


def _bench_heldout(args, command_line: str, engine, engines, out: Path, log: Path) -> None:
    probes = heldout.probes(
        engine.tokenizer, args.haystack, args.split, args.lengths, args.shapes, args.samples, args.seed
    )
    records = measure.run(engines, probes, desc="pd-bench heldout", log=log)
    rows = report.answer_summary(records, "shape")
    files = cli.write(
        out,
        "heldout",
        command_line,
        engine,
        measure.describe(engines),
        report.answer_table(rows, "shape"),
        report.ANSWER_COLUMNS_NOTE,
        summary=rows,
        records=records,
    )
    print("wrote " + ", ".join(map(str, files)))


def _bench_throughput(args, command_line: str, engine, engines, out: Path) -> None:
    seeds = range(args.seed, args.seed + max(args.concurrency + [args.sequential]))
    probes = {
        n: [tasks.needle(engine.tokenizer, n, cli.SPEED_DEPTH, s, haystack=args.haystack) for s in seeds]
        for n in args.lengths
    }
    records = throughput.run(engines, probes, args.concurrency, args.sequential, args.max_new_tokens or 128)
    files = cli.write(
        out,
        "throughput",
        command_line,
        engine,
        measure.describe(engines),
        throughput.markdown_table(records),
        throughput.COLUMNS_NOTE,
        records=records,
    )
    files.append(out / "throughput.png")
    throughput.plot(records, files[-1])
    print("wrote " + ", ".join(map(str, files)))


def _start(args, default_methods) -> tuple:
    """(engine, an engine per method, the output folder, its fresh records log) for a command."""
    engine = _load(args)
    engines = measure.method_engines(engine, args.methods or list(default_methods), args.layer, args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{args.command}.records.jsonl"
    log.unlink(missing_ok=True)
    return engine, engines, out, log


if __name__ == "__main__":
    main()
