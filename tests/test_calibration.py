"""Profiles: calibration writes them, engines find and validate them, the shipped one is used by default."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

import pd_integrations.calibration as calibration
import pd_integrations.calibration.mixed as calibration_mixed
import pd_integrations.calibration.run as calibration_run
from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.calibration import (
    SCORINGS,
    SPANS,
    ProbeRecord,
    Schedule,
    calibrate,
    candidate_schedules,
    choose_retrieval_heads,
    compare_scoring,
    keeps_evidence,
    needle_rank_table,
)
from pd_integrations.calibration.__main__ import main
from pd_integrations.config import PROFILES_DIR, BudgetRule, budget_to_json
from pd_integrations.corpora import rag
from pd_integrations.probes import NeedleProbe, needle_probe
from pd_integrations.prompt import render

from .conftest import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch, tokenizer):
    """An empty package cache (the `tokenizer` fixture is loaded before the cache moves)."""
    monkeypatch.setenv("PD_INTEGRATIONS_CACHE", str(tmp_path))
    return tmp_path


def test_calibration_writes_a_profile_engines_use(cache, tokenizer, monkeypatch):
    chosen_heads = []

    def spy(table):  # calibration's retrieval heads are `choose_retrieval_heads` of its recall table
        chosen_heads.append((table.clone(), choose_retrieval_heads(table)))
        return chosen_heads[-1][1]

    monkeypatch.setattr(calibration_run, "choose_retrieval_heads", spy)
    model = tiny_model("qwen3")
    engine = PromptDistillEngine(model, tokenizer, PromptDistillConfig(method="full"), model_name="tiny-qwen3")
    profile = calibrate(
        "tiny-qwen3", engine=engine, lengths=(300,), depths=(0.2, 0.8), kinds=("passcode",), verify=1, plan_length=1024
    )
    written = json.loads((cache / "profiles" / "tiny-qwen3.json").read_text())
    assert written["num_hidden_layers"] == 4 and written["calibration"]["probes"] == 2
    [(table, heads)] = chosen_heads
    assert table.shape == (4, 4)  # [layers, heads] of the tiny model
    assert written["calibration"]["layer_needle_recall"] == [round(float(v), 3) for v in table.mean(1)]
    assert written["calibration"]["retrieval_heads"] == {str(k): list(v) for k, v in heads.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with a profile must not fall back
        resolved = PromptDistillEngine(model, tokenizer, model_name="tiny-qwen3").config
    assert list(resolved.selection_layers) == profile.settings["selection_layers"]
    assert list(resolved.budgets) == profile.settings["budgets"]
    assert resolved.span == profile.settings["span"]


def test_compare_scoring_ranks_needles_per_layer_for_every_scoring(tokenizer):
    engine = PromptDistillEngine(
        tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"), model_name="tiny-llama"
    )
    probes = [needle_probe(tokenizer, 200, depth, seed=k) for k, depth in enumerate((0.2, 0.8))]
    everything = compare_scoring(engine, probes, budget=10_000)
    assert list(everything) == list(SCORINGS)
    assert all(recall == [1.0] * 4 for recall in everything.values())  # every candidate is within the budget
    # With a budget of one candidate, a random model's needle is almost never the top token.
    top_one = compare_scoring(engine, probes, budget=1)
    assert all(len(recall) == 4 and sum(recall) < 4 for recall in top_one.values())


def test_compare_scoring_command_prints_every_scoring(tmp_path, tokenizer, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no PromptDistill profile"):
        main(
            [
                "--compare-scoring",
                "--model",
                str(tmp_path),
                "--lengths",
                "200",
                "--depths",
                "0.5",
                "--kinds",
                "passcode",
            ]
        )
    lines = capsys.readouterr().out.splitlines()
    assert "share of 1 probes whose needle ranks in the top 50 candidates, layers 0 → 3" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(SCORINGS)
    assert all(len(line.split("|")[1].split()) == 4 for line in lines[1:])  # one share per layer


def write_profile(cache, name, **fields):
    data = {
        "model": name,
        "num_hidden_layers": 4,
        "settings": {"selection_layers": [1], "budgets": [64], "span": "token"},
    }
    data.update(fields)
    (cache / "profiles").mkdir(exist_ok=True)
    (cache / "profiles" / f"{name}.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_hidden_layers": 30}, "calibrated for 30 layers but the model has 4"),
        ({"settings": {"selection_layers": [1], "budgets": [0]}}, "invalid: budgets must be ints >= 1"),
        ({"settings": {"selection_layers": [1], "budgets": [8], "speed": "max"}}, "unknown settings"),
        ({"settings": {"selection_layers": [3], "budgets": [8]}}, r"selection_layers entries must be in \[0, 2\]"),
    ],
)
def test_bad_profiles_are_rejected(cache, tokenizer, fields, message):
    write_profile(cache, "tiny-bad", **fields)
    with pytest.raises(ValueError, match=message):
        PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-bad")


def test_corrupt_profile_file(cache, tokenizer):
    (cache / "profiles").mkdir()
    (cache / "profiles" / "tiny-corrupt.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-corrupt")


def test_model_without_profile_warns_and_uses_the_fallback_rule(cache, tokenizer):
    with pytest.warns(UserWarning, match="no PromptDistill profile for 'tiny-unknown'"):
        config = PromptDistillEngine(tiny_model("llama"), tokenizer, model_name="tiny-unknown").config
    assert config.selection_layers == (2,) and config.span == "chunk" and config.chunk_size == 64
    assert config.budgets == (BudgetRule(0.3, 461),)


def test_shipped_default_profile_is_used(default_engine):
    shipped = json.loads((PROFILES_DIR / "smollm2-135m-instruct.json").read_text())["settings"]
    config = default_engine.config
    assert list(config.selection_layers) == shipped["selection_layers"]
    assert [budget_to_json(b) for b in config.budgets] == shipped["budgets"]
    assert config.span == shipped["span"]


def test_sentence_spans_keep_the_needle_sentence(default_engine, tokenizer):
    probe = needle_probe(tokenizer, 2000, 0.55, seed=11)
    engine = default_engine.with_config(
        default_engine.config.replace(selection_layers=(7,), budgets=(256,), heads=((0, 2, 7),), span="sentence")
    )
    result = engine.generate(messages=probe.messages(), query=probe.question, max_new_tokens=16)
    kept_text = "".join(result.prompt_text[a:b] for a, b in result.kept_char_spans)
    assert result.kept_tokens < result.prompt_tokens / 4
    assert probe.needle in kept_text
    assert probe.is_answered(result.text), result.text


def test_profile_heads_do_not_follow_caller_chosen_layers(default_engine):
    """Retrieval heads are calibrated per layer: choosing other layers must not inherit them."""
    assert any(heads is not None for heads in default_engine.config.heads)
    chosen = default_engine.with_config(PromptDistillConfig(selection_layers=(14,), budgets=(512,)))
    assert chosen.config.heads == (None,)  # every head scores


# Calibration's decisions on hand-built scores, without a model. The prompt's tokens (SmolLM2's tokenizer, no special
# tokens), as the `rendered` fixture checks: 0-2 "Ask me." | 3-8 "Red fox runs far away." | 9-18 the needle "The vault
# code is 4711." | 19-25 "Blue owls sleep all day long." | 26-28 "Green frogs jump" | 29-31 ". Done?". Tokens 0-2
# and 29-31 are protected; the other 26 are candidates.
TEXT = "Ask me. Red fox runs far away. The vault code is 4711. Blue owls sleep all day long. Green frogs jump. Done?"
NEEDLE = "The vault code is 4711."
FIRST, NEEDLE_SPAN, THIRD, FOURTH = slice(3, 9), slice(9, 19), slice(19, 26), slice(26, 29)
PROTECTED = [0, 1, 2, 29, 30, 31]


@pytest.fixture(scope="module")
def rendered(tokenizer):
    rendered = render(tokenizer, TEXT, None, None)
    start = TEXT.find(NEEDLE)
    needle = [i for i, (a, b) in enumerate(rendered.offsets) if a < start + len(NEEDLE) and b > start]
    assert len(rendered.input_ids) == 32 and needle == list(range(9, 19))  # the layout the tests rely on
    return rendered


def probe_record(rendered, scores, *, needle=range(9, 19), protected=PROTECTED) -> ProbeRecord:
    prunable = torch.ones(32, dtype=torch.bool)
    prunable[list(protected)] = False
    probe = NeedleProbe(TEXT, NEEDLE, "What is the vault code?", "4711", 0.5, "passcode")
    return ProbeRecord(probe, scores, torch.tensor(list(needle)), prunable, rendered)


def base_scores(layers=4, heads=3) -> torch.Tensor:
    """Zero scores, except that protected rows score highest everywhere (they must never take budget)."""
    scores = torch.zeros(layers, heads, 32)
    scores[..., PROTECTED] = 5.0
    return scores


def single(layer, budget, heads=None, span="token", chunk_size=None) -> Schedule:
    return Schedule(((layer, budget, heads),), span, chunk_size)


def test_keeps_needle_when_it_tops_the_selection_layer_within_the_budget(rendered):
    scores = base_scores()
    scores[1, :, NEEDLE_SPAN], scores[1, :, FIRST] = 1.0, 0.5
    scores[2, :, THIRD], scores[2, :, FIRST], scores[2, :, FOURTH] = 1.0, 0.5, 0.25  # the needle scores lowest
    record = probe_record(rendered, scores)
    assert keeps_evidence(single(1, 10), record)  # exactly the needle's 10 tokens
    assert not keeps_evidence(single(1, 9), record)
    assert not keeps_evidence(single(2, 10), record)  # at layer 2 the third and first sentences outrank it
    assert not keeps_evidence(single(2, 25), record)  # 25 of 26 candidates: one needle token goes
    assert keeps_evidence(single(2, 26), record)  # a budget covering every candidate prunes nothing


def test_keeps_needle_scores_with_the_schedules_heads(rendered):
    scores = base_scores()
    scores[3, 0, NEEDLE_SPAN] = 1.0  # head 0 finds the needle
    scores[3, 1:, THIRD] = 1.0  # heads 1 and 2 prefer the third sentence
    record = probe_record(rendered, scores)
    assert keeps_evidence(single(3, 10, (0,)), record)
    assert not keeps_evidence(single(3, 10), record)  # averaged over all heads the third sentence wins
    assert not keeps_evidence(single(3, 10, (1, 2)), record)


def test_two_stage_schedules_keep_the_needle_only_through_both_stages(rendered):
    scores = base_scores()
    scores[1, :, NEEDLE_SPAN], scores[1, :, FIRST] = 1.0, 0.5  # stage 1 at budget 16 keeps exactly these two
    scores[2, :, THIRD], scores[2, :, NEEDLE_SPAN] = 1.0, 0.5  # the third sentence leads but is gone by then
    scores[3, :, THIRD], scores[3, :, FIRST], scores[3, :, NEEDLE_SPAN] = 1.0, 1.0, 0.5
    record = probe_record(rendered, scores)
    two_stage = lambda second, budget: Schedule(((1, 16, None), (second, budget, None)), "token", None)  # noqa: E731
    assert not keeps_evidence(single(2, 10), record)  # alone, layer 2 keeps the third sentence
    assert keeps_evidence(two_stage(2, 10), record)  # after stage 1 only the needle and the first sentence compete
    assert not keeps_evidence(two_stage(3, 10), record)  # the second stage keeps the first sentence instead
    assert keeps_evidence(two_stage(3, 16), record)  # a second budget as large as the first drops nothing more
    assert not keeps_evidence(Schedule(((1, 9, None), (2, 9, None)), "token", None), record)  # the first drops it


def test_chunk_spans_keep_the_needle_unit_whole_and_cut_the_last_unit_to_its_best_window(rendered):
    scores = base_scores()
    scores[1, :, 14] = 1.0  # only the code's first digit stands out
    scores[1, :, THIRD] = 0.5
    record = probe_record(rendered, scores)
    # With 4-token chunks every sentence is its own unit; with 8, the first sentence and the needle share one.
    sentences, pairs = record.units("chunk", 4), record.units("chunk", 8)
    assert len(set(sentences[NEEDLE_SPAN].tolist())) == 1 and sentences[8] != sentences[9] != sentences[19]
    assert len(set(pairs[3:19].tolist())) == 1 and pairs[19] != pairs[18]
    assert not keeps_evidence(single(1, 10), record)  # token spans keep the digit and the third sentence
    assert keeps_evidence(single(1, 10, span="chunk", chunk_size=4), record)  # the needle's unit ranks first
    assert not keeps_evidence(single(1, 9, span="chunk", chunk_size=4), record)  # cut: its last token goes
    # Cut to 10 of 16: every window holding the digit ties, so the earliest (rows 5-14) is kept; the needle's end goes.
    assert not keeps_evidence(single(1, 10, span="chunk", chunk_size=8), record)
    assert keeps_evidence(single(1, 16, span="chunk", chunk_size=8), record)


def test_verification_needs_the_evidence_kept_in_a_real_run_and_full_attentions_accuracy():
    class Engine:
        @staticmethod
        def with_config(config):
            return config

    schedules = [single(1, 10), single(2, 10), single(3, 10)]
    outcomes = {"full": (0.5, 1.0), (1,): (1.0, 0.9), (2,): (0.25, 1.0), (3,): (0.5, 1.0)}
    rate_of = lambda config, probes, desc: outcomes["full" if config.method == "full" else config.selection_layers]
    # Layer 1 answers best but lost one probe's evidence; layer 2 keeps it but answers less than full attention.
    chosen, rate, full_rate, runs = calibration.verify_schedules(Engine(), schedules, ["probe"], rate_of)
    assert (chosen, rate, full_rate) == (schedules[2], 0.5, 0.5)
    # Every candidate run is reported, for the profile's record of why the cheaper ones lost.
    assert [(run["selection_layers"], run["answered"], run["evidence_kept"]) for run in runs] == [
        ([1], 1.0, 0.9),
        ([2], 0.25, 1.0),
        ([3], 0.5, 1.0),
    ]
    with pytest.warns(UserWarning, match="no candidate kept every verification probe's evidence"):
        assert calibration.verify_schedules(Engine(), schedules[:2], ["probe"], rate_of)[:3] == (
            schedules[0],
            None,
            0.5,
        )
    assert calibration.verify_schedules(Engine(), schedules, [], rate_of) == (schedules[0], None, None, [])


def test_floored_schedules_prune_short_contexts_as_if_they_had_the_floor_length():
    rules = Schedule(
        ((7, BudgetRule(0.5), (7,)), (17, BudgetRule(0.3, cap=400), None), (20, 64, None)), "passage", None
    )
    floored = rules.floored(1536)
    assert [stage[1] for stage in floored.stages] == [BudgetRule(0.5, 768), BudgetRule(0.3, 400, 400), 64]
    assert floored.budgets_at(1000) == [768, 400, 64]  # unfloored: 500, 300, 64
    for prunable in (1536, 2000, 8000):  # from the floor length up nothing changes
        assert floored.budgets_at(prunable) == rules.budgets_at(prunable)
    assert rules.floored(0) == rules
    # A floor already above the floor length's share stays.
    assert Schedule(((7, BudgetRule(0.5, 2000), None),), "passage", None).floored(1536).stages[0][1].floor == 2000
    with pytest.raises(ValueError, match="floor_length must be an int >= 0"):
        calibration.calibrate_rag(floor_length=-1)


def test_schedule_cost_counts_the_layer_rows_each_stage_processes():
    single_stage = Schedule(((7, 2048, None),), "chunk", 64)
    assert single_stage.cost(30, 8192) == (8 * 8192 + 22 * (2048 + 20)) / (30 * 8192)
    assert single_stage.cost(30, 8192, protected=0) == (8 * 8192 + 22 * 2048) / (30 * 8192)
    two_stage = Schedule(((3, 1024, None), (10, 512, None)), "token", None)
    assert two_stage.cost(30, 8192) == (4 * 8192 + 7 * 1044 + 19 * 532) / (30 * 8192)
    # A later stage never brings back rows an earlier one dropped.
    widening = Schedule(((3, 512, None), (10, 1024, None)), "token", None)
    assert widening.cost(30, 8192) == (4 * 8192 + 26 * 532) / (30 * 8192)
    # A budget that, with the protected rows, covers the prompt prunes nothing.
    assert Schedule(((7, 10_000, None),), "token", None).cost(30, 8192) == 1.0
    assert single_stage.cost(30, 2068) == 1.0
    assert single_stage.cost(30, 2069) == (8 * 2069 + 22 * 2068) / (30 * 2069)


def test_candidate_schedules_for_an_eight_layer_model():
    heads = {2: (0, 3), 5: (1,), 7: (2,)}  # layer 7 is the last layer: never a selection layer
    schedules = candidate_schedules(8, heads, max_length=1500)
    assert len(schedules) == len(set(schedules)) == 3 * (15 + 6 + 20)
    assert {(s.span, s.chunk_size) for s in schedules} == set(SPANS)
    layers, budgets = (2, 3, 4, 5, 6), (256, 512, 1024)  # from a quarter of the depth; 2048 >= max_length
    for span, chunk_size in SPANS:
        mine = [s.stages for s in schedules if (s.span, s.chunk_size) == (span, chunk_size)]
        assert {s[0] for s in mine if len(s) == 1} == (
            {(layer, budget, None) for layer in layers for budget in budgets}
            | {(2, budget, (0, 3)) for budget in budgets}
            | {(5, budget, (1,)) for budget in budgets}
        )
        # Two stages: increasing layers, twice the budget first, and that doubled budget below max_length.
        assert {s for s in mine if len(s) == 2} == {
            ((first, 2 * budget, None), (second, budget, None))
            for first, second in itertools.combinations(layers, 2)
            for budget in (256, 512)
        }


def test_candidate_budgets_stay_below_the_longest_probe():
    def budgets(max_length):
        schedules = candidate_schedules(8, {}, max_length)
        return (
            {s.stages[0][1] for s in schedules if len(s.stages) == 1},
            {s.stages[0][1] for s in schedules if len(s.stages) == 2},
        )

    assert budgets(1024) == ({256, 512}, {512})
    assert budgets(1025) == ({256, 512, 1024}, {512, 1024})
    assert budgets(8192) == ({256, 512, 1024, 2048}, {512, 1024, 2048, 4096})
    assert {s.stages[0][0] for s in candidate_schedules(30, {}, 8192)} == set(range(7, 29))


def test_retrieval_heads_are_a_layers_best_third_when_they_beat_its_average():
    table = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.8, 0.3, 0.4],  # heads 1 and 3 lead
            [0.7, 0.1, 0.1, 0.1, 0.1, 0.6],  # heads 0 and 5, in head order
            [0.5] * 6,  # no head beats the others
            [1.0] * 6,
            [0.2, 0.0, 0.0, 0.0, 0.0, 0.3],
        ]
    )
    assert choose_retrieval_heads(table) == {0: (1, 3), 1: (0, 5), 4: (0, 5)}
    # At least one head, even with fewer than three.
    assert choose_retrieval_heads(torch.tensor([[0.2, 0.6], [0.4, 0.4]])) == {0: (1,)}
    assert choose_retrieval_heads(torch.tensor([[0.5, 0.25, 0.75, 0.0]])) == {0: (2,)}


def test_needle_rank_table_ranks_the_best_prunable_needle_token_among_the_candidates(rendered):
    scores = base_scores(layers=2, heads=2)
    scores[0, 0, 3:6], scores[0, 0, 15] = 1.0, 0.9  # three candidates outrank the needle: rank 3
    scores[0, 1, 16] = 1.0  # the needle ranks first
    scores[1, 0, 9], scores[1, 0, THIRD] = 10.0, 0.5  # the needle's protected first token doesn't count: rank 7
    # layer 1, head 1: every candidate ties at 0; ties don't count against the needle (rank 0).
    record = probe_record(rendered, scores, protected=PROTECTED + [9])
    assert torch.equal(needle_rank_table([record], 3), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(needle_rank_table([record], 4), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(needle_rank_table([record], 7), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(needle_rank_table([record], 8), torch.ones(2, 2))
    # A needle the layout protects entirely is always kept: a hit at every layer and head.
    protected_needle = probe_record(rendered, scores, needle=(29, 30))
    assert torch.equal(needle_rank_table([record, protected_needle], 3), torch.tensor([[0.5, 1.0], [0.5, 1.0]]))


# RAG calibration: records saved and re-searched without the model, evidence needs, budget rules, the cost model.


def test_tokens_needed_is_the_smallest_single_stage_budget_that_keeps_the_evidence(rendered):
    scores = base_scores()
    scores[1, :, THIRD], scores[1, :, NEEDLE_SPAN], scores[1, :, FIRST] = 1.0, 0.5, 0.25
    record = probe_record(rendered, scores)
    for span, chunk in (("token", None), ("sentence", None), ("chunk", 4)):
        needed = calibration.tokens_needed(record, 1, None, span, chunk)
        assert needed == 17  # the third sentence (7 tokens) outranks the needle (10)
        assert keeps_evidence(single(1, needed, span=span, chunk_size=chunk), record)
        assert not keeps_evidence(single(1, needed - 1, span=span, chunk_size=chunk), record)
    # Unit scoring changes the order: one hot token makes the first sentence the best by max, not by mean.
    scores[2, :, NEEDLE_SPAN], scores[2, :, 3] = 0.5, 0.9
    record = probe_record(rendered, scores)
    assert calibration.tokens_needed(record, 2, None, "sentence", None, "max") == 16
    assert calibration.tokens_needed(record, 2, None, "sentence", None, "mean") == 10


@pytest.mark.parametrize("seed", range(6))
def test_tokens_needed_agrees_with_the_selector_at_every_budget(rendered, seed):
    """The unit cut by the budget keeps its best window, so a budget below a unit's end may or may not keep the
    evidence inside it; `tokens_needed` is where keeping starts for good, replayed here budget by budget."""
    scores = base_scores()
    scores[1] = torch.rand(3, 32, generator=torch.Generator().manual_seed(seed))
    record = probe_record(rendered, scores)
    candidates = int(record.prunable.sum())
    for span, chunk in (("token", None), ("sentence", None), ("chunk", 8)):
        needed = calibration.tokens_needed(record, 1, None, span, chunk)
        kept = [
            keeps_evidence(single(1, budget, span=span, chunk_size=chunk), record)
            for budget in range(needed - 1, candidates + 1)
        ]
        assert not kept[0] and all(kept[1:]), (span, needed)


def test_records_round_trip_and_re_search_without_the_model(rendered, tmp_path):
    scores = base_scores()
    scores[1, :, NEEDLE_SPAN] = scores[2, :, NEEDLE_SPAN] = 1.0
    records = [probe_record(rendered, scores)]
    records[0].labels = {"kind": "rag", "length": 32, "shape": "question_last"}
    path = tmp_path / "records.pt"
    calibration.save_records(records, path)
    [loaded] = calibration.load_records(path)
    assert loaded.rendered is None and loaded.labels == records[0].labels
    assert torch.equal(loaded.units("sentence", None), records[0].units("sentence", None))
    assert torch.equal(loaded.units("passage", None), records[0].units("passage", None))
    assert torch.allclose(loaded.scores, scores, atol=1e-3)
    for span in ("token", "sentence", "passage"):
        assert calibration.tokens_needed(loaded, 1, None, span, None) == calibration.tokens_needed(
            records[0], 1, None, span, None
        )
    with pytest.raises(ValueError, match="saved without 'chunk' units"):
        loaded.units("chunk", 7)
    (tmp_path / "junk.pt").write_bytes(b"not a records file")
    with pytest.raises(ValueError, match="is not a pd-calibrate records file"):
        calibration.load_records(tmp_path / "junk.pt")
    tried = calibration.rag_search(
        [loaded],
        4,
        plan_lengths=(32,),
        first_fractions=(0.5,),
        second_fractions=(0.3, 0.4),
        spans=(("sentence", None),),
        scorings=("max",),
    )
    assert tried[0]["kept_share"] == 1.0 and all(row["kept_share"] <= 1.0 for row in tried)
    costs = [sum(row["predicted_prefill_ratio"].values()) for row in tried if row["kept_share"] == 1.0]
    assert costs == sorted(costs)
    # The search starts at layer 2, where the needle (10 of 26 candidates) is kept from a fraction of 0.4.
    assert tried[0]["schedule"].stages == ((2, BudgetRule(0.4), None),)
    assert {row["kept_share"] for row in tried if row["schedule"].stages[0][1].fraction < 0.38} == {0.0}
    # Every detrend window is searched, and the exact single-stage judgement agrees with a replay of each schedule.
    single = [row for row in tried if len(row["schedule"].stages) == 1]
    assert {row["schedule"].detrend_window for row in single} == {0, 512, 1024}
    assert all(keeps_evidence(row["schedule"], loaded) == (row["kept_share"] == 1.0) for row in single)
    # The frontier plot `pd-calibrate --rag` writes beside the search it saved.
    search = calibration_run._save_search(tried, tmp_path / "records.search.json")
    calibration_run._plot_search(search, tried[0]["schedule"], 1.0, 4, 32)
    assert (tmp_path / "records.frontier.png").read_bytes().startswith(b"\x89PNG")


def test_rules_resolve_per_length_in_schedules_and_the_cost_model():
    rule = BudgetRule(0.25, 256, 2048)
    schedule = Schedule(((7, rule, None),), "passage", None)
    assert (
        schedule.budgets_at(8000) == [2000] and schedule.budgets_at(600) == [256] and schedule.budgets_at(100) == [100]
    )
    assert schedule.settings()["budgets"] == [{"fraction": 0.25, "floor": 256, "cap": 2048}]
    # The cost model: layers up to the selection see every row, later ones the kept rows (+ protected), each
    # costing rows * (TOKEN_COST + rows / 2).
    cost = lambda rows: rows * (calibration.TOKEN_COST + rows / 2)  # noqa: E731
    expected = (8 * cost(8060) + 22 * cost(2000 + 60)) / (30 * cost(8060))
    assert calibration.predicted_prefill_ratio(schedule, 30, 8060) == pytest.approx(expected)
    two = Schedule(((7, BudgetRule(0.7), (7,)), (17, BudgetRule(0.2), None)), "passage", None)
    assert two.budgets_at(1000) == [700, 200]
    ratios = [calibration.predicted_prefill_ratio(two, 30, n) for n in (1000, 2000, 4000, 8000)]
    assert ratios == sorted(ratios, reverse=True) and 0.4 < ratios[-1] < ratios[0] < 0.7


def test_a_budget_alone_selects_at_the_profiles_last_stages(default_engine):
    """`budgets=256` against the two-stage shipped profile: one stage, at the profile's last layer, with its heads."""
    profile = default_engine.runtime.profile
    layers, heads = profile.settings["selection_layers"], profile.settings["heads"]
    config = default_engine.with_config(PromptDistillConfig(budgets=256)).config
    assert config.selection_layers == (layers[-1],) and config.budgets == (256,)
    assert config.heads == (None if heads[-1] is None else tuple(heads[-1]),)
    assert default_engine.with_config(PromptDistillConfig(selection_layers=(12,))).config.budgets[0] == BudgetRule(
        **profile.settings["budgets"][-1]
    )


