"""pd-bench peers on the tiny model: peers absent, a fake peer speaking the worker protocol, and the real workers
driven against stand-in engine modules (so they run without vLLM or llama.cpp installed)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap

import pytest

from pd_integrations.bench.__main__ import main
from pd_integrations.bench.cli import SPEED_DEPTH
from pd_integrations.bench.tasks import needle
from pd_integrations.loading import resolve_dtype
from pd_integrations.prompt import render

pytestmark = pytest.mark.filterwarnings("ignore:no PromptDistill profile")

LENGTHS = (96, 160)
# Posing as a peer's Python: it runs no worker, keeps the request it got and answers with fixed timings.
FAKE_PEER = """\
#!{python}
import json, sys
worker, request_file, result_file = sys.argv[1:4]
request = json.load(open(request_file))
with open({requests!r}, "a") as seen:
    seen.write(json.dumps({{"worker": worker, **request}}) + "\\n")
runs = [{{"prompt": i, "prompt_tokens": len(ids), "ttft_seconds": 0.5 * (i + 1), "output_tokens": 4,
          "decode_tokens_per_second": 40.0 + i}} for i, ids in enumerate(request["prompts"])]
json.dump({{"version": "9.9.9", "settings": {{"dtype": request["dtype"]}}, "runs": runs}}, open(result_file, "w"))
"""
# Stand-ins for the engines' modules, so that the real workers run here: each "generates" in a fixed time.
FAKE_VLLM = {
    "vllm/__init__.py": """\
        import time
        __version__ = "0.0.fake"
        class SamplingParams:
            def __init__(self, max_tokens, temperature, ignore_eos):
                self.max_tokens = max_tokens
        class _Out:
            def __init__(self, n):
                self.token_ids = [7] * n
        class _Stats:  # vLLM's RequestStateStats: its first and last token 10 ms apart per token
            def __init__(self, n):
                self.first_token_ts, self.last_token_ts = 100.0, 100.0 + 0.01 * (n - 1)
        class _Request:
            def __init__(self, n):
                self.outputs, self.metrics = [_Out(n)], _Stats(n)
        class LLM:
            def __init__(self, **settings):
                self.settings = settings
            def generate(self, prompt, params, use_tqdm):
                time.sleep(0.01 * params.max_tokens)
                return [_Request(params.max_tokens)]
        """,
    "vllm/inputs.py": "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n",
}
# With FAKE_LLAMA_CPP_CRASHES set, it dies of SIGSEGV unless its extra buffer types are off, as the Q4_1 GGUF did on
# an Intel Xeon with AMX.
FAKE_LLAMA_CPP = {
    "llama_cpp/__init__.py": """\
        import os, signal, time
        from . import llama_cpp
        __version__ = "0.0.fake"
        LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_Q4_1 = 0, 3
        class Llama:
            def __init__(self, model_path, n_ctx, n_batch, flash_attn, n_threads, n_threads_batch, verbose):
                if os.environ.get("FAKE_LLAMA_CPP_CRASHES") and llama_cpp.llama_model_default_params().use_extra_bufts:
                    os.kill(os.getpid(), signal.SIGSEGV)
                self.metadata = {"general.file_type": "3"}
            def reset(self):
                pass
            def eval(self, ids):
                time.sleep(0.01)
            def sample(self, temp):
                return 7
        """,
    "llama_cpp/llama_cpp.py": """\
        class _Params:
            use_extra_bufts = True
        def llama_model_default_params():
            return _Params()
        """,
}


def run_peers(capsys, tmp_path, tiny_model_dir, *flags) -> tuple[dict, str]:
    main(
        [
            "peers",
            "--model",
            tiny_model_dir,
            "--lengths",
            ",".join(map(str, LENGTHS)),
            "--repeats",
            "2",
            "--decode-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
            *flags,
        ]
    )
    return json.loads((tmp_path / "out" / "peers.json").read_text()), capsys.readouterr().out


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed table's rows by engine name and dtype: their remaining cells."""
    rows = [line.strip("|").split(" | ") for line in out.splitlines() if line.startswith("| ") and " s (" in line]
    return {f"{cells[0].strip()} / {cells[1]}": [c.strip() for c in cells[2:]] for cells in rows}


def write_modules(folder, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))


