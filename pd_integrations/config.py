"""Validated PromptDistill settings and per-model profiles.

A `PromptDistillConfig` may leave its schedule (`selection_layers`, `budgets`) and its scoring fields as `None`;
`resolve_config` fills every one of them, as the config's method says (`methods.registry`): from the model's
profile (calibrated settings, shipped in `profiles/` or written to the cache by `pd-calibrate`), from the GemFilter
paper for `method="gemfilter"`, from a documented fallback rule, and from the package `DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QUERY_SOURCES = ("auto", "last_token")
AGGREGATIONS = ("softmax_mean", "softmax_max", "logits_mean")
SPANS = ("token", "chunk", "sentence", "document", "passage")
CACHE_TRUNCATIONS = (True, False, "after_first_stage")
UNIT_SCORES = ("max", "mean", "topk_mean")

# Scoring of the original papers: the last prompt token alone, raw q·k logits averaged over heads (GemFilter sums,
# which ranks identically), smoothed by avg-pool 5, selected token by token, not detrended.
PAPER_SCORING = {
    "query_source": "last_token",
    "aggregation": "logits_mean",
    "pool_kernel": 5,
    "span": "token",
    "detrend_window": 0,
}

# Used when a model has no profile (see `fallback_schedule`): what the default model's calibration and its checks
# on held-out essays found to carry over, in relative terms: one stage at 17/30 of the depth keeping 30% of the
# context (at least 461 tokens) in 64-token chunks, all heads (there it kept every needle of 48 dev probes, with
# chunks ranked by their 8 best tokens; the rule ranks them by their best token, the package default). Its earlier
# stage, calibrated heads and detrending are the model's own, so they are not carried over.
FALLBACK_DEPTH = 17 / 30
FALLBACK_BUDGET = {"fraction": 0.3, "floor": 461}
FALLBACK_SCORING = {
    "query_source": "auto",
    "aggregation": "softmax_mean",
    "pool_kernel": 1,
    "span": "chunk",
    "chunk_size": 64,
}

SCORING_FIELDS = (
    "query_source",
    "aggregation",
    "pool_kernel",
    "span",
    "chunk_size",
    "heads",
    "unit_score",
    "unit_topk",
    "detrend_window",
)
# Context tokens kept outside the budget, whatever their scores (`layout.plan_layout`).
PROTECTION_FIELDS = ("protect_recent", "protect_structure")
PROFILE_FIELDS = ("selection_layers", "budgets", *SCORING_FIELDS, *PROTECTION_FIELDS)

# What fills the fields that neither the caller, the profile nor the fallback rule sets (resolution ends with it):
# the unit scoring and detrending of `Selector`'s defaults, and the fallback rule's scoring for a method that reads no
# profile. Unset heads become all heads at every stage (`fill_unset`).
DEFAULTS = {
    **FALLBACK_SCORING,
    "unit_score": "max",
    "unit_topk": 8,
    "detrend_window": 0,
    "protect_recent": 0,
    "protect_structure": False,
}

PROFILES_DIR = Path(__file__).parent / "profiles"


def cache_dir() -> Path:
    """The package's cache directory (`PD_INTEGRATIONS_CACHE`, default `~/.cache/pd_integrations`)."""
    return Path(os.environ.get("PD_INTEGRATIONS_CACHE") or Path.home() / ".cache" / "pd_integrations").expanduser()


