"""pd-bench: tiny end-to-end runs of every subcommand on a random tiny model, the task generators and the report."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from pd_integrations import PromptDistillEngine
from pd_integrations.bench import measure, report, tasks
from pd_integrations.bench.__main__ import main
from pd_integrations.config import PAPER_SCORING

from .conftest import tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Short prompts and answers keep each run well under a second on the 4-layer model; layer 1 and budget 32
# prune the prompt for every selecting method.
TINY_FLAGS = ["--layer", "1", "--budget", "32", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny random Llama with the default model's tokenizer (and chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(capsys, tmp_path, *argv) -> tuple[dict, str]:
    with pytest.warns(UserWarning, match="no PromptDistill profile"):  # the tiny model uses the fallback rule
        main([*argv, "--out", str(tmp_path)])
    command = argv[0]
    assert (tmp_path / f"{command}_scaling.png").read_bytes().startswith(PNG_SIGNATURE)
    table = (tmp_path / f"{command}.md").read_text()
    assert table.strip() in capsys.readouterr().out
    return json.loads((tmp_path / f"{command}.json").read_text()), table


def table_rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_needle_grid(capsys, tmp_path, tiny_dir):
    data, table = run_cli(capsys, tmp_path, "needle", "--model", tiny_dir, "--lengths", "96,160", "--depths", "0,1",
                          *TINY_FLAGS)
    assert (tmp_path / "needle_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    assert len(data["records"]) == 2 * 2 * len(measure.METHODS)
    log = (tmp_path / "needle.records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == data["records"]
    assert [(r["length"], r["method"]) for r in data["summary"]] == [
        (n, m) for n in (96, 160) for m in measure.METHODS]
    rows = table_rows(table)
    assert rows[0][:5] == ["length", "method", "kept / prompt", "prefill s", "÷ full"]
    assert len(rows) == 1 + 2 * len(measure.METHODS)
    for row in data["summary"]:
        pruned = row["method"] in ("gemfilter", "paper-rule", "single-stage")
        assert (row["kept_tokens"] < row["prompt_tokens"]) == pruned
        if pruned:
            assert row["kv_ratio"] < 1
        else:
            assert row["kv_ratio"] == pytest.approx(1.0)
        assert 0 <= row["accuracy"] <= 1
    methods = data["methods"]
    assert methods["paper-rule"]["config"]["aggregation"] == PAPER_SCORING["aggregation"]
    assert methods["gemfilter"]["config"]["selection_layers"] == [1]
    assert data["command"].startswith("pd-bench needle --model")


def test_speed_measures_memory_and_decode(capsys, tmp_path, tiny_dir):
    data, table = run_cli(capsys, tmp_path, "speed", "--model", tiny_dir, "--lengths", "128", "--methods",
                          "full,single-stage", "--max-new-tokens", "6", "--layer", "1", "--budget", "32")
    assert [r["method"] for r in data["summary"]] == ["full", "single-stage"]
    assert not (tmp_path / "speed_heatmap.png").exists()
    for record in data["records"]:
        assert record["prefill_seconds"] > 0
        if sys.platform == "linux":
            assert record["peak_memory_bytes"] > 0
    full, pruned = data["summary"]
    assert full["prefill_ratio"] == 1.0
    assert pruned["kv_cache_mib"] < full["kv_cache_mib"]
    assert "peak MiB" in table_rows(table)[0]


def test_tasks_table_has_a_column_per_task(capsys, tmp_path, tiny_dir):
    data, table = run_cli(capsys, tmp_path, "tasks", "--model", tiny_dir, "--lengths", "128", "--methods",
                          "full,paper-rule", *TINY_FLAGS)
    assert (tmp_path / "tasks_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)
    assert table_rows(table)[0][-len(tasks.TASKS):] == list(tasks.TASKS)
    assert all(set(row["accuracy_by_task"]) == set(tasks.TASKS) for row in data["summary"])
    assert len(data["records"]) == len(tasks.TASKS) * 2


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["needle", "--depths", "0,2"])
    assert "depths must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["speed", "--methods", "full,fastest"])
    assert "choose from full,gemfilter" in capsys.readouterr().err


def test_single_stage_equal_to_profile_is_measured_once(tokenizer):
    with pytest.warns(UserWarning, match="fallback rule"):  # whose schedule is single-stage
        engine = PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny")
    engines = measure.method_engines(engine, list(measure.METHODS), None, None)
    assert engines["single-stage"].config == engines["profile"].config
    described = measure.describe(engines)
    assert described["profile"]["measured_as"] == "single-stage"
    assert described["gemfilter"]["measured_as"] == "gemfilter"


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
    assert tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages == \
        tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages
    assert tasks.task("niah-multiquery", tokenizer, 200, seed=1).messages != \
        tasks.task("niah-multiquery", tokenizer, 200, seed=2).messages
    assert tasks.needle(tokenizer, 200, 0.5, 4).messages == tasks.needle(tokenizer, 200, 0.5, 4).messages


def test_summary_ratios_and_table_without_full_attention():
    record = {"prompt_tokens": 100, "kept_tokens": 50, "decode_tokens_per_second": None, "peak_memory_bytes": None,
              "needles_kept": 1.0, "score": 1.0}
    records = [{**record, "length": 64, "method": "full", "prefill_seconds": 2.0, "kv_cache_bytes": 4 * 2**20},
               {**record, "length": 64, "method": "profile", "prefill_seconds": 1.0, "kv_cache_bytes": 2**20},
               {**record, "length": 32, "method": "profile", "prefill_seconds": 0.5, "kv_cache_bytes": 2**20}]
    rows = report.summarize(records)
    assert [(r["length"], r["method"]) for r in rows] == [(32, "profile"), (64, "full"), (64, "profile")]
    assert rows[0]["prefill_ratio"] is None
    assert rows[2]["prefill_ratio"] == 0.5 and rows[2]["kv_ratio"] == 0.25
    cells = table_rows(report.markdown_table(rows))
    assert cells[1][4] == "–" and cells[3][4] == "0.50×" and cells[3][7] == "–"


def test_needle_demo_cookbook_writes_a_page_per_method(capsys, monkeypatch, tmp_path, tiny_dir):
    cookbook = Path(__file__).parents[1] / "cookbook" / "needle_demo.py"
    monkeypatch.setattr(sys, "argv", [str(cookbook), "--model", tiny_dir, "--tokens", "120", "--layer", "1",
                                      "--budget", "32", "--out", str(tmp_path)])
    with pytest.warns(UserWarning, match="no PromptDistill profile"):
        runpy.run_path(str(cookbook), run_name="__main__")
    output = capsys.readouterr().out
    assert all(f"wrote {tmp_path / f'{name}.html'}" in output for name in measure.METHODS)
    assert "method" in output and "needle kept" in output
