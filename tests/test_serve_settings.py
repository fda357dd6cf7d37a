"""`ServerSettings` declared once: every field is settable from `pd-serve`'s command line and from the Ray Serve
builder's `key=value` arguments, values are checked in one place with errors naming the field, and the builder
refuses keys it does not know. Nothing here starts Ray or loads a model."""

from __future__ import annotations

import dataclasses

import pytest

from pd_integrations.serve.__main__ import parse_args
from pd_integrations.serve.ray_app import build_arguments
from pd_integrations.serve.settings import API_KEY_ENVIRONMENT, ServerSettings

# A non-default value for every field: (pd-serve's arguments, the Ray builder's value, the setting it must become).
# A field added to ServerSettings without a row here fails `test_every_field_is_settable_*`.
SAMPLES = {
    "model": (["--model", "Qwen/Qwen2.5-0.5B-Instruct"], "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    "device": (["--device", "cpu"], "cpu", "cpu"),
    "dtype": (["--dtype", "float32"], "float32", "float32"),
    "quantization": (["--quantization", "8bit"], "8bit", "8bit"),
    "api_key": (["--api-key", "KEY"], "KEY", "KEY"),
    "max_body_bytes": (["--max-body-bytes", "1000"], "1000", 1000),
    "max_queued_requests": (["--max-queued-requests", "3"], "3", 3),
    "cors_origins": (
        ["--cors-origin", "https://a.example", "--cors-origin", "https://b.example"],
        "https://a.example,https://b.example",
        ("https://a.example", "https://b.example"),
    ),
    "max_batch_size": (["--max-batch-size", "4"], "4", 4),
    "max_prompt_tokens": (["--max-prompt-tokens", "512"], "512", 512),
    "max_kv_bytes": (["--max-kv-bytes", "1000000"], "1000000", 1_000_000),
    "tool_format": (["--tool-format", "builtin"], "builtin", "builtin"),
}
FIELDS = [spec.name for spec in dataclasses.fields(ServerSettings)]
DEFAULTS = ServerSettings()


@pytest.fixture(autouse=True)
def no_api_key_in_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENVIRONMENT, raising=False)


def assert_only(settings: ServerSettings, name: str, expected) -> None:
    """`settings` holds `expected` in `name` and the defaults elsewhere."""
    assert expected != getattr(DEFAULTS, name), f"the sample for {name} is its default"
    assert getattr(settings, name) == expected
    assert dataclasses.replace(settings, **{name: getattr(DEFAULTS, name)}) == DEFAULTS


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_settable_from_the_command_line(name):
    assert name in SAMPLES, f"ServerSettings.{name} has no sample here: add one to SAMPLES"
    arguments, _, expected = SAMPLES[name]
    settings, _ = parse_args(arguments)
    assert_only(settings, name, expected)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_settable_from_the_ray_builder(name):
    assert name in SAMPLES, f"ServerSettings.{name} has no sample here: add one to SAMPLES"
    _, value, expected = SAMPLES[name]
    settings, replicas, actor = build_arguments({name: value})
    assert_only(settings, name, expected)
    assert (replicas, actor) == (1, None)


def test_no_sample_without_a_field():
    assert set(SAMPLES) == set(FIELDS)


def test_cors_origins_repeat_and_split_on_commas():
    settings, _ = parse_args(["--cors-origin", "https://a.example,https://b.example", "--cors-origin", "https://c"])
    assert settings.cors_origins == ("https://a.example", "https://b.example", "https://c")
    assert parse_args([])[0].cors_origins == ()


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENVIRONMENT, "from-env")
    assert parse_args([])[0].api_key == "from-env"
    assert parse_args(["--api-key", "given"])[0].api_key == "given"


def test_serving_options_are_not_settings():
    settings, args = parse_args(["--host", "0.0.0.0", "--port", "9000", "--ray", "--replicas", "3"])
    assert settings == DEFAULTS
    assert (args.host, args.port, args.ray, args.replicas, args.gpus_per_replica) == ("0.0.0.0", 9000, True, 3, 0.0)
    assert parse_args(["--gpus-per-replica", "0.5"])[1].gpus_per_replica == 0.5


def test_ray_builder_places_replicas():
    settings, replicas, actor = build_arguments({"num_replicas": "4", "num_gpus": "1", "max_batch_size": "8"})
    assert (settings.max_batch_size, replicas, actor) == (8, 4, {"num_gpus": 1.0})