@dataclass(frozen=True)
class BudgetRule:
    """A length-aware stage budget: of `n` prunable tokens keep `max(floor, min(cap, ceil(fraction * n)))`, never
    more than `n`. In JSON and configs it is written as a dict, e.g. `{"fraction": 0.25, "floor": 256, "cap": 2048}`:
    a quarter of the context, at least 256 tokens (short contexts are not starved) and at most 2048 (long ones
    don't keep growing the cost). `floor` defaults to 0 and `cap` to no cap."""

    fraction: float
    floor: int = 0
    cap: int | None = None

    KEYS = ("fraction", "floor", "cap")

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"budgets rule field 'fraction' must be a number in (0, 1], got {self.fraction!r}")
        if not (_is_int(self.floor) and self.floor >= 0):
            raise ValueError(f"budgets rule field 'floor' must be an int >= 0, got {self.floor!r}")
        if self.cap is not None and not (_is_int(self.cap) and self.cap >= 1):
            raise ValueError(f"budgets rule field 'cap' must be an int >= 1 or null (no cap), got {self.cap!r}")
        if self.cap is not None and self.floor > self.cap:
            raise ValueError(f"budgets rule needs floor <= cap, got floor={self.floor} and cap={self.cap}")
        object.__setattr__(self, "fraction", float(self.fraction))

    @classmethod
    def parse(cls, value) -> BudgetRule:
        """A rule from a `BudgetRule` or a dict with the keys in `KEYS` (`fraction` required); raises `ValueError`
        naming an unknown or missing key."""
        if isinstance(value, BudgetRule):
            return value
        unknown = set(value) - set(cls.KEYS)
        if unknown or "fraction" not in value:
            raise ValueError(
                f"budgets rules are dicts with the keys 'fraction' (required), 'floor' and 'cap', e.g. "
                f"{{'fraction': 0.25, 'floor': 256, 'cap': 2048}}, got {dict(value)!r}"
            )
        return cls(**value)

    def resolve(self, n: int) -> int:
        """Tokens kept of `n` prunable ones."""
        kept = max(self.floor, math.ceil(self.fraction * n))
        return min(n, kept if self.cap is None else min(self.cap, kept))

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "floor": self.floor, "cap": self.cap}

    def __str__(self) -> str:
        cap = "" if self.cap is None else f"min({self.cap}, "
        return f"max({self.floor}, {cap}{self.fraction:g}n{')' if cap else ''})"


def resolve_budget(budget: int | float | BudgetRule, n: int) -> int:
    """Tokens a stage budget keeps of `n` prunable tokens: an int as given, a fraction of `n` rounded up, a rule
    resolved (see `BudgetRule`)."""
    if isinstance(budget, BudgetRule):
        return budget.resolve(n)
    return budget if isinstance(budget, int) else math.ceil(budget * n)


def budget_to_json(budget):
    """A stage budget as profiles store it: numbers as they are, rules (or rule dicts) as full rule dicts."""
    return BudgetRule.parse(budget).to_json() if isinstance(budget, (BudgetRule, dict)) else budget