def test_the_cost_model_predicts_each_methods_prefill_from_its_resolved_config():
    rule = BudgetRule(0.25)
    config = PromptDistillConfig(
        selection_layers=(7, 17),
        budgets=(BudgetRule(0.5), rule),
        heads=((7,), None),
        span="passage",
        unit_score="topk_mean",
        detrend_window=1024,
    )
    schedule = Schedule.of(config)
    assert schedule == Schedule(((7, BudgetRule(0.5), (7,)), (17, rule, None)), "passage", None, "topk_mean", 1024)
    assert schedule.settings()["detrend_window"] == 1024
    assert calibration.predicted_ratio_of(config, 30, 8060, 60) == calibration.predicted_prefill_ratio(
        schedule, 30, 8060, 60
    )
    assert calibration.predicted_ratio_of(PromptDistillConfig(method="full"), 30, 8060, 60) is None
    # GemFilter: its scout layers 0..13 on every row, then all 30 layers on the 2000 + 60 kept rows.
    # The fields as resolution leaves them (the cost model takes resolved configs).
    gemfilter = PromptDistillConfig(
        method="gemfilter",
        selection_layers=(13,),
        budgets=(rule,),
        span="token",
        heads=(None,),
        unit_score="max",
        detrend_window=0,
    )
    cost = lambda rows: rows * (calibration.TOKEN_COST + rows / 2)  # noqa: E731
    assert calibration.predicted_ratio_of(gemfilter, 30, 8060, 60) == pytest.approx(
        (14 * cost(8060) + 30 * cost(2060)) / (30 * cost(8060))
    )


