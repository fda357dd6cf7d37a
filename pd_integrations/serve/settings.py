"""What `pd-serve` is told, declared once: `ServerSettings`, each field made with `setting(...)`, which carries its
help text and how a command-line or `key=value` string becomes its value.

`pd-serve`'s options (`add_arguments`, `settings_from_namespace`) and the keys of the Ray Serve builder
(`parse_setting`, used by `ray_app.build`) are generated from these fields, so a field added here is settable from
both; `ServerSettings.__post_init__` is the one place values are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import PromptDistillEngine
from ..loading import DEFAULT_MODEL, QUANTIZATIONS, DeviceUnavailableError, resolve_device, resolve_dtype
from ..tools import TOOL_FORMATS

API_KEY_ENVIRONMENT = "PD_SERVE_API_KEY"


def _origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins as a tuple, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def setting(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    kind: str = "a non-empty string",
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    flag: str | None = None,
    environment: str | None = None,
) -> Any:
    """A `ServerSettings` field with what the command line, the Ray builder and the checks need to know about it.

    Args:
        default: the value when nothing sets it.
        help: `pd-serve --help`'s text (argparse's `%(default)s` allowed).
        parse: turns one command-line or `key=value` string into the value; a tuple makes the option repeatable.
        kind: what a valid value is, in words, for errors.
        choices: the allowed values (None is also allowed when `default` is None).
        minimum: the smallest allowed int (None is also allowed when `default` is None).
        flag: the option's spelling when it is not `--` and the name with dashes.
        environment: a variable that, when set, is the command line's default.

    Returns:
        A `dataclasses.field` carrying these as its metadata.
    """
    metadata = {
        "help": help,
        "parse": parse,
        "kind": kind,
        "choices": choices,
        "minimum": minimum,
        "flag": flag,
        "environment": environment,
    }
    return dataclasses.field(default=default, metadata=metadata)


_INT = {"parse": int, "kind": "an int >= 1", "minimum": 1}
_OPTIONAL_INT = {"parse": int, "kind": "None or an int >= 1", "minimum": 1}


@dataclass(frozen=True)
class ServerSettings:
    """What `pd-serve` is told: the model and how to load it, and the server's limits.

    `api_key` None serves without authentication; `cors_origins` empty sends no CORS headers. The scheduler
    fields set the engine's (`engine.configure_scheduler`): rows decoded together, and the prompts and KV cache
    it refuses; None keeps the engine's own. `tool_format` is how requests' tools reach the model (see
    `pd_integrations.tools`): "auto", "template" (the model's chat template; checked when the app is created) or
    "builtin". Raises `ValueError` naming the field and what it allows for a value out of range.
    """

    model: str = setting(
        DEFAULT_MODEL, "model name or path (default: the embedded %(default)s); also the name clients send"
    )
    device: str = setting(
        "auto",
        "'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' (default: %(default)s)",
        kind="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )
    dtype: str = setting(
        "auto",
        "'auto' (bfloat16 or float16 on CUDA, bfloat16 on CPUs that run it fast, else float32), 'float32', "
        "'bfloat16' or 'float16' (default: %(default)s)",
    )
    quantization: str | None = setting(
        None, "load the weights quantized with bitsandbytes (default: not quantized)", choices=QUANTIZATIONS
    )
    api_key: str | None = setting(
        None,
        f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENVIRONMENT}; unset: no key)",
        kind="None or a non-empty string",
        environment=API_KEY_ENVIRONMENT,
    )
    max_body_bytes: int = setting(4 * 1024 * 1024, "larger request bodies get 413 (default: %(default)s)", **_INT)
    max_queued_requests: int = setting(
        64, "requests admitted at once, generating or waiting; more get 429 (default: %(default)s)", **_INT
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        "allow browser requests from this origin (repeatable or comma-separated; default: no CORS)",
        parse=_origins,
        kind="a tuple of origin strings",
        flag="--cors-origin",
    )
    max_batch_size: int | None = setting(None, "rows the engine decodes together (default: its own)", **_OPTIONAL_INT)
    max_prompt_tokens: int | None = setting(
        None, "longer prompts get 400 (default: the context window)", **_OPTIONAL_INT
    )
    max_kv_bytes: int | None = setting(
        None,
        "KV cache of all running requests, each counted unpruned with its max_tokens; a request that alone exceeds "
        "it gets 400, others wait (default: no bound)",
        **_OPTIONAL_INT,
    )
    tool_format: str = setting(
        "auto",
        "how requests' tools reach the model: its chat template ('template', for templates that write <tool_call> "
        "blocks, such as Qwen2.5's), the built-in Hermes text ('builtin'), or the template when it can ('auto', "
        "default)",
        choices=TOOL_FORMATS,
    )

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            _check(spec, getattr(self, spec.name))
        try:
            resolve_device(self.device)
        except DeviceUnavailableError:
            pass  # only its spelling is checked here: the engine loads where it serves (a Ray replica's GPU)
        if self.dtype != "auto":  # "auto" depends on the serving device, which may not be this machine's
            resolve_dtype(self.dtype)

    def scheduler_settings(self) -> dict:
        """The scheduler fields that are set, as `engine.configure_scheduler` takes them."""
        given = {
            "max_batch_size": self.max_batch_size,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_kv_bytes": self.max_kv_bytes,
        }
        return {name: value for name, value in given.items() if value is not None}

    def load_engine(self) -> PromptDistillEngine:
        """The engine these settings name, loaded here."""
        return PromptDistillEngine.from_pretrained(
            self.model, device=self.device, dtype=self.dtype, quantization=self.quantization
        )


def _setting_names() -> tuple[str, ...]:
    """The fields' names, after making sure each was made with `setting`, which the generated options need."""
    fields = dataclasses.fields(ServerSettings)
    if undeclared := [spec.name for spec in fields if "parse" not in spec.metadata]:
        raise TypeError(f"ServerSettings fields {undeclared} must be declared with setting(...)")
    return tuple(spec.name for spec in fields)


SETTING_NAMES = _setting_names()


def _check(spec: dataclasses.Field, value: Any) -> None:
    """Raise `ValueError` naming `spec`'s field when `value` is not what its declaration allows."""
    meta = spec.metadata
    if value is None and spec.default is None:
        return
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            optional = "None or " if spec.default is None else ""
            allowed = ", ".join(map(repr, meta["choices"]))
            raise ValueError(f"{spec.name} must be {optional}one of {allowed}, got {value!r}")
        return
    if meta["minimum"] is not None:
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= meta["minimum"]
    elif _is_repeatable(spec):
        valid = isinstance(value, tuple) and all(isinstance(item, str) and item for item in value)
    else:
        valid = isinstance(value, str) and value != ""
    if not valid:
        raise ValueError(f"{spec.name} must be {meta['kind']}, got {value!r}")


def _is_repeatable(spec: dataclasses.Field) -> bool:
    """Whether the field holds a tuple: a repeatable, comma-separated option."""
    return isinstance(spec.default, tuple)


def parse_setting(name: str, value: Any) -> Any:
    """One `ServerSettings` field's value from its `key=value` string (Ray Serve's builder arguments); a value
    that is not a string (a Serve config file's typed `args`) is passed through, a list as a tuple.

    Args:
        name: the field's name.
        value: its text, or an already typed value.

    Returns:
        The value, converted but not yet checked (`ServerSettings` checks it).

    Raises:
        ValueError: `name` is not a field, or `value` does not convert; the message names the field.
    """
    specs = {spec.name: spec for spec in dataclasses.fields(ServerSettings)}
    if name not in specs:
        raise ValueError(f"unknown setting {name!r}; the settings are {', '.join(SETTING_NAMES)}")
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    try:
        return specs[name].metadata["parse"](value)
    except ValueError:
        raise ValueError(f"{name} must be {specs[name].metadata['kind']}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `ServerSettings` field to `parser`: `--` and the name with dashes (or the field's own
    `flag`), converted with the field's `parse`, its `dest` the field's name; a tuple field's option repeats
    and takes comma-separated values.

    Args:
        parser: the parser to add them to.
    """
    for spec in dataclasses.fields(ServerSettings):
        meta = spec.metadata
        flag = meta["flag"] or "--" + spec.name.replace("_", "-")
        # Choices are shown in --help but not checked by argparse: ServerSettings checks them.
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else flag[2:].replace("-", "_").upper()
        options = {"dest": spec.name, "type": meta["parse"], "help": meta["help"], "metavar": metavar}
        if _is_repeatable(spec):
            parser.add_argument(flag, action="extend", default=[], **options)
        else:
            default = os.environ.get(meta["environment"]) if meta["environment"] else None
            parser.add_argument(flag, default=spec.default if default is None else default, **options)


def settings_from_namespace(args: argparse.Namespace) -> ServerSettings:
    """The `ServerSettings` of a namespace parsed with `add_arguments`' options (other attributes are ignored).

    Args:
        args: the parsed command line.

    Returns:
        The settings.

    Raises:
        ValueError: a value `ServerSettings` refuses, naming the field.
    """
    values = {name: getattr(args, name) for name in SETTING_NAMES}
    return ServerSettings(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
