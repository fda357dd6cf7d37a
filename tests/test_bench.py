"""pd-bench: tiny end-to-end runs of every subcommand on a random tiny model, the task generators and the report."""

from __future__ import annotations

import json
import re
import runpy
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pd_integrations import PromptDistillEngine
from pd_integrations.bench import cli, measure, report, tasks
from pd_integrations.bench.__main__ import main
from pd_integrations.config import PAPER_SCORING

from .conftest import TINY, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Short prompts and answers keep each run well under a second on the 4-layer model; layer 1 and budget 32
# prune the prompt for every selecting method.
TINY_FLAGS = ["--layer", "1", "--budget", "32", "--max-new-tokens", "3"]
SELECTING = ("gemfilter", "paper-rule", "single-stage")  # at layer 1 with budget 32; the fallback rule (layer 2,
# at least 461 tokens) keeps every token of these short prompts
# A KV cache holds keys and values of every layer's KV heads for each kept token, in the model's dtype ("auto":
# bfloat16 on CPUs with bfloat16 instructions).
KV_VALUES_PER_TOKEN = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * TINY["head_dim"]


def kv_bytes_per_token(data: dict) -> int:
    return KV_VALUES_PER_TOKEN * getattr(torch, data["environment"]["dtype"].removeprefix("torch.")).itemsize


def run_cli(capsys, tmp_path, *argv) -> tuple[dict, str]:
    with pytest.warns(UserWarning, match="no PromptDistill profile"):  # the tiny model uses the fallback rule
        main([*argv, "--out", str(tmp_path)])
    command = argv[0]
    assert (tmp_path / f"{command}_scaling.png").read_bytes().startswith(PNG_SIGNATURE)
    table = (tmp_path / f"{command}.md").read_text()
    assert table.strip() in capsys.readouterr().out
    return json.loads((tmp_path / f"{command}.json").read_text()), table