def test_ray_builder_takes_typed_values_from_a_config_file():
    settings, replicas, _ = build_arguments({"max_kv_bytes": 1000, "cors_origins": ["https://a"], "num_replicas": 2})
    assert (settings.max_kv_bytes, settings.cors_origins, replicas) == (1000, ("https://a",), 2)


def test_ray_builder_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys 'batch', 'modle'") as refused:
        build_arguments({"modle": "x", "batch": "4", "model": "y"})
    for key in [*FIELDS, "num_replicas", "num_gpus"]:
        assert key in str(refused.value)


def test_ray_build_passes_what_it_parsed(monkeypatch):
    from pd_integrations.serve import ray_app

    monkeypatch.setattr(ray_app, "application", lambda *parsed: parsed)
    parsed = ray_app.build({"quantization": "4bit", "max_prompt_tokens": "64", "num_replicas": "2"})
    assert parsed == (ServerSettings(quantization="4bit", max_prompt_tokens=64), 2, None)


# (field, a value ServerSettings refuses, what the error says it allows)
BAD = [
    ("model", "", "a non-empty string"),
    ("device", "tpu", "'cuda:N'"),
    ("dtype", "int8", "'bfloat16'"),
    ("quantization", "2bit", "None or one of '4bit', '8bit'"),
    ("api_key", "", "non-empty"),
    ("max_body_bytes", 0, "an int >= 1"),
    ("max_queued_requests", -1, "an int >= 1"),
    ("cors_origins", "https://a", "a tuple"),
    ("max_batch_size", 0, "None or an int >= 1"),
    ("max_prompt_tokens", True, "None or an int >= 1"),
    ("max_kv_bytes", 1.5, "None or an int >= 1"),
    ("tool_format", "xml", "one of 'auto', 'template', 'builtin'"),
]


@pytest.mark.parametrize("name, value, allowed", BAD, ids=[name for name, _, _ in BAD])
def test_bad_values_are_refused_naming_the_field(name, value, allowed):
    with pytest.raises(ValueError, match=rf"^{name} must be .*{allowed}") as refused:
        ServerSettings(**{name: value})
    assert repr(value) in str(refused.value)


def test_every_field_has_a_bad_value():
    assert {name for name, _, _ in BAD} == set(FIELDS)


def test_a_device_missing_here_is_not_refused():
    # Ray replicas load the engine where they run, so a head node without a GPU may still ask for one.
    assert ServerSettings(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-batch-size", "0"], "max_batch_size must be None or an int >= 1"),
        (["--tool-format", "xml"], "tool_format must be one of"),
        (["--max-kv-bytes", "lots"], "argument --max-kv-bytes: invalid int value: 'lots'"),
        (["--cors-origins", "x"], "unrecognized arguments"),
    ],
)
def test_command_line_errors_name_the_option(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(arguments)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ({"max_batch_size": "four"}, "max_batch_size must be None or an int >= 1, got 'four'"),
        ({"tool_format": "xml"}, "tool_format must be one of"),
        ({"num_replicas": "0"}, "num_replicas must be an int >= 1, got '0'"),
        ({"num_replicas": 1.5}, "num_replicas must be an int >= 1, got 1.5"),
        ({"num_gpus": "half"}, "num_gpus must be a number >= 0, got 'half'"),
    ],
)
def test_ray_builder_errors_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        build_arguments(args)


def test_ray_build_makes_an_application_without_a_running_ray():
    serve = pytest.importorskip("ray.serve")
    from pd_integrations.serve.ray_app import build

    assert isinstance(build({"device": "cpu", "num_replicas": "2", "max_batch_size": "2"}), serve.Application)


def test_the_app_runs_the_forwards_in_a_worker_thread(tokenizer):
    """A server's requests are stepped in changing threads of a pool, so the app hands the rounds to the
    scheduler's worker thread, keeping the other scheduler settings it was given."""
    from pd_integrations import PromptDistillConfig, PromptDistillEngine
    from pd_integrations.serve.app import create_app

    from .conftest import tiny_model

    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"))
    assert engine.scheduler.settings.driver == "caller"
    create_app(engine, ServerSettings(max_batch_size=3))
    assert engine.scheduler.settings.driver == "thread" and engine.scheduler.settings.max_batch_size == 3
