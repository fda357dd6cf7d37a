"""What the LangChain and LlamaIndex adapters' settings share: `config` with every `PromptDistillConfig` field
as a shortcut argument, checked as the config checks it, unknown arguments rejected with the closest name, and the
same checks for a call's own config fields (`invoke(..., method="full")`), for attribute assignment and for
`model_copy(update=...)`.

Pydantic (and LangChain's and LlamaIndex's base classes) would drop unknown arguments silently, so that `budget=`
or `max_token=` ran with the defaults; here anything that is not a field (the framework's own included), an alias
or a listed extra is a `TypeError`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from .call_options import CallOptions
from .config import PromptDistillConfig
from .inputs import SamplingParams, check_sampling_field, sampling_params, unexpected

CONFIG_SHORTCUTS = tuple(f.name for f in dataclasses.fields(PromptDistillConfig))


def config_field_definitions() -> dict[str, Any]:
    """`create_model` definitions of every `PromptDistillConfig` field, derived from the dataclass so that a new
    field needs no second declaration: each None by default (unset: the config's, or the profile's, value) and
    typed `Any`, since `ConfigFields` checks it as the config does rather than by pydantic's type coercion."""
    return {
        name: (
            Any,
            Field(
                None,
                description=f"PromptDistillConfig.{name}; a single value is one stage."
                if name in ("selection_layers", "budgets")
                else f"PromptDistillConfig.{name}.",
            ),
        )
        for name in CONFIG_SHORTCUTS
    }