def test_rag_probes_cover_each_passage_order_and_refuse_unknown_ones(tokenizer):
    spread, rank = (calibration.rag_probes(tokenizer, [1000], 1, 0, (order,)) for order in ("spread", "rank"))
    both = calibration.rag_probes(tokenizer, [1000], 1, 0, ("spread", "rank"))
    assert [p.labels for p in both] == [p.labels for p in spread + rank] and len(both) == 2 * len(rag.SHAPES)
    assert {p.labels["answer_position"] for p in spread} == {0.5} and {p.labels["answer_position"] for p in rank} == {
        None
    }
    for orders in ((), ("sorted",)):
        with pytest.raises(ValueError, match=r"rag_orders must be one or more of spread, rank, got"):
            calibration.rag_probes(tokenizer, [1000], 1, 0, orders)


def test_wilson_interval_matches_the_published_table():
    low, high = calibration_mixed.wilson_interval(17, 30)
    assert (round(low, 2), round(high, 2)) == (0.39, 0.73)
    assert calibration_mixed.wilson_interval(0, 30)[0] == 0.0 and calibration_mixed.wilson_interval(0, 0) == (0, 1)


def test_quick_calibration_never_sees_its_held_out_half(cache, tokenizer, monkeypatch):
    mixed = calibration_mixed
    seen = []  # every probe that recording or verification ran on

    def spy(original):
        def wrapped(engine, probes, *args):
            seen.extend(probes)
            return original(engine, probes, *args)

        return wrapped

    monkeypatch.setattr(mixed, "record_probes", spy(mixed.record_probes))
    monkeypatch.setattr(mixed, "record_rag_probes", spy(mixed.record_rag_probes))
    verify = mixed.verify_schedules
    monkeypatch.setattr(
        mixed, "verify_schedules", lambda e, ranked, probes: seen.extend(probes) or verify(e, ranked, probes)
    )
    model = tiny_model("qwen3")
    engine = PromptDistillEngine(model, tokenizer, PromptDistillConfig(method="full"), model_name="tiny-qwen3")
    profile, measured = mixed.calibrate_mixed(
        "tiny-qwen3", engine=engine, lengths=(300,), samples=1, verify_candidates=1
    )
    kinds = {kind: mixed.split_probes(p) for kind, p in mixed.mixed_probes(engine, (300,), 1, 300, None).items()}
    held_out = [p for _, heldout in kinds.values() for p in heldout]
    assert seen and not any(p in held_out for p in seen)
    assert set(measured["answers"]) == {"depots", "handbook", "needles"}
    # one probe per RAG shape and corpus, three needles; alternate probes of each kind are held out
    per_kind = [len(rag.SHAPES)] * 2 + [3]
    halves = {"calibration": sum((n + 1) // 2 for n in per_kind), "heldout": sum(n // 2 for n in per_kind)}
    assert measured["split_sizes"] == halves
    for name in ("profile", "full"):
        rates = {s: measured["totals"][s][name] / measured["split_sizes"][s] for s in ("calibration", "heldout")}
        assert measured["generalization_gap"][name] == pytest.approx(rates["calibration"] - rates["heldout"])
    written = json.loads((cache / "profiles" / "tiny-qwen3.json").read_text())
    assert written["settings"] == profile.settings and written["calibration"]["generalization_gap"]
    assert "generalization gap" in mixed.report(measured)
