"""llama.cpp (`llama-cpp-python`) as a `pd-bench peers` worker; see `protocol.py` for the request and result.

One `Llama` per thread count in `threads`. TTFT is evaluating the prompt and sampling one token greedily; the
decode rate is the next `decode_tokens - 1` tokens, each evaluated and sampled (EOS ignored, as in the others).
With `"extra_buffers": false` in the request, the model loads with `use_extra_bufts=False` (no weights repacked for
AMX and the like), which `Llama` does not take as an argument.
"""

from __future__ import annotations

import time

from protocol import decode_rate, serve

WARM_UP_TOKENS = 128
N_BATCH = 512  # with flash attention, the fastest prompt batch measured on this kind of CPU


def measure(llama_cpp, request: dict) -> dict:
    if not request.get("extra_buffers", True):
        _without_extra_buffers(llama_cpp)
    runs, settings = [], {}
    for threads in request["threads"]:
        settings = {
            "model_path": request["model"],
            "n_ctx": request["context"],
            "n_batch": N_BATCH,
            "flash_attn": True,
            "n_threads": threads,
            "n_threads_batch": threads,
        }
        llm = llama_cpp.Llama(**settings, verbose=False)
        _generate(llm, request["prompts"][0][:WARM_UP_TOKENS], 2)  # one-off costs stay out of the first run
        for prompt, ids in enumerate(request["prompts"]):
            runs.append({"prompt": prompt, "threads": threads, **_generate(llm, ids, request["decode_tokens"])})
        file_type = _file_type(llama_cpp, llm.metadata.get("general.file_type"))
        del llm
    del settings["n_threads"], settings["n_threads_batch"]  # per run, in `runs`
    if not request.get("extra_buffers", True):
        settings["use_extra_bufts"] = False
    return {"version": llama_cpp.__version__, "settings": settings, "file_type": file_type, "runs": runs}


def _generate(llm, ids: list[int], tokens: int) -> dict:
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids)
    token = llm.sample(temp=0.0)
    ttft = time.perf_counter() - started
    for _ in range(tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode = time.perf_counter() - started - ttft
    return {
        "prompt_tokens": len(ids),
        "ttft_seconds": ttft,
        "output_tokens": tokens,
        "decode_tokens_per_second": decode_rate(tokens, decode),
    }


def _without_extra_buffers(llama_cpp) -> None:
    """Make the model parameters `Llama` starts from say `use_extra_bufts=False`."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without


def _file_type(llama_cpp, value: str | None) -> str | None:
    """The GGUF's `general.file_type` as llama.cpp names it (F32, Q4_1, ...)."""
    names = {
        getattr(llama_cpp, name): name.split("_", 3)[-1]
        for name in dir(llama_cpp)
        if name.startswith(("LLAMA_FTYPE_ALL_", "LLAMA_FTYPE_MOSTLY_"))
    }
    return None if value is None else names.get(int(value), f"file type {value}")


if __name__ == "__main__":
    serve("llama_cpp", measure)