def table_rows(table: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def capture_generations(monkeypatch) -> list[tuple[dict, list, object]]:
    """Every `generate` call from now on: the engine's config as the bench's JSON writes it, the messages and the
    result."""
    calls = []
    generate = PromptDistillEngine.generate

    def spy(self, *args, **kwargs):
        result = generate(self, *args, **kwargs)
        calls.append((json.loads(json.dumps(asdict(self.config))), kwargs.get("messages"), result))
        return result

    monkeypatch.setattr(PromptDistillEngine, "generate", spy)
    return calls


def generation_of(calls, data: dict, record: dict, probe: tasks.Probe):
    """The generation a record measured: the last of its method's config on its probe (on CPU a cell's first prompt
    runs once before, untimed, for the memory)."""
    config = data["methods"][record["method"]]["config"]
    return [result for called, messages, result in calls if called == config and messages == probe.messages][-1]


def needle_tokens_kept(tokenizer, result, needle: str) -> bool:
    """Whether selection kept every prompt token that overlaps `needle`, from the kept token indices."""
    offsets = tokenizer(result.prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == result.prompt_tokens
    start = result.prompt_text.find(needle)
    assert start >= 0
    evidence_tokens = {i for i, (a, b) in enumerate(offsets) if a < start + len(needle) and b > start}
    return evidence_tokens <= set(result.kept_token_indices)


def mean_of(records: list[dict], field: str) -> float:
    return sum(r[field] for r in records) / len(records)


def check_summary(data: dict, table: str, lengths, methods) -> None:
    """One summary row and one table row per (length, method), each the mean of its records, with ratios against
    full attention's records at the same length."""
    records, summary, rows = data["records"], data["summary"], table_rows(table)[1:]
    assert [(r["length"], r["method"]) for r in summary] == [(n, m) for n in lengths for m in methods]
    assert len(rows) == len(summary) == len(lengths) * len(methods)
    for row, cells in zip(summary, rows):
        group = [r for r in records if (r["length"], r["method"]) == (row["length"], row["method"])]
        full = [r for r in records if (r["length"], r["method"]) == (row["length"], "full")]
        assert row["runs"] == len(group) == len(records) // len(summary)
        for field in ("prompt_tokens", "kept_tokens", "needles_kept"):
            assert row[field] == pytest.approx(mean_of(group, field))
        assert row["accuracy"] == pytest.approx(mean_of(group, "score"))
        assert row["kv_cache_mib"] == pytest.approx(mean_of(group, "kv_cache_bytes") / 2**20)
        assert row["kv_ratio"] == pytest.approx(mean_of(group, "kv_cache_bytes") / mean_of(full, "kv_cache_bytes"))
        assert row["prefill_ratio"] == pytest.approx(
            mean_of(group, "prefill_seconds") / mean_of(full, "prefill_seconds")
        )
        if row["method"] == "full":
            assert row["prefill_ratio"] == row["kv_ratio"] == 1.0
        assert cells[:3] == [
            str(row["length"]),
            row["method"],
            f"{mean_of(group, 'kept_tokens'):.0f} / {mean_of(group, 'prompt_tokens'):.0f}",
        ]
        assert (cells[4], cells[7]) == (f"{row['prefill_ratio']:.2f}×", f"{row['kv_ratio']:.2f}×")
        predicted = mean_of(group, "predicted_prefill_ratio") if row["method"] != "full" else None
        assert cells[5] == ("–" if predicted is None else f"{predicted:.2f}×")
        assert cells[11:13] == [f"{mean_of(group, 'needles_kept'):.0%}", f"{mean_of(group, 'score'):.0%}"]


def test_needle_grid(capsys, monkeypatch, tmp_path, tiny_model_dir, tokenizer):
    calls = capture_generations(monkeypatch)
    data, table = run_cli(
        capsys, tmp_path, "needle", "--model", tiny_model_dir, "--lengths", "96,160", "--depths", "0,1", *TINY_FLAGS
    )
    assert (tmp_path / "needle_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    records = data["records"]
    assert len(records) == 2 * 2 * len(measure.METHODS)
    log = (tmp_path / "needle.records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == records
    check_summary(data, table, (96, 160), measure.METHODS)
    for record in records:
        probe = tasks.needle(tokenizer, record["length"], record["depth"], record["seed"])
        result = generation_of(calls, data, record, probe)
        assert (record["prompt_tokens"], record["kept_tokens"], record["output"]) == (
            result.prompt_tokens,
            len(result.kept_token_indices),
            result.text,
        )
        assert record["score"] == probe.score(record["output"])
        assert record["needles_kept"] == float(needle_tokens_kept(tokenizer, result, probe.needles[0]))
        assert record["kv_cache_bytes"] == record["kept_tokens"] * kv_bytes_per_token(data)
        if record["method"] in SELECTING:
            assert result.kept_prunable_tokens == 32  # the budget, exactly
            assert record["kept_tokens"] == result.protected_tokens + 32 < record["prompt_tokens"]
        else:
            assert record["kept_tokens"] == record["prompt_tokens"]
    # Full attention keeps every needle; budget 32 drops some.
    assert {r["needles_kept"] for r in records if r["method"] == "full"} == {1.0}
    assert {r["needles_kept"] for r in records if r["method"] in SELECTING} == {0.0, 1.0}
    methods = data["methods"]
    assert methods["paper-rule"]["config"]["aggregation"] == PAPER_SCORING["aggregation"]
    assert methods["gemfilter"]["config"]["selection_layers"] == [1]
    assert data["command"].startswith("pd-bench needle --model")


def test_speed_measures_memory_and_decode(capsys, tmp_path, tiny_model_dir):
    data, table = run_cli(
        capsys,
        tmp_path,
        "speed",
        "--model",
        tiny_model_dir,
        "--lengths",
        "128",
        "--methods",
        "full,single-stage",
        "--max-new-tokens",
        "6",
        "--layer",
        "1",
        "--budget",
        "32",
    )
    assert not (tmp_path / "speed_heatmap.png").exists()
    check_summary(data, table, (128,), ("full", "single-stage"))
    for record in data["records"]:
        assert record["prefill_seconds"] > 0
        assert record["kv_cache_bytes"] == record["kept_tokens"] * kv_bytes_per_token(data)
        if sys.platform == "linux":
            assert record["peak_memory_bytes"] > 0
    full, pruned = data["records"]
    assert pruned["kept_tokens"] < full["kept_tokens"] == full["prompt_tokens"] == pruned["prompt_tokens"]
    full_row, pruned_row = data["summary"]
    cells = table_rows(table)[2]
    assert cells[6] == f"{pruned['kv_cache_bytes'] / 2**20:.1f}"
    if sys.platform == "linux":
        assert pruned_row["peak_memory_ratio"] == pytest.approx(pruned["peak_memory_bytes"] / full["peak_memory_bytes"])
        assert cells[9:11] == [f"{pruned['peak_memory_bytes'] / 2**20:.0f}", f"{pruned_row['peak_memory_ratio']:.2f}×"]
        assert full_row["peak_memory_ratio"] == 1.0


def test_tasks_table_has_a_column_per_task(capsys, tmp_path, tiny_model_dir, tokenizer):
    data, table = run_cli(
        capsys,
        tmp_path,
        "tasks",
        "--model",
        tiny_model_dir,
        "--lengths",
        "128",
        "--methods",
        "full,paper-rule",
        *TINY_FLAGS,
    )
    assert (tmp_path / "tasks_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    records = data["records"]
    assert len(records) == len(tasks.TASKS) * 2
    summary_table = table[: table.index("| length | task |")]  # the answers table follows it
    check_summary(data, summary_table, (128,), ("full", "paper-rule"))
    for record in records:
        assert record["score"] == tasks.task(record["task"], tokenizer, 128, record["seed"]).score(record["output"])
    for row, cells in zip(data["summary"], table_rows(summary_table)[1:]):
        by_task = {
            name: mean_of([r for r in records if r["method"] == row["method"] and r["task"] == name], "score")
            for name in tasks.TASKS
        }
        assert row["accuracy_by_task"] == pytest.approx(by_task)
        assert cells[-len(tasks.TASKS) :] == [f"{by_task[name]:.0%}" for name in tasks.TASKS]
    # The answers table: a row per task and method, counting the probes whose every expected value was found.
    assert len(data["answers"]) == len(tasks.TASKS) * 2
    for row in data["answers"]:
        runs = [r for r in records if r["task"] == row["task"] and r["method"] == row["method"]]
        assert row["answered"] == sum(r["score"] == 1 for r in runs) and row["prompts"] == len(runs)
        assert row["interval"][0] <= row["answered"] / row["prompts"] <= row["interval"][1]
        assert f"| 128 | {row['task']} | {row['method']} | {row['answered']}/{len(runs)} |" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["needle", "--depths", "0,2"], "depths must be in [0, 1]"),
        (["speed", "--methods", "full,fastest"], "choose from full,gemfilter"),
        (
            ["rag", "--shapes", "question_last,question_middle"],
            "choose from question_last,question_first,system_context",
        ),
        (["rag", "--context-source", "retriever"], "invalid choice"),
    ],
)
def test_bad_flags_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_single_stage_equal_to_profile_is_measured_once(tokenizer):
    with pytest.warns(UserWarning, match="fallback rule"):  # whose schedule is single-stage
        engine = PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny")
    engines = measure.method_engines(engine, list(measure.METHODS), None, None)
    assert engines["single-stage"].config == engines["profile"].config
    described = measure.describe(engines)
    assert described["profile"]["measured_as"] == "single-stage"
    assert described["gemfilter"]["measured_as"] == "gemfilter"


def test_method_notes_name_the_protected_context(tokenizer):
    """A results page says which settings selected: protections that are set are named, unset ones are not."""
    with pytest.warns(UserWarning, match="fallback rule"):
        engine = PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny")
    engines = {
        "profile": engine,
        "single-stage": engine.with_config(engine.config.replace(protect_recent=32, protect_structure=True)),
    }
    notes = dict(zip(engines, cli._method_notes(measure.describe(engines)).splitlines()))
    assert "kept" not in notes["profile"]
    assert "last 32 context tokens kept, line and sentence ends kept)" in notes["single-stage"]


def magic_numbers(text: str) -> list[str]:
    return re.findall(r"\d{7}", text)


@pytest.mark.parametrize("name", tasks.TASKS)
def test_task_needles_are_in_the_prompt_and_scored_by_exact_match(name, tokenizer):
    probe = tasks.task(name, tokenizer, 300, seed=3)
    prompt = probe.messages[0]["content"]
    assert all(needle in prompt for needle in probe.needles)
    assert probe.question in prompt
    assert len(probe.needles) == (1 if name == "niah-single" else tasks.NEEDLES_PER_TASK)
    values = [magic_numbers(needle)[0] for needle in probe.needles]
    asked = values[:1] if name in ("niah-single", "niah-multikey") else values
    assert probe.score(" ".join(values)) == 1.0
    assert probe.score("I don't know.") == 0.0
    assert probe.score(f"It is {asked[0][:3]},{asked[0][3:]}.") == pytest.approx(1 / len(asked))
    if name == "niah-multikey":
        assert probe.score(" ".join(values[1:])) == 0.0  # distractor keys' values earn nothing


def test_probes_are_reproducible_from_their_seed(tokenizer):
    assert (
        tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages
        == tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages
    )
    assert (
        tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages
        != tasks.task("niah-multiquery", tokenizer, 200, seed=2).messages
    )
    assert tasks.needle(tokenizer, 200, 0.5, 4).messages == tasks.needle(tokenizer, 200, 0.5, 4).messages


def test_summary_ratios_and_table_without_full_attention():
    record = {
        "prompt_tokens": 100,
        "kept_tokens": 50,
        "decode_tokens_per_second": None,
        "peak_memory_bytes": None,
        "needles_kept": 1.0,
        "score": 1.0,
    }
    records = [
        {**record, "length": 64, "method": "full", "prefill_seconds": 2.0, "kv_cache_bytes": 4 * 2**20},
        {**record, "length": 64, "method": "profile", "prefill_seconds": 1.0, "kv_cache_bytes": 2**20},
        {**record, "length": 32, "method": "profile", "prefill_seconds": 0.5, "kv_cache_bytes": 2**20},
    ]
    rows = report.summarize(records)
    assert [(r["length"], r["method"]) for r in rows] == [(32, "profile"), (64, "full"), (64, "profile")]
    assert rows[0]["prefill_ratio"] is None
    assert rows[2]["prefill_ratio"] == 0.5 and rows[2]["kv_ratio"] == 0.25
    cells = table_rows(report.markdown_table(rows))
    assert cells[1][4] == "–" and cells[3][4] == "0.50×" and cells[3][5] == "–" and cells[3][8] == "–"


def test_summary_rows_are_means_of_their_runs():
    def run(method, task, score, kept, kv_mib, prefill, peak_mib, needles):
        return {
            "length": 64,
            "method": method,
            "task": task,
            "prompt_tokens": 100,
            "kept_tokens": kept,
            "prefill_seconds": prefill,
            "decode_tokens_per_second": None,
            "kv_cache_bytes": kv_mib * 2**20,
            "peak_memory_bytes": None if peak_mib is None else peak_mib * 2**20,
            "needles_kept": needles,
            "score": score,
        }

    records = [
        run("full", "a", 1.0, 100, 4, 2.0, 10, 1.0),
        run("full", "b", 0.5, 100, 4, 4.0, None, 1.0),
        run("profile", "a", 0.0, 40, 1, 1.0, 2, 0.5),
        run("profile", "b", 0.75, 60, 2, 2.0, 4, 0.0),
        run("profile", "b", 0.25, 50, 3, 0.0, None, 1.0),
    ]
    for record, predicted in zip(records, (None, None, 0.4, 0.5, None)):
        record["predicted_prefill_ratio"] = predicted
    full, profile = report.summarize(records, breakdown="task")
    assert (full["runs"], full["accuracy"], full["prefill_seconds"], full["peak_memory_mib"]) == (2, 0.75, 3.0, 10)
    assert full["accuracy_by_task"] == {"a": 1.0, "b": 0.5}
    assert full["prefill_ratio"] == full["kv_ratio"] == full["peak_memory_ratio"] == 1.0
    assert profile["runs"] == 3 and profile["kept_tokens"] == 50 and profile["kv_cache_mib"] == 2
    assert profile["accuracy"] == pytest.approx(1 / 3) and profile["needles_kept"] == 0.5
    assert profile["accuracy_by_task"] == {"a": 0.0, "b": 0.5}
    assert profile["prefill_ratio"] == pytest.approx(1 / 3)
    assert profile["kv_ratio"] == 0.5 and profile["peak_memory_ratio"] == 0.3  # runs without a peak are left out
    cells = table_rows(report.markdown_table([full, profile]))
    assert cells[0][-2:] == ["a", "b"]
    assert cells[2] == [
        "64",
        "profile",
        "50 / 100",
        "1.00",
        "0.33×",
        "0.45×",
        "2.0",
        "0.50×",
        "–",
        "3",
        "0.30×",
        "50%",
        "33%",
        "0%",
        "50%",
    ]
    assert cells[1][5] == "–"  # full attention has no prediction


def test_needle_demo_cookbook_writes_a_page_per_method(capsys, monkeypatch, tmp_path, tiny_model_dir):
    cookbook = Path(__file__).parents[1] / "cookbook" / "needle_demo.py"
    # 300 tokens: enough for the context heuristic (the demo names no documents) to find prunable context.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(cookbook),
            "--model",
            tiny_model_dir,
            "--tokens",
            "300",
            "--layer",
            "1",
            "--budget",
            "32",
            "--out",
            str(tmp_path),
        ],
    )
    with pytest.warns(UserWarning, match="no PromptDistill profile"):
        runpy.run_path(str(cookbook), run_name="__main__")
    output = capsys.readouterr().out
    assert all(f"wrote {tmp_path / f'{name}.html'}" in output for name in measure.METHODS)
    # The comparison table: method, answered, needle kept, kept/total, TTFT s, ÷ full, KV MiB, ÷ full.
    rows = {
        line.split()[0]: line.split()
        for line in output.splitlines()
        if line.split() and line.split()[0] in measure.METHODS
    }
    assert list(rows) == list(measure.METHODS)
    totals = {name: tuple(map(int, row[3].split("/"))) for name, row in rows.items()}
    assert len({total for _, total in totals.values()}) == 1  # one prompt for every method
    assert rows["full"][2] == "yes" and rows["full"][5] == rows["full"][7] == "1.00"
    assert totals["full"][0] == totals["full"][1] and totals["profile"][0] == totals["profile"][1]
    for name in SELECTING:
        kept, total = totals[name]
        assert kept < total
        assert rows[name][7] == f"{kept / total:.2f}"  # the KV cache holds the kept tokens


