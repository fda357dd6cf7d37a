"""The held-out needle benchmark: a split by file that never mixes, every question shape, and its summary."""

from __future__ import annotations

import pytest

from pd_integrations.bench import __main__ as bench_main
from pd_integrations.bench import heldout, report, tasks
from pd_integrations.calibration.mixed import wilson_interval
from pd_integrations.probes import load_haystack


@pytest.fixture()
def essays(tmp_path):
    for i, word in enumerate(["alpha", "bravo", "charlie", "delta"]):
        (tmp_path / f"{i}-{word}.txt").write_text(" ".join(f"The {word} essay makes point {j}." for j in range(400)))
    return str(tmp_path)


def test_splits_are_disjoint_halves_of_the_files(essays):
    dev, held = load_haystack(essays, "dev"), load_haystack(essays, "heldout")
    assert "alpha" in dev and "charlie" in dev and "bravo" not in dev and "delta" not in dev
    assert "bravo" in held and "delta" in held and "alpha" not in held and "charlie" not in held
    assert all(word in load_haystack(essays) for word in ("alpha", "bravo", "charlie", "delta"))
    with pytest.raises(ValueError, match="split must be one of dev, heldout"):
        load_haystack(essays, "test")
    with pytest.raises(ValueError, match="split needs a haystack directory"):
        load_haystack(None, "heldout")


@pytest.mark.parametrize("name", tasks.TASKS)
def test_ruler_tasks_on_a_split_draw_only_from_its_files(essays, tokenizer, name):
    probe = tasks.task(name, tokenizer, 300, seed=2, haystack=essays, split="heldout")
    assert probe.labels["split"] == "heldout"
    assert all(needle in probe.context for needle in probe.needles)
    assert "bravo" in probe.context or "delta" in probe.context
    assert "alpha" not in probe.context and "charlie" not in probe.context


@pytest.mark.parametrize("command", ["tasks", "heldout"])
def test_a_split_without_a_haystack_is_refused_before_the_model_loads(capsys, monkeypatch, command):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench_main, "load_model", no_loading)
    with pytest.raises(SystemExit):
        bench_main.main([command, "--split", "heldout"])
    assert "--split heldout needs --haystack DIR" in capsys.readouterr().err


def test_probes_hold_their_needle_and_ask_in_their_shape(essays, tokenizer):
    probes = heldout.probes(tokenizer, essays, "heldout", [300], list(heldout.SHAPES), 3)
    assert len(probes) == 9
    for probe in probes:
        content = probe.messages[0]["content"]
        assert probe.needles[0] in probe.context and probe.context in content
        asked_last = content.endswith(probe.question)
        assert asked_last == (probe.labels["shape"] == "question_last")
        if probe.labels["shape"] == "multi_turn":  # the question in the turn after the context's
            assert [m["role"] for m in probe.messages] == ["user", "assistant", "user"]
            assert probe.messages[2]["content"] == f"Answer briefly. {probe.question}"
            assert probe.question not in content
        else:
            assert len(probe.messages) == 1
        assert "alpha" not in content and "charlie" not in content  # nothing of the dev half
        words = probe.needles[0].rstrip(".").split()
        answer = words[-2] if words[-1] == "jam" else words[-1]  # "... a basket of fig jam."
        assert probe.score(f"It is {answer}.") == 1.0 and probe.score("I don't know.") == 0.0
    with pytest.raises(ValueError, match="shape must be one of"):
        heldout.probe(tokenizer, essays, "dev", 300, 0.5, "question_middle", 0)


def test_wilson_interval():
    low, high = wilson_interval(5, 12)
    assert round(low, 3) == 0.193 and round(high, 3) == 0.680
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_summary_compares_against_full_attention_on_the_same_probes():
    def record(method, seed, score, kept, seconds, kv):
        return {
            "length": 2000,
            "shape": "question_last",
            "seed": seed,
            "method": method,
            "score": score,
            "needles_kept": kept,
            "prefill_seconds": seconds,
            "kv_cache_bytes": kv,
        }

    records = [
        record("full", 0, 1.0, 1.0, 2.0, 100),
        record("full", 1, 0.0, 1.0, 2.0, 100),
        record("profile", 0, 1.0, 1.0, 1.0, 30),
        record("profile", 1, 1.0, 0.0, 1.0, 30),
    ]
    full, profile = report.answer_summary(records, "shape")
    assert full["method"] == "full" and profile["answered"] == 2 and profile["kept"] == 1
    assert profile["kept_answered"] == 1 and profile["both_answered"] == 1 and profile["full_answered"] == 1
    assert profile["prefill_ratio"] == 0.5 and profile["kv_ratio"] == 0.3
    table = report.answer_table([full, profile], "shape")
    assert "| 2000 | question_last | profile | 2/2 |" in table and "| 1/1 | 0.50× | 0.30× |" in table