@dataclass(frozen=True)
class PromptDistillConfig:
    """How a prompt is distilled during prefill: a validated, frozen config.

    Fields left `None` are filled per model by `resolve_config`. Details and ranges: docs/design.md#configuration.

    Args:
        method: one of `methods.registry.METHODS` ("promptdistill", "gemfilter", "full", "random").
        selection_layers: strictly increasing decoder-layer indices at which tokens are selected (not the last).
        budgets: prunable tokens kept per stage: ints, fractions in (0, 1] or `BudgetRule`s; non-increasing.
        pool_kernel: odd avg-pool width smoothing token scores before selection (1 = none).
        cache_truncation: True, "after_first_stage" or False: which earlier layers' KV is cut to the kept tokens.
        query_source: "auto" (the question span) or "last_token" (the paper) seeds selection.
        tail_tokens: seed and protected tail length when no query span is known.
        protect_head: leading tokens always kept (attention sinks).
        protect_recent: the last context tokens always kept, a local window before the question (0 = none).
        protect_structure: whether context tokens that end a line or a sentence are always kept.
        aggregation: "softmax_mean", "softmax_max" or "logits_mean" (the paper): how scores combine.
        span: "token", "chunk", "sentence", "passage" or "document": the unit kept whole.
        chunk_size: tokens per chunk.
        heads: per selection layer, the query heads that score (None = all heads).
        unit_score: "max", "mean" or "topk_mean": how a span unit is ranked from its tokens' scores.
        unit_topk: tokens averaged per unit by "topk_mean".
        detrend_window: candidates around each whose mean score it is ranked over (0 = off; softmax only).
        max_probe_tokens: longest `query` accepted as a transient probe.
        context_min_tokens: without `documents=`, the fewest tokens a message needs to be the retrieved context.
    """

    method: str = "promptdistill"
    selection_layers: tuple[int, ...] | None = None
    budgets: tuple[int | float, ...] | None = None
    pool_kernel: int | None = None
    cache_truncation: bool | str = True
    query_source: str | None = None
    tail_tokens: int = 16
    protect_head: int = 4
    protect_recent: int | None = None
    protect_structure: bool | None = None
    aggregation: str | None = None
    span: str | None = None
    chunk_size: int | None = None
    heads: tuple[tuple[int, ...] | None, ...] | None = None
    unit_score: str | None = None
    unit_topk: int | None = None
    detrend_window: int | None = None
    max_probe_tokens: int = 256
    context_min_tokens: int = 256

    def __post_init__(self):
        # Lists from JSON or users become tuples, so configs stay hashable and comparable; a single number is one
        # stage (`budgets=256` means `(256,)`).
        for name in ("selection_layers", "budgets"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value) if isinstance(value, (list, range)) else (value,))
        if self.budgets is not None and any(isinstance(b, dict) for b in self.budgets):
            object.__setattr__(
                self, "budgets", tuple(BudgetRule.parse(b) if isinstance(b, dict) else b for b in self.budgets)
            )
        if self.heads is not None:
            if not isinstance(self.heads, (list, tuple)) or not all(
                h is None or isinstance(h, (list, tuple, range)) for h in self.heads
            ):
                raise ValueError(
                    f"heads must be a list with one entry (a list of head indices, or None for all "
                    f"heads) per selection layer, e.g. [[0, 2, 7]], got {self.heads!r}"
                )
            object.__setattr__(self, "heads", tuple(None if h is None else tuple(h) for h in self.heads))
        self._validate()

    @classmethod
    def check_field(cls, name: str, value):
        """`value` as the field `name` stores it (a single number becomes a one-stage tuple, lists become tuples),
        after the checks that need no other field; raises `ValueError` naming the field and its allowed values.
        Adapters use it for their shortcuts (`ChatPromptDistill(budgets=256)`)."""
        return getattr(cls(**{name: value}), name)

    def truncated_from_layer(self) -> int | None:
        """The first layer whose KV cache truncation gathers (None: no truncation); see `cache_truncation`."""
        if self.cache_truncation is False:
            return None
        if self.cache_truncation == "after_first_stage":
            return self.selection_layers[0] + 1
        return 0

    def _validate(self) -> None:
        method = _method_class(self.method)
        self._check_choices()
        self._check_ints()
        self._check_schedule()
        self._check_heads()
        method.check_config(self)

    def _check_choices(self) -> None:
        _check_choice("query_source", self.query_source, QUERY_SOURCES, optional=True)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS, optional=True)
        _check_choice("span", self.span, SPANS, optional=True)
        _check_choice("unit_score", self.unit_score, UNIT_SCORES, optional=True)
        if not any(
            self.cache_truncation is c or self.cache_truncation == c and isinstance(c, str) for c in CACHE_TRUNCATIONS
        ):
            raise ValueError(
                f"cache_truncation must be True, False or 'after_first_stage', got {self.cache_truncation!r}"
            )

    def _check_ints(self) -> None:
        if self.unit_topk is not None and not (_is_int(self.unit_topk) and self.unit_topk >= 1):
            raise ValueError(f"unit_topk must be an int >= 1, got {self.unit_topk!r}")
        if self.protect_recent is not None and not (_is_int(self.protect_recent) and self.protect_recent >= 0):
            raise ValueError(f"protect_recent must be an int >= 0 (0 = none), got {self.protect_recent!r}")
        if self.protect_structure is not None and not isinstance(self.protect_structure, bool):
            raise ValueError(f"protect_structure must be True or False, got {self.protect_structure!r}")
        if self.detrend_window is not None and not (_is_int(self.detrend_window) and self.detrend_window >= 0):
            raise ValueError(f"detrend_window must be an int >= 0 (0 = off), got {self.detrend_window!r}")
        if self.pool_kernel is not None and not (
            _is_int(self.pool_kernel) and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1
        ):
            raise ValueError(f"pool_kernel must be an odd int >= 1, got {self.pool_kernel!r}")
        for name, minimum in (
            ("tail_tokens", 1),
            ("protect_head", 0),
            ("chunk_size", 1),
            ("max_probe_tokens", 1),
            ("context_min_tokens", 1),
        ):
            value = getattr(self, name)
            if not (_is_int(value) and value >= minimum or name == "chunk_size" and value is None):
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if self.detrend_window and self.aggregation == "logits_mean":
            raise ValueError(
                "detrend_window divides by mean scores, which needs positive scores: use aggregation "
                "'softmax_mean' or 'softmax_max' with it, not 'logits_mean'"
            )

    def _check_schedule(self) -> None:
        # An empty schedule is the method's to refuse (`PrefillMethod.check_config`): full attention has no stages.
        layers, budgets = self.selection_layers, self.budgets
        if layers is not None:
            if not all(_is_int(i) and i >= 0 for i in layers):
                raise ValueError(f"selection_layers must be one or more ints >= 0, got {layers!r}")
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"selection_layers must be strictly increasing, got {layers!r}")
        if budgets is not None:
            _check_budgets(budgets)
        if layers is not None and budgets is not None and len(layers) != len(budgets):
            raise ValueError(f"selection_layers and budgets need one entry per stage, got {layers!r} and {budgets!r}")

    def _check_heads(self) -> None:
        for heads in self.heads or ():
            if heads is not None and (not heads or not all(_is_int(h) and h >= 0 for h in heads)):
                raise ValueError(f"heads entries must be None or non-empty lists of ints >= 0, got {heads!r}")
        if (
            self.heads is not None
            and self.selection_layers is not None
            and len(self.heads) != len(self.selection_layers)
        ):
            raise ValueError(f"heads needs one entry (a head list or None) per selection layer, got {self.heads!r}")

    def validate_for(self, num_layers: int, num_heads: int) -> None:
        """Raise `ValueError` when the schedule does not fit a model with `num_layers` layers and `num_heads` heads."""
        for i in self.selection_layers or ():
            if not 0 <= i < num_layers - 1:
                raise ValueError(
                    f"selection_layers entries must be in [0, {num_layers - 2}] for this {num_layers}-layer model "
                    f"(the last layer cannot select), got {i}"
                )
        for heads in self.heads or ():
            if heads is not None and (not heads or not all(_is_int(h) and 0 <= h < num_heads for h in heads)):
                raise ValueError(
                    f"heads entries must be non-empty lists of ints in [0, {num_heads - 1}], got {heads!r}"
                )

    def replace(self, **changes) -> PromptDistillConfig:
        """A copy with `changes` applied and validated."""
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _method_class(name):
    """The registered method class `name` names; raises `ValueError` listing the registered names."""
    # Imported on use: the method modules import this one, and a config is built only after both have loaded.
    from .methods.registry import method_class

    return method_class(name)