class ConfigFields(create_model("ConfigFieldDefinitions", **config_field_definitions())):
    """Every `PromptDistillConfig` field as a field of its own, checked and normalised as the config does it
    (`budgets=256` is `(256,)`; `budgets=0` is a `ValueError` naming the allowed values). The adapters' settings
    (`DistillSettings`) and pd-serve's `promptdistill` request field both build on it."""

    @field_validator(*CONFIG_SHORTCUTS, mode="before")
    @classmethod
    def _check_config_field(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            return None if value is None else PromptDistillConfig.check_field(info.field_name, value)
        except TypeError as error:  # pydantic reports only a ValueError as a validation error naming the field
            raise ValueError(str(error)) from None

    def config_values(self) -> dict[str, Any]:
        """The `PromptDistillConfig` fields that are set (not None), as the config stores them."""
        return {name: getattr(self, name) for name in CONFIG_SHORTCUTS if getattr(self, name) is not None}


class DistillSettings(ConfigFields):
    """Mixed in before an adapter's framework base class (through `sampling_settings`, which adds the sampling
    fields). Subclasses set `ALIASES` (other frameworks' names of their fields), `CALL_OPTIONS` (what a call may
    pass) and `CALL_HINT` (to point a per-call option given to the constructor to its place), `ROUTING_FLAGS`
    (call arguments the framework passes that mean nothing here) and `EXTRA_ARGUMENTS` (accepted though not
    fields)."""

    ALIASES: ClassVar[dict[str, str]] = {}
    CALL_OPTIONS: ClassVar[tuple[str, ...]] = ()
    CALL_HINT: ClassVar[str] = "a per-call option"
    ROUTING_FLAGS: ClassVar[tuple[str, ...]] = ()
    EXTRA_ARGUMENTS: ClassVar[tuple[str, ...]] = ()
    SAMPLING_FIELDS: ClassVar[dict[str, str]] = {}  # own field -> `SamplingParams` field; set by sampling_settings

    config: PromptDistillConfig | None = Field(
        default=None,
        description="PromptDistill settings (a PromptDistillConfig or a dict of its fields); unset "
        "fields come from the model's profile. Each field is also an argument of its own, "
        "which overrides config's.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or info.field_name is not None:  # an assignment: `data` is the instance's
            return data
        data = dict(data)
        for alias, name in cls.ALIASES.items():
            if alias in data:
                if name in data:
                    raise TypeError(f"{cls.__name__} got both {name}= and {alias}= (the same setting); pass one")
                data[name] = data.pop(alias)
        allowed = {*cls.ALIASES, *cls.EXTRA_ARGUMENTS}
        for name, field in cls.model_fields.items():
            allowed.add(name)
            allowed.update(alias for alias in (field.alias, field.validation_alias) if isinstance(alias, str))
        unknown = [name for name in data if name not in allowed]
        if unknown:
            hints = {name: cls.CALL_HINT.format(name=name) for name in unknown if name in cls.CALL_OPTIONS}
            raise unexpected(cls.__name__, unknown, allowed, hints)
        return data

    @field_validator("config", mode="before")
    @classmethod
    def _config_from_dict(cls, value: Any) -> Any:
        # A dict goes through PromptDistillConfig itself, so bad fields get its messages (naming the allowed values).
        if not isinstance(value, dict):
            return value
        unknown = [name for name in value if name not in CONFIG_SHORTCUTS]
        if unknown:
            raise unexpected("PromptDistillConfig", unknown, CONFIG_SHORTCUTS)
        return PromptDistillConfig(**value)

    @field_validator("*", mode="before")
    @classmethod
    def _check_sampling(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked and normalised as `SamplingParams` does it, so that errors name the allowed values.
        name = cls.SAMPLING_FIELDS.get(info.field_name)
        try:
            return value if name is None else check_sampling_field(name, value, label=info.field_name)
        except TypeError as error:  # pydantic reports only a ValueError as a validation error naming the field
            raise ValueError(str(error)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # Pydantic assigns unchecked by default, which left a cached config stale (`llm.method = "full"` still
        # pruned); our own settings go through validation, which also re-runs the model's after-validators.
        if name in _own_settings(type(self)):
            type(self).__pydantic_validator__.validate_assignment(self, name, value)
        else:
            super().__setattr__(name, value)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """A copy with `update` applied through validation, as at construction (pydantic's own `model_copy`
        skips it, so a changed `method` or `budgets` would be ignored). Raises `TypeError` for an unknown name and
        `ValueError`/`ValidationError` for a bad value."""
        copy = super().model_copy(deep=deep)
        for name, value in (update or {}).items():
            name = self.ALIASES.get(name, name)
            if name not in type(self).model_fields:
                raise unexpected(f"{type(self).__name__}.model_copy update", [name], type(self).model_fields)
            setattr(copy, name, value)
        return copy

    def call_config(self, overrides: dict[str, Any]) -> PromptDistillConfig | None:
        """The config of one call: this instance's (`distill_config`) with a call's `PromptDistillConfig` fields
        applied (None restores the model profile's value), checked as the constructor checks them.

        Raises `ValueError` naming the field and its allowed values."""
        if not overrides:
            return self.distill_config()
        checked = {
            name: None if value is None else PromptDistillConfig.check_field(name, value)
            for name, value in overrides.items()
        }
        return (self.distill_config() or PromptDistillConfig()).replace(**checked)

    def resolve_call(
        self, kwargs: dict[str, Any], *, template: dict[str, Any] | None = None, stop: list[str] | None = None
    ) -> CallOptions:
        """One call's options: the query channel (`pd_query`), the retrieved documents (`pd_documents`:
        `Document`s, nodes or texts), sampling overrides (under this class's names, `stop` a call's own stop
        strings) and `PromptDistillConfig` fields, each checked as the constructor checks them. `template` holds
        the question and documents a prompt template tagged; a call's own `pd_query`/`pd_documents` win.

        Raises `TypeError` for an unknown option (naming the closest, or pointing a constructor setting to the
        constructor) or both names of one setting; `ValueError` naming a bad value."""
        kwargs, labels = self._known_call_options(kwargs)
        values = {name: kwargs.get(own, getattr(self, own)) for own, name in self.SAMPLING_FIELDS.items()}
        if stop:
            values["stop"] = stop
        template = template or {}
        query = kwargs.get("pd_query", template.get("query"))
        if "pd_query" in kwargs and query is not None and (not isinstance(query, str) or not query.strip()):
            raise ValueError(f"pd_query must be a non-empty str, got {query!r}")
        from_template = "pd_documents" not in kwargs and template.get("documents") is not None
        return CallOptions(
            query,
            template.get("documents") if from_template else kwargs.get("pd_documents"),
            sampling_params(values, labels),
            self.call_config({name: kwargs[name] for name in CONFIG_SHORTCUTS if name in kwargs}),
            from_template,
        )

    def _known_call_options(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """`kwargs` with the other framework's names as this class's, and the `SamplingParams` fields' labels in
        errors (a field given by another name is named by both); `TypeError` for an unknown option or both names
        of one setting."""
        owner = f"{type(self).__name__} call"
        if unknown := [name for name in kwargs if name not in {*self.CALL_OPTIONS, *self.ROUTING_FLAGS}]:
            hints = {
                name: f"set it when constructing the model: {type(self).__name__}({name}=...)"
                for name in unknown
                if name in type(self).model_fields
            }
            raise unexpected(owner, unknown, self.CALL_OPTIONS, hints)
        labels = {name: own for own, name in self.SAMPLING_FIELDS.items()}
        for alias, own in self.ALIASES.items():
            if alias in kwargs and alias in self.CALL_OPTIONS:
                if own in kwargs:
                    raise TypeError(f"{owner} got both {own}= and {alias}= (the same setting); pass one")
                kwargs = {**{k: v for k, v in kwargs.items() if k != alias}, own: kwargs[alias]}
                labels[self.SAMPLING_FIELDS[own]] = f"{alias} ({own})"
        return kwargs, labels

    def distill_config(self) -> PromptDistillConfig | None:
        """`config` with the shortcuts applied (before profile resolution), or None when neither is set.
        Raises `ValueError` for invalid settings."""
        shortcuts = self.config_values()
        if self.config is None and not shortcuts:
            return None
        return (self.config or PromptDistillConfig()).replace(**shortcuts)


def sampling_fields(fields: dict[str, str], *, optional: bool = False) -> dict[str, Any]:
    """`create_model` definitions of the `SamplingParams` fields `fields` names (own name -> its field), with
    its types, defaults and docs; `optional`: None by default (unset), for request models."""
    hints = typing.get_type_hints(SamplingParams)
    params = {field.name: field for field in dataclasses.fields(SamplingParams)}
    return {
        own: (
            hints[name] | None if optional else hints[name],
            Field(None if optional else params[name].default, description=params[name].metadata["doc"]),
        )
        for own, name in fields.items()
    }


def sampling_settings(fields: dict[str, str]) -> type[DistillSettings]:
    """`DistillSettings` with the `SamplingParams` fields that `fields` names (own name -> its field) as settings,
    checked as `SamplingParams` checks them."""
    settings = create_model("SamplingSettings", __base__=DistillSettings, **sampling_fields(fields))
    settings.SAMPLING_FIELDS = dict(fields)
    return settings


@functools.cache
def _own_settings(cls: type[DistillSettings]) -> frozenset[str]:
    """The fields `DistillSettings` and the adapter classes declare (not the framework base class's)."""
    declared = {
        name
        for klass in cls.__mro__
        if issubclass(klass, DistillSettings)
        for name in klass.__dict__.get("__annotations__", {})
        if name in cls.model_fields
    }
    return frozenset(declared | set(CONFIG_SHORTCUTS))
