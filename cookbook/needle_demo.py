"""One needle, every method side by side, and an HTML view of what each one kept.

    python cookbook/needle_demo.py [--tokens 2000] [--depth 0.5] [--layer L] [--budget K] [--out needle_demo]

Hides a pass code at `--depth` in about `--tokens` tokens of prose, asks for it with full attention, GemFilter,
PromptDistill with the paper's scoring rule, single-stage PromptDistill and the model's profile (the same methods
as `pd-bench`), prints a table of answers, kept tokens, time to first token and KV cache against full attention,
and writes OUT/<method>.html: the prompt shaded by what was kept and by selection score. Open one in a browser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pd_integrations import PromptDistillEngine
from pd_integrations.bench.measure import METHODS, describe, method_engines
from pd_integrations.kept_view import render_html, summary
from pd_integrations.probes import needle_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=2000, help="context length in tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth, 0 = start, 1 = end")
    parser.add_argument("--layer", type=int, default=None, help="selection layer (default: the profile's)")
    parser.add_argument("--budget", type=int, default=None, help="tokens kept (default: the profile's)")
    parser.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="needle_demo", help="folder for the HTML views")
    args = parser.parse_args()

    engine = PromptDistillEngine.from_pretrained(args.model)
    probe = needle_probe(engine.tokenizer, args.tokens, args.depth, seed=args.seed, haystack=args.haystack)
    print(f"Needle: {probe.needle!r} at depth {args.depth:.0%} of ~{args.tokens} tokens\nQuestion: {probe.question}\n")

    engines = method_engines(engine, list(METHODS), args.layer, args.budget)
    methods = describe(engines)
    results = {}
    for name, runner in engines.items():
        twin = methods[name]["measured_as"]
        if twin != name:  # same settings as a method already run
            results[name] = results[twin]
            continue
        results[name] = runner.generate(messages=probe.messages(), query=probe.question, max_new_tokens=24)
        print(f"[{name}] {results[name].text.strip()!r}")

    full = results["full"]
    print(
        f"\n{'method':<14}{'answered':>9}{'needle kept':>12}{'kept/total':>12}{'TTFT s':>8}{'÷ full':>8}"
        f"{'KV MiB':>8}{'÷ full':>8}"
    )
    for name, result in results.items():
        start = result.prompt_text.find(probe.needle)
        needle_kept = any(a <= start and start + len(probe.needle) <= b for a, b in result.kept_char_spans)
        print(
            f"{name:<14}{'yes' if probe.is_answered(result.text) else 'no':>9}{'yes' if needle_kept else 'no':>12}"
            f"{f'{result.kept_tokens}/{result.prompt_tokens}':>12}{result.prefill_seconds:>8.2f}"
            f"{result.prefill_seconds / full.prefill_seconds:>8.2f}{result.kv_cache_bytes / 2**20:>8.1f}"
            f"{result.kv_cache_bytes / full.kv_cache_bytes:>8.2f}"
        )
    print("\n" + "\n".join(f"- {name}: {m['description']}" for name, m in methods.items()))
    print(f"\n{summary(results['profile'], [probe.context])}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        page = out / f"{name}.html"
        page.write_text(
            render_html(result, engine.tokenizer, [probe.context], title=f"What {name} kept"), encoding="utf-8"
        )
        print(f"wrote {page}")


if __name__ == "__main__":
    main()