def test_without_peers_the_table_has_our_rows_and_says_what_is_missing(capsys, tmp_path, tiny_model_dir):
    data, out = run_peers(capsys, tmp_path, tiny_model_dir)
    assert "- vllm: not installed (pass --vllm-python PATH; see docs/peers.md)" in out
    assert "- llama.cpp: not installed (pass --llamacpp-python PATH; see docs/peers.md)" in out
    rows = table_rows(out)
    dtype = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")  # the --dtype default: bfloat16 on this CPU
    assert [name.split(", ")[1] for name in rows] == [f"full attention / {dtype}", f"profile / {dtype}"]
    full = next(row for row in data["summary"] if row["engine"].endswith("full attention"))
    assert [cell["ttft_ratio"] for cell in full["lengths"]] == [1.0, 1.0]
    assert [cell["runs"] for cell in full["lengths"]] == [2, 2]
    assert all(cell["decode_tokens_per_second"] > 0 for cell in full["lengths"])
    assert data["machine"]["cores"] >= 1 and "avx512_bf16" in data["machine"]
    logged = (tmp_path / "out" / "peers.records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == data["records"] and len(logged) == 2 * 2 * len(LENGTHS)


def test_a_fake_peer_gets_our_token_ids_and_its_timings_appear_as_ratios(capsys, tmp_path, tiny_model_dir, tokenizer):
    requests = tmp_path / "requests.jsonl"
    peer = tmp_path / "fake-python"
    peer.write_text(FAKE_PEER.format(python=sys.executable, requests=str(requests)))
    peer.chmod(0o755)
    data, out = run_peers(capsys, tmp_path, tiny_model_dir, "--vllm-python", str(peer), "--vllm-dtypes", "bfloat16")

    seen = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len(seen) == 2 and seen[0]["worker"].endswith("peer_workers/vllm_worker.py")
    expected = [render(tokenizer, None, needle(tokenizer, n, SPEED_DEPTH, 0).messages, None).input_ids for n in LENGTHS]
    assert seen[0]["prompts"] == expected and seen[0]["dtype"] == "bfloat16" and seen[0]["decode_tokens"] == 4

    full = next(row for row in data["summary"] if row["engine"].endswith("full attention"))
    ours = [cell["ttft_seconds"] for cell in full["lengths"]]
    row = table_rows(out)["vLLM 9.9.9 / bfloat16"]
    assert row == [
        str(data["machine"]["cores"]),
        f"0.50 s ({0.5 / ours[0]:.2f})",
        f"1.00 s ({1.0 / ours[1]:.2f})",
        "40.0",
        "41.0",
    ]
    assert "- vllm bfloat16: version=9.9.9, dtype=bfloat16, VLLM_CPU_KVCACHE_SPACE=2" in out
    # Interleaved: the second repetition runs the engines in reverse order.
    assert [(r["repeat"], r["engine"][:4]) for r in data["records"]][::2] == [
        (0, "pd-i"),
        (0, "pd-i"),
        (0, "vLLM"),
        (1, "vLLM"),
        (1, "pd-i"),
        (1, "pd-i"),
    ]


def test_the_workers_run_against_stand_in_engines(capsys, tmp_path, tiny_model_dir, monkeypatch):
    write_modules(tmp_path / "engines", {**FAKE_VLLM, **FAKE_LLAMA_CPP})
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "engines"))
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    data, out = run_peers(
        capsys,
        tmp_path,
        tiny_model_dir,
        "--vllm-python",
        sys.executable,
        "--vllm-dtypes",
        "float32",
        "--llamacpp-python",
        sys.executable,
        "--gguf",
        str(gguf),
        "--threads",
        "1,2",
    )
    rows = table_rows(out)
    assert set(rows) >= {"vLLM 0.0.fake / float32", "llama.cpp (llama-cpp-python) 0.0.fake / Q4_1 GGUF"}
    vllm = next(row for row in data["summary"] if row["engine"].startswith("vLLM"))
    # TTFT is one token's "generation" (10 ms); decode: 3 more tokens in 30 ms by the request's stats.
    assert all(0.01 <= c["ttft_seconds"] < 0.5 for c in vllm["lengths"])
    assert [c["decode_tokens_per_second"] for c in vllm["lengths"]] == [pytest.approx(100.0)] * 2
    llama = [row for row in data["summary"] if row["engine"].startswith("llama.cpp")]
    assert [row["threads"] for row in llama] == [1, 2]
    assert [c["prompt_tokens"] for c in llama[0]["lengths"]] == [c["prompt_tokens"] for c in vllm["lengths"]]
    assert re.search(
        r"- llama.cpp tiny.Q4_1.gguf: version=0\.0\.fake, model_path=\S+tiny\.Q4_1\.gguf, n_ctx=8192, "
        r"n_batch=512, flash_attn=True",
        out,
    )
    assert "not installed" not in out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_a_python_without_the_peer_says_so(capsys, tmp_path, tiny_model_dir):
    _, out = run_peers(capsys, tmp_path, tiny_model_dir, "--vllm-python", sys.executable)
    assert f"- vllm: not installed in {sys.executable} (No module named 'vllm'; see docs/peers.md)" in out
    assert len(table_rows(out)) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vllm-dtypes", "float8"], "--vllm-dtypes: choose from float32,bfloat16,float16, got 'float8'"),
        (["--gguf", "/no/such.gguf"], "--gguf: no such file: /no/such.gguf"),
        (["--llamacpp-python", sys.executable], "llama.cpp needs --gguf FILE"),
        (["--threads", "0"], "--threads: expected a positive integer, got '0'"),
    ],
)
def test_bad_flags_exit_with_a_message(capsys, tiny_model_dir, flags, message):
    with pytest.raises(SystemExit) as exit:
        main(["peers", "--model", tiny_model_dir, *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_llama_cpp_that_crashes_with_its_extra_buffers_runs_without_them(
    capsys, tmp_path, tiny_model_dir, monkeypatch
):
    write_modules(tmp_path / "engines", FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "engines"))
    monkeypatch.setenv("FAKE_LLAMA_CPP_CRASHES", "1")
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    flags = ("--llamacpp-python", sys.executable, "--gguf", str(gguf), "--threads", "1")
    data, out = run_peers(capsys, tmp_path, tiny_model_dir, *flags)
    assert "llama.cpp (llama-cpp-python) 0.0.fake / Q4_1 GGUF" in table_rows(out)
    assert "use_extra_bufts=False" in out and "failed" not in out
    assert data["peers"]["llama.cpp tiny.Q4_1.gguf"]["use_extra_bufts"] is False
