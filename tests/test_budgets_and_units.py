"""Length-aware budget rules (config, profile JSON, layout resolution) and unit scoring (max, mean, top-k mean)."""

from __future__ import annotations

import pytest
import torch

from pd_integrations.config import BudgetRule, Profile, PromptDistillConfig, resolve_config
from pd_integrations.layout import PromptLayout
from pd_integrations.selection import Selector, unit_scores

RULE = {"fraction": 0.25, "floor": 256, "cap": 2048}


def layout(prunable: int, protected: int = 10, query_free: bool = False) -> PromptLayout:
    mask = torch.cat([torch.zeros(protected, dtype=torch.bool), torch.ones(prunable, dtype=torch.bool)])
    return PromptLayout(mask, "documents", (), 1, None, query_free)


@pytest.mark.parametrize(
    "prunable, kept", [(100, 100), (600, 256), (1024, 256), (2000, 500), (4000, 1000), (8000, 2000), (20000, 2048)]
)
def test_a_rule_keeps_a_fraction_between_its_floor_and_cap_and_never_more_than_the_context(prunable, kept):
    config = PromptDistillConfig(selection_layers=(7,), budgets=RULE)
    assert config.budgets == (BudgetRule(0.25, 256, 2048),)
    assert layout(prunable).stage_budgets(config.budgets) == [kept]


def test_rules_stages_never_grow_and_plain_budgets_resolve_as_before():
    rules = (BudgetRule(0.5, 512), BudgetRule(0.1, 300, 1000))
    assert layout(1000).stage_budgets(rules) == [512, 300]  # floors: 512, then 300 (not 100)
    assert layout(400).stage_budgets(rules) == [400, 300]
    assert layout(20000).stage_budgets(rules) == [10000, 1000]
    assert layout(1000).stage_budgets((0.25, 0.1)) == [250, 100]
    assert layout(1000).stage_budgets((300, 100)) == [300, 100]


def test_a_query_free_layout_keeps_every_prunable_token():
    assert layout(1000, query_free=True).stage_budgets((BudgetRule(0.1), BudgetRule(0.05))) == [1000, 1000]
    assert layout(1000, query_free=True).counts(torch.arange(1010))["query_free"] is True


@pytest.mark.parametrize(
    "budgets, message",
    [
        ({"fraction": 0}, r"budgets rule field 'fraction' must be a number in \(0, 1\], got 0"),
        ({"fraction": 1.5}, r"'fraction' must be a number in \(0, 1\]"),
        ({"fraction": 0.2, "floor": -1}, r"'floor' must be an int >= 0, got -1"),
        ({"fraction": 0.2, "cap": 0}, r"'cap' must be an int >= 1 or null \(no cap\), got 0"),
        ({"fraction": 0.2, "floor": 512, "cap": 256}, r"floor <= cap, got floor=512 and cap=256"),
        ({"floor": 256}, r"keys 'fraction' \(required\), 'floor' and 'cap'"),
        ({"fraction": 0.2, "ceiling": 9}, r"keys 'fraction' \(required\), 'floor' and 'cap'.*'ceiling'"),
        ([{"fraction": 0.2}, 256], r"budgets must be all ints or all fractions \(or all rules\)"),
        ([{"fraction": 0.1}, {"fraction": 0.2}], r"non-increasing across stages in 'fraction'"),
        ([{"fraction": 0.2, "cap": 512}, {"fraction": 0.1}], r"non-increasing across stages in 'cap'"),
    ],
)
def test_bad_rules_name_the_field_and_its_allowed_values(budgets, message):
    with pytest.raises(ValueError, match=message):
        PromptDistillConfig(budgets=budgets)


