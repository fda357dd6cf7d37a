"""A long-context question answered by the embedded default model, with and without PromptDistill.

    python cookbook/long_context_demo.py [--tokens 4000] [--depth 0.4] [--haystack DIR]

Hides a pass code in ~4k tokens of prose, asks for it, and prints each method's answer, kept/total tokens,
time to first token and KV-cache size against full attention.
"""

from __future__ import annotations

import argparse

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.probes import needle_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=4000, help="context length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="needle depth, 0 = start, 1 = end")
    parser.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    engine = PromptDistillEngine.from_pretrained(args.model)
    probe = needle_probe(engine.tokenizer, args.tokens, args.depth, seed=args.seed, haystack=args.haystack)
    print(f"Needle: {probe.needle!r} at depth {args.depth:.0%} of ~{args.tokens} tokens\nQuestion: {probe.question}\n")

    runs = {"full attention": engine.with_config(PromptDistillConfig(method="full")), "promptdistill": engine}
    results = {}
    for name, runner in runs.items():
        results[name] = result = runner.generate(messages=probe.messages(), query=probe.question, max_new_tokens=32)
        print(f"[{name}] {result.text.strip()!r}")
    full = results["full attention"]
    print(
        f"\n{'method':<16}{'answered':>9}{'kept/total':>14}{'TTFT s':>9}{'TTFT ×full':>12}{'KV MiB':>9}{'KV ×full':>10}"
    )
    for name, result in results.items():
        print(
            f"{name:<16}{'yes' if probe.is_answered(result.text) else 'no':>9}"
            f"{f'{result.kept_tokens}/{result.prompt_tokens}':>14}{result.prefill_seconds:>9.2f}"
            f"{result.prefill_seconds / full.prefill_seconds:>12.2f}{result.kv_cache_bytes / 2**20:>9.1f}"
            f"{result.kv_cache_bytes / full.kv_cache_bytes:>10.2f}"
        )
    print(f"\nPromptDistill settings: {engine.config}")


if __name__ == "__main__":
    main()