def test_cpu_peak_memory_is_measured_once_per_cell_outside_the_timed_call():
    """On CPU, a cell's first call runs once more before it, for the memory (after a trim, which would slow a timed
    call); later calls in the cell run once and carry that figure; another length or config is another cell."""
    calls = []

    class _Engine:
        device = torch.device("cpu")

        def __init__(self, config):
            self.config = config

    def call(name):
        def run():
            calls.append(name)
            torch.ones(2**20).sum()  # a few MiB held at the peak
            return name

        return run

    profile, full = _Engine("profile"), _Engine("full")
    measure._CELL_PEAKS.clear()
    first = measure.cell_peak_memory(profile, {"length": 128, "shape": "question_last"}, call("a"))
    second = measure.cell_peak_memory(profile, {"length": 128, "shape": "question_last"}, call("b"))
    other_length = measure.cell_peak_memory(profile, {"length": 256, "shape": "question_last"}, call("c"))
    other_config = measure.cell_peak_memory(full, {"length": 128, "shape": "question_last"}, call("d"))
    assert calls == ["a", "a", "b", "c", "c", "d", "d"]
    assert [first[0], second[0], other_length[0], other_config[0]] == ["a", "b", "c", "d"]
    assert second[1] == first[1]
    if sys.platform == "linux":
        assert first[1] > 0 and other_length[1] > 0
