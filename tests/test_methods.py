"""Every registered prefill method on every tiny model family: it runs end to end, keeps exactly its resolved budget
of context tokens plus every protected one, equals the unmodified model when nothing is pruned, and resolves every
config field. The random baseline is reproducible by seed, independent of batching, and uniform."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.config import find_profile, resolve_config
from pd_integrations.inputs import PromptInput
from pd_integrations.loading import DEFAULT_MODEL
from pd_integrations.methods import METHOD_CLASSES, METHODS, RandomSelection, method_for

from .conftest import TINY_CONFIGS, random_ids, tiny_model

FAMILIES = list(TINY_CONFIGS)
N = 64  # longer than the tiny sliding windows, so they exclude keys
PRUNING = dict(selection_layers=(1,), budgets=(0.25,), span="token", protect_head=2, tail_tokens=4)


def engine_for(method: str, family: str, tokenizer, **overrides) -> PromptDistillEngine:
    return PromptDistillEngine(
        tiny_model(family), tokenizer, PromptDistillConfig(method=method, **{**PRUNING, **overrides})
    )


def test_the_registry_is_the_one_list_of_methods():
    assert METHODS == tuple(METHOD_CLASSES) == ("promptdistill", "gemfilter", "full", "random")
    assert all(cls.name == name for name, cls in METHOD_CLASSES.items())
    with pytest.raises(ValueError) as error:
        PromptDistillConfig(method="fast")
    assert str(error.value) == f"method must be one of {', '.join(map(repr, METHODS))}, got 'fast'"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("profiled", [False, True], ids=["fallback", "profile"])
@pytest.mark.parametrize(
    "given", [{}, {"selection_layers": (3,)}, {"budgets": (64,)}], ids=["unset", "layers", "budgets"]
)
def test_resolution_fills_every_field(method, profiled, given):
    profile = find_profile(DEFAULT_MODEL, 30) if profiled else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback rule's warning
        config = resolve_config(PromptDistillConfig(method=method, **given), lambda: profile, "m", 30, 9)
    assert [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None] == []
    stages = {"full": 0, "gemfilter": 1}.get(method, 1 if given else 2 if profiled else 1)
    assert len(config.selection_layers) == len(config.budgets) == len(config.heads) == stages
    assert resolve_config(config, lambda: profile, "m", 30, 9) == config  # a resolved config stays as it is


def test_full_resolves_to_no_stages_whatever_was_given():
    config = PromptDistillConfig(method="full", selection_layers=(40,), budgets=(8,), heads=[[99]])
    resolved = resolve_config(config, lambda: None, "m", 4, 4)  # no profile read, no fallback warning
    assert (resolved.selection_layers, resolved.budgets, resolved.heads) == ((), (), ())


@pytest.mark.parametrize("method", [m for m in METHODS if METHOD_CLASSES[m].prunes])
def test_a_selecting_method_refuses_an_empty_schedule(method):
    with pytest.raises(ValueError, match="selection_layers must be one or more"):
        PromptDistillConfig(method=method, selection_layers=())
    with pytest.raises(ValueError, match="budgets must be one or more"):
        PromptDistillConfig(method=method, budgets=())


def test_gemfilter_refuses_two_stages():
    with pytest.raises(ValueError, match="gemfilter selects once"):
        PromptDistillConfig(method="gemfilter", selection_layers=(1, 2))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_its_budget_and_every_protected_token(method, family, tokenizer):
    engine = engine_for(method, family, tokenizer)
    ids = random_ids(N, seed=3)
    row = engine.prefill(input_ids=ids).sequences[0]
    kept, prunable = row.kept_indices.cpu(), row.layout.prunable
    protected = torch.nonzero(~prunable).flatten()
    assert torch.isin(protected, kept).all()
    expected = N if method == "full" else math.ceil(0.25 * int(prunable.sum())) + protected.numel()
    assert kept.numel() == expected
    assert torch.equal(kept, torch.sort(kept).values)  # original order
    result = engine.generate(input_ids=ids, max_new_tokens=3)
    assert result.kept_token_indices == kept.tolist() and len(result.output_token_ids) >= 1
    assert result.selection_layers == (() if method == "full" else (1,))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_the_model_when_nothing_is_pruned(method, family, tokenizer):
    """A budget of all the context leaves every method exact; full attention is exact even with a schedule that
    would prune, since it has no stages."""
    model = tiny_model(family)
    budgets = (4,) if method == "full" else (1.0,)
    engine = PromptDistillEngine(
        model, tokenizer, PromptDistillConfig(method=method, **{**PRUNING, "budgets": budgets})
    )
    ids = random_ids(N, seed=4)
    with torch.inference_mode():
        reference = model(ids[None]).logits[0, -1]
    prefill = engine.prefill(input_ids=ids)
    torch.testing.assert_close(prefill.logits[0], reference, atol=1e-4, rtol=0)
    assert prefill.sequences[0].kept_indices.numel() == N


def random_kept(engine: PromptDistillEngine, seed: int, rows: list[torch.Tensor]) -> list[list[int]]:
    """Each row's kept indices from one batched prefill of the random baseline with `seed`."""
    prepared = [engine._prepare(PromptInput(input_ids=ids)) for ids in rows]
    layouts = [layout for _, layout in prepared]
    method = dataclasses.replace(method_for(engine.config, layouts), seed=seed)
    assert isinstance(method, RandomSelection)
    with torch.inference_mode():
        prefill = method.prefill(engine.runtime, [engine._ids(*p) for p in prepared], layouts)
    return [row.kept_indices.tolist() for row in prefill.sequences]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_random_is_reproducible_by_seed_and_batch_independent(family, tokenizer):
    engine = engine_for("random", family, tokenizer, selection_layers=(1, 2), budgets=(0.5, 0.25))
    rows = [random_ids(N, seed=5), random_ids(N - 20, seed=6)]
    first = random_kept(engine, 0, rows)
    assert random_kept(engine, 0, rows) == first
    assert random_kept(engine, 0, rows[1:]) == first[1:]  # the same tokens alone as in a batch
    assert random_kept(engine, 1, rows) != first
    assert engine.prefill(input_ids=rows[0]).sequences[0].kept_indices.tolist() == first[0]  # seed 0 by default
    # Two stages: the second keeps a subset of the first's rows.
    stage_kept = engine.prefill(input_ids=rows[0]).sequences[0].stage_kept
    assert torch.isin(stage_kept[1], stage_kept[0]).all() and stage_kept[1].numel() < stage_kept[0].numel()


def test_random_keeps_tokens_uniformly_and_ignores_spans(tokenizer):
    """Over 200 seeds each context token is kept about a quarter of the time, anywhere in the context; chunk spans
    would keep whole 8-token chunks, but the baseline keeps scattered tokens."""
    engine = engine_for("random", "llama", tokenizer, span="chunk", chunk_size=8)
    ids = random_ids(N, seed=7)
    layout = engine.prefill(input_ids=ids).sequences[0].layout
    counts = torch.zeros(N)
    for seed in range(200):
        counts[random_kept(engine, seed, [ids])[0]] += 1
    share = counts[layout.prunable] / 200
    budget = math.ceil(0.25 * layout.num_prunable)
    assert abs(float(share.mean()) - budget / layout.num_prunable) < 1e-6
    assert float(share.min()) > 0.1 and float(share.max()) < 0.42
    assert (counts[~layout.prunable] == 200).all()
    kept = torch.zeros(N, dtype=torch.bool)
    kept[random_kept(engine, 0, [ids])[0]] = True
    runs = int((kept[layout.prunable][1:] & ~kept[layout.prunable][:-1]).sum())
    assert runs > 4  # a whole chunk and one window of the next would be at most 2 runs
