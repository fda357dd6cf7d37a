"""The one cost model gives the floats the two it replaced gave (`Schedule.cost`'s layer-rows and
`predicted_prefill_ratio`'s attention-aware model), and `predicted_ratio_of` the same per method (each method's
`PrefillMethod.cost`)."""

from __future__ import annotations

import pytest

from pd_integrations.calibration.cost import Schedule, predicted_prefill_ratio, predicted_ratio_of
from pd_integrations.config import BudgetRule, PromptDistillConfig

LENGTHS = (300, 1000, 4000, 8192)
# Per schedule, computed by calibrate.py before the refactor: Schedule.cost(30, n) for n in LENGTHS and
# Schedule.cost(24, 2000, 60); predicted_prefill_ratio(s, 30, n) for n in LENGTHS and (s, 24, 2000, 20, 1000.0).
SCHEDULES = [
    (
        Schedule(((7, 512, None),), "token", None),
        [1.0, 0.6568, 0.3642, 0.3142903645833333, 0.524],
        [1.0, 0.6540740952380952, 0.329732992248062, 0.28736939469004064, 0.44558533333333333],
    ),
    (
        Schedule(((3, 1024, None), (9, 256, (1, 2))), "chunk", 32),
        [0.9466666666666667, 0.5173333333333333, 0.23153333333333334, 0.18128255208333333, 0.3943333333333333],
        [1.0, 0.5182685714285714, 0.199261488372093, 0.1549755116316187, 0.3117816666666667],
    ),
    (
        Schedule(((7, BudgetRule(0.5), (7,)), (17, BudgetRule(0.25), None)), "passage", None, "topk_mean", 1024),
        [0.5644444444444444, 0.5426666666666666, 0.5356666666666666, 0.53447265625, 0.6160416666666667],
        [0.6158911564625851, 0.5316505952380952, 0.4656756782945736, 0.43466162348578863, 0.53214765625],
    ),
    (
        Schedule(((5, BudgetRule(0.25, 256, 2048), None),), "sentence", None),
        [0.936, 0.4208, 0.403, 0.40146484375, 0.454375],
        [1.0, 0.4219222857142857, 0.33718662790697673, 0.3069428234565549, 0.37142734375],
    ),
    (
        Schedule(((2, BudgetRule(0.4), None), (11, 3000, None), (20, BudgetRule(0.1), None)), "document", None),
        [0.412, 0.3826, 0.37315, 0.36173095703125, 0.454375],
        [0.4831281632653061, 0.37447364285714285, 0.2979538488372093, 0.2558504802424733, 0.3466185625],
    ),
]
PROMPTS = ((8060, 60), (1000, 20), (300, 290))
# predicted_ratio_of(config, 30, n, protected) for (n, protected) in PROMPTS, from calibrate.py before the refactor.
CONFIGS = [
    (
        PromptDistillConfig(method="gemfilter", selection_layers=(13,), budgets=(1024,), heads=(None,)),
        [0.5270496552318904, 1.4666666666666666, 1.4666666666666666],
    ),
    (
        PromptDistillConfig(method="gemfilter", selection_layers=(13,), budgets=(BudgetRule(0.3),), heads=(None,)),
        [0.636871175504412, 0.7422016666666666, 1.4419380952380951],
    ),
    (
        PromptDistillConfig(
            selection_layers=(7, 17),
            budgets=(BudgetRule(0.5), BudgetRule(0.25)),
            heads=((7,), None),
            span="passage",
            unit_score="topk_mean",
            detrend_window=1024,
        ),
        [0.43530420215942306, 0.5138791666666667, 0.9842185487528344],
    ),
    (
        PromptDistillConfig(selection_layers=(10,), budgets=(2048,), heads=(None,)),
        [0.45443285939968403, 1.0, 1.0],
    ),
    (PromptDistillConfig(method="full"), [None, None, None]),
]


@pytest.mark.parametrize("schedule, layer_rows, predicted", SCHEDULES)
def test_the_cost_model_gives_the_floats_of_the_two_it_replaced(schedule, layer_rows, predicted):
    assert [schedule.cost(30, n) for n in LENGTHS] + [schedule.cost(24, 2000, 60)] == layer_rows
    ratios = [predicted_prefill_ratio(schedule, 30, n) for n in LENGTHS]
    assert ratios + [predicted_prefill_ratio(schedule, 24, 2000, 20, 1000.0)] == predicted


@pytest.mark.parametrize("config, expected", CONFIGS)
def test_predicted_ratio_of_gives_the_floats_it_gave_per_method(config, expected):
    assert [predicted_ratio_of(config, 30, n, protected) for n, protected in PROMPTS] == expected


@pytest.mark.parametrize("config, expected", [c for c in CONFIGS if c[0].method == "promptdistill"])
def test_the_random_baseline_is_priced_as_promptdistills_budgets(config, expected):
    assert [predicted_ratio_of(config.replace(method="random"), 30, n, p) for n, p in PROMPTS] == expected