def _check_budgets(budgets: tuple) -> None:
    """Raise `ValueError` unless `budgets` are stage budgets of one kind, non-increasing across stages (empty ones
    are the method's to refuse)."""
    for b in budgets:
        if isinstance(b, BudgetRule):
            continue
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budgets must be ints >= 1 or fractions in (0, 1], got {b!r}")
        if _is_int(b) and b < 1 or isinstance(b, float) and not 0 < b <= 1:
            raise ValueError(f"budgets must be ints >= 1 or fractions in (0, 1], got {b!r}")
    if any(type(b) is not type(budgets[0]) and not (_is_int(b) and _is_int(budgets[0])) for b in budgets):
        raise ValueError(f"budgets must be all ints or all fractions (or all rules), got {budgets!r}")
    if budgets and isinstance(budgets[0], BudgetRule):
        for key in BudgetRule.KEYS:
            values = [math.inf if getattr(b, key) is None else getattr(b, key) for b in budgets]
            if any(b > a for a, b in zip(values, values[1:])):
                raise ValueError(
                    f"budgets rules must be non-increasing across stages in {key!r}, "
                    f"got {[budget_to_json(b) for b in budgets]!r}"
                )
    elif any(b > a for a, b in zip(budgets, budgets[1:])):
        raise ValueError(f"budgets must be non-increasing across stages, got {budgets!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...], optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True)
class Profile:
    """Calibrated PromptDistill settings for one model."""

    model: str
    num_hidden_layers: int
    settings: dict = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_json(cls, path: Path) -> Profile:
        """Read and check a profile file; raises `ValueError` for a corrupt or incomplete one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"profile {path} is not readable JSON: {error}") from error
        missing = {"model", "num_hidden_layers", "settings"} - set(data)
        if missing:
            raise ValueError(f"profile {path} lacks {sorted(missing)}")
        unknown = set(data["settings"]) - set(PROFILE_FIELDS)
        if unknown:
            raise ValueError(f"profile {path} has unknown settings {sorted(unknown)}; allowed: {PROFILE_FIELDS}")
        profile = cls(data["model"], data["num_hidden_layers"], data["settings"], str(path))
        try:
            profile.config()
        except ValueError as error:
            raise ValueError(f"profile {path} is invalid: {error}") from error
        return profile

    def to_json(self, path: Path, extra: dict | None = None) -> None:
        """Write the profile (plus `extra` fields such as calibration measurements) as JSON."""
        settings = {**self.settings}
        if settings.get("budgets") is not None:
            settings["budgets"] = [budget_to_json(b) for b in settings["budgets"]]
        data = {"model": self.model, "num_hidden_layers": self.num_hidden_layers, "settings": settings}
        text = json.dumps({**data, **(extra or {})}, indent=2)
        # Lists of scalars on one line keep per-layer measurements readable.
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        Path(path).write_text(text + "\n")

    def config(self) -> PromptDistillConfig:
        """The profile's settings as a config."""
        return PromptDistillConfig(**self.settings)


def profile_key(model_name: str) -> str:
    """File stem under which a model's profile is stored: its name's last path part, lower-cased."""
    return model_name.rstrip("/").split("/")[-1].lower()


def find_profile(model_name: str, num_hidden_layers: int) -> Profile | None:
    """The model's profile: a calibrated one in the cache first, then a shipped one; `None` when there is none.

    Raises `ValueError` when the profile found is corrupt or was made for a different layer count.
    """
    for directory in (cache_dir() / "profiles", PROFILES_DIR):
        path = directory / f"{profile_key(model_name)}.json"
        if path.is_file():
            profile = Profile.from_json(path)
            if profile.num_hidden_layers != num_hidden_layers:
                raise ValueError(
                    f"profile {path} was calibrated for {profile.num_hidden_layers} layers but the model has "
                    f"{num_hidden_layers}; delete it or re-run pd-calibrate"
                )
            return profile
    return None


def fallback_layer(num_hidden_layers: int) -> int:
    """The fallback rule's selection layer: `FALLBACK_DEPTH` of the way down, never the last layer."""
    return min(int(num_hidden_layers * FALLBACK_DEPTH), num_hidden_layers - 2)


def fallback_schedule(num_hidden_layers: int) -> dict:
    """The documented rule for a model without a profile: select once at `fallback_layer`, keeping 30% of the
    retrieved context (at least 461 tokens) in 64-token chunks, seeded by the question span, scored by all heads.
    Calibrate (`pd-calibrate`) to do better."""
    return {"selection_layers": (fallback_layer(num_hidden_layers),), "budgets": (FALLBACK_BUDGET,), **FALLBACK_SCORING}


def _fit_stages(settings: dict, config: PromptDistillConfig) -> dict:
    """The profile's `settings` with its stages cut to the caller's stage count when the caller set only budgets or
    only selection layers: the profile's last stages (layers, budgets and heads) are kept, since the last stage is
    where its selection is sharpest. `budgets=256` on a two-stage profile selects once, at its second layer."""
    given = config.budgets if config.selection_layers is None else config.selection_layers
    layers = settings.get("selection_layers")
    if (config.selection_layers is None) == (config.budgets is None) or not layers or len(layers) <= len(given):
        return settings
    k = len(given)
    fitted = {**settings, "selection_layers": list(layers)[-k:], "budgets": list(settings["budgets"])[-k:]}
    if settings.get("heads") is not None:
        fitted["heads"] = list(settings["heads"])[-k:]
    return fitted


def fill_unset(config: PromptDistillConfig, sources: list[dict]) -> PromptDistillConfig:
    """`config` with each unset field taken from the first of the settings dicts `sources`, then `DEFAULTS`, that
    sets it (to something other than None); unset heads become all heads (None) at every stage. Method classes
    call it from their `resolve` hook.

    Raises:
        ValueError: the filled config does not validate (e.g. a stage count that does not match).
    """
    fill = {}
    for source in reversed([*sources, DEFAULTS]):
        fill.update({k: v for k, v in source.items() if getattr(config, k) is None and v is not None})
    if config.heads is None and "heads" not in fill:
        fill["heads"] = (None,) * len(fill.get("selection_layers", config.selection_layers))
    return config.replace(**fill)


def resolve_config(
    config: PromptDistillConfig | None,
    load_profile: Callable[[], Profile | None],
    model_name: str,
    num_hidden_layers: int,
    num_heads: int,
) -> PromptDistillConfig:
    """Fill every unset field of `config` for this model and validate the result against its shape.

    The config's method says where unset fields come from (`PrefillMethod.resolve`); for a method that prunes, the
    sources are the model's profile (`load_profile()`, read only for such a method) and then the fallback rule (with
    a warning when the schedule itself comes from it); `DEFAULTS` fill what is left.

    Raises:
        ValueError: settings that don't fit the model, or a bad profile.
    """
    config = config or PromptDistillConfig()
    method = _method_class(config.method)
    sources = _pruning_sources(config, load_profile, model_name, num_hidden_layers) if method.prunes else []
    config = method.resolve(config, sources)
    config.validate_for(num_hidden_layers, num_heads)
    return config


def _pruning_sources(
    config: PromptDistillConfig, load_profile: Callable[[], Profile | None], model_name: str, num_hidden_layers: int
) -> list[dict]:
    """The settings that fill a pruning method's unset fields, first source first: the profile's (fitted to the
    caller's stage count), then the fallback rule's."""
    profile = load_profile()
    if profile is None and (config.selection_layers is None or config.budgets is None):
        warnings.warn(
            f"no PromptDistill profile for {model_name!r}: using the fallback rule (layer "
            f"{fallback_layer(num_hidden_layers)}, 30% of the context with a floor of 461 tokens, 64-token chunks). "
            f"Run `pd-calibrate --model {model_name}` to measure better settings.",
            stacklevel=4,
        )
    sources = [_fit_stages(profile.settings, config) if profile else {}, fallback_schedule(num_hidden_layers)]
    if config.selection_layers is not None:
        # Head subsets were calibrated for the profile's layers, not for layers chosen by the caller.
        sources = [{k: v for k, v in source.items() if k != "heads"} for source in sources]
    if config.aggregation == "logits_mean":
        # Raw logits can be negative: a profile's detrending belongs to its softmax scores, not to the caller's.
        sources = [{"detrend_window": 0}, *sources]
    return sources