def test_profiles_store_rules_as_json_dicts(tmp_path):
    settings = {
        "selection_layers": [4, 12],
        "budgets": [{"fraction": 0.5, "floor": 512}, {"fraction": 0.1, "floor": 256, "cap": 1024}],
        "span": "sentence",
        "unit_score": "topk_mean",
        "unit_topk": 4,
    }
    Profile("m", 30, settings).to_json(tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert '"budgets": [' in text and '"cap": null' in text
    config = Profile.from_json(tmp_path / "m.json").config()
    assert config.budgets == (BudgetRule(0.5, 512), BudgetRule(0.1, 256, 1024))
    assert (config.unit_score, config.unit_topk) == ("topk_mean", 4)
    # The selector of the resolved config: resolution fills the scoring the profile leaves out.
    resolved = resolve_config(config, lambda: None, "m", 30, 9)
    assert Selector.from_config(resolved) == Selector("softmax_mean", 1, "topk_mean", 4)
    with pytest.raises(ValueError, match=r"unit_score must be one of 'max', 'mean', 'topk_mean', got 'median'"):
        PromptDistillConfig(unit_score="median")
    with pytest.raises(ValueError, match=r"unit_topk must be an int >= 1, got 0"):
        PromptDistillConfig(unit_topk=0)


# Three units: a short one with one strong token, a long one of middling tokens, one weak with a single spike.
SCORES = torch.tensor([0.0, 0.9, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.95])
UNITS = torch.tensor([0, 0, 0, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5])


@pytest.mark.parametrize(
    "how, topk, expected",
    [("max", 8, [0.9, 0.5, 0.95]), ("mean", 8, [0.3, 0.5, 1.45 / 6]), ("topk_mean", 2, [0.45, 0.5, 0.525])],
)
def test_unit_scores_aggregate_each_units_tokens(how, topk, expected):
    per_unit, unit_of = unit_scores(SCORES, UNITS, how, topk)
    assert torch.allclose(per_unit, torch.tensor(expected))
    assert unit_of.tolist() == [0] * 3 + [1] * 6 + [2] * 6


@pytest.mark.parametrize(
    "how, kept",
    [
        ("max", [9, 10, 11, 12, 13, 14]),  # the spike's unit first
        ("mean", [3, 4, 5, 6, 7, 8]),  # the steady unit first
        ("topk_mean", [9, 10, 11, 12, 13, 14]),
    ],
)
def test_keep_takes_whole_units_in_the_order_of_their_unit_score(how, kept):
    selector = Selector("softmax_mean", 1, how, 2)
    candidates = torch.ones(15, dtype=torch.bool)
    assert selector.keep(SCORES, candidates, 15, 6, UNITS).tolist() == kept


@pytest.mark.parametrize(
    "budget, kept",
    [
        (8, [9, 10, 11, 12, 13, 14, 0, 1]),  # ties: the earliest
        (4, [11, 12, 13, 14]),  # the spike's end, not its start
        (1, [14]),
        (15, list(range(15))),
    ],
)
def test_the_unit_cut_by_the_budget_keeps_its_best_scoring_window(budget, kept):
    selector = Selector("softmax_mean", 1, "max")
    candidates = torch.ones(15, dtype=torch.bool)
    assert selector.keep(SCORES, candidates, 15, budget, UNITS).tolist() == sorted(kept)


def test_a_cut_passage_keeps_its_answer_sentence_wherever_it_lies():
    # Four 10-token passages. The first ranks first; the answer's passage, second, has its answer sentence in its
    # last four tokens, and the budget leaves room for six of its ten: the window ends on the answer rather than
    # starting the passage.
    scores = torch.full((40,), 0.1)
    scores[0:10], scores[3] = 0.8, 1.5
    scores[26:30] = 1.0
    units = torch.arange(40) // 10
    candidates = torch.ones(40, dtype=torch.bool)
    kept = Selector("softmax_mean", 1, "max").keep(scores, candidates, 40, 16, units).tolist()
    assert kept == list(range(10)) + list(range(24, 30))
    # Padding tokens keep their original row numbers: protected rows are never counted against the budget.
    candidates[[5, 35]] = False
    kept = Selector("softmax_mean", 1, "max").keep(scores, candidates, 38, 16, units).tolist()
    assert len(kept) == 18 and {5, 35, 26, 27, 28, 29} <= set(kept)


def test_detrending_ranks_a_candidate_against_its_neighbourhood_not_its_distance():
    # Scores rise toward the question (the end), as early layers' attention does; the first unit holds a token
    # that stands out from its own neighbourhood but is weaker than every token of the last unit.
    scores = torch.linspace(0.1, 1.0, 40)
    scores[2] = 0.3
    units = torch.arange(40) // 8
    candidates = torch.ones(40, dtype=torch.bool)
    assert Selector("softmax_mean", 1).keep(scores, candidates, 40, 8, units).tolist() == list(range(32, 40))
    detrended = Selector("softmax_mean", 1, detrend_window=9)
    assert detrended.keep(scores, candidates, 40, 8, units).tolist() == list(range(8))
    # Off (0) and a window of 1 change nothing; a flat neighbourhood scores 1 everywhere.
    assert torch.equal(Selector("softmax_mean", 1, detrend_window=1).candidate_scores(scores), scores)
    assert torch.allclose(detrended.candidate_scores(torch.full((12,), 0.25)), torch.ones(12))


def test_detrending_needs_positive_scores():
    assert Selector.from_config(PromptDistillConfig(detrend_window=512)).detrend_window == 512
    with pytest.raises(ValueError, match=r"detrend_window divides by mean scores.*not 'logits_mean'"):
        PromptDistillConfig(detrend_window=512, aggregation="logits_mean")
    with pytest.raises(ValueError, match=r"detrend_window must be an int >= 0 \(0 = off\), got 2.5"):
        PromptDistillConfig(detrend_window=2.5)


def test_a_callers_raw_logit_scoring_is_not_detrended_by_the_profile(default_engine):
    assert default_engine.config.detrend_window == 1024  # the shipped profile detrends its softmax scores
    config = default_engine.with_config(PromptDistillConfig(aggregation="logits_mean")).config
    assert (config.aggregation, config.detrend_window) == ("logits_mean", 0)
