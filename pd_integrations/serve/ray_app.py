"""The same FastAPI app as a Ray Serve application: each replica loads one engine and serves `create_app` over it
(`serve.ingress` with a builder, Ray Serve 2.47 or later).

Ray routes requests across the replicas and scales them (`num_replicas`, `autoscaling_config`); each replica's
engine batches the requests it gets. On GPU machines give each replica `ray_actor_options={"num_gpus": 1}`.

On an existing cluster, with this package installed on its nodes:

    serve run pd_integrations.serve.ray_app:build model=smollm2-135m-instruct num_replicas=4 num_gpus=1

`build` takes every `ServerSettings` field as a key (`max_batch_size=8`, `cors_origins=https://a,https://b`) and
`num_replicas` and `num_gpus`; `build_arguments` parses them, and imports nothing of Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .app import create_app
from .settings import SETTING_NAMES, ServerSettings, parse_setting

if TYPE_CHECKING:
    from ray.serve import Application

# The builder's keys that place the replicas rather than configure the app.
DEPLOYMENT_KEYS = ("num_replicas", "num_gpus")


def application(
    settings: ServerSettings,
    num_replicas: int | str = 1,
    ray_actor_options: dict | None = None,
    autoscaling_config: dict | None = None,
) -> Application:
    """The Ray Serve application of `settings`: `num_replicas` replicas (or "auto" with `autoscaling_config`),
    each placed with `ray_actor_options`. Ray sends each replica up to `settings.max_queued_requests` requests at
    once, all of which it admits, and queues as many more at each proxy before it answers 503."""
    from ray import serve  # here, so that `build_arguments` is usable (and testable) without Ray installed

    def replica_app():
        # Runs on each replica as it starts: the engine loads where it serves, and neither it nor the app is
        # pickled across the cluster.
        return create_app(settings.load_engine(), settings)

    options = {
        "name": "pd-serve",
        "num_replicas": num_replicas,
        "max_ongoing_requests": settings.max_queued_requests,
        "max_queued_requests": settings.max_queued_requests,
    }
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    return serve.deployment(serve.ingress(replica_app)(), **options).bind()


def build_arguments(args: Mapping[str, Any]) -> tuple[ServerSettings, int, dict | None]:
    """What `build`'s `key=value` arguments ask for: every `ServerSettings` field by its name, `num_replicas`
    (default 1) and `num_gpus` (each replica's; default none).

    Args:
        args: the keys and their values, strings from `serve run` or typed from a Serve config file.

    Returns:
        The settings, the number of replicas and the replicas' `ray_actor_options` (None without `num_gpus`).

    Raises:
        ValueError: unknown keys (the message names them and the allowed ones), or a value that does not convert
            or that `ServerSettings` refuses (the message names the key).
    """
    allowed = (*SETTING_NAMES, *DEPLOYMENT_KEYS)
    if unknown := sorted(set(args) - set(allowed)):
        raise ValueError(
            f"unknown keys {', '.join(map(repr, unknown))} for ray_app:build; the keys are {', '.join(allowed)}"
        )
    settings = ServerSettings(**{key: parse_setting(key, value) for key, value in args.items() if key in SETTING_NAMES})
    replicas = _number("num_replicas", args.get("num_replicas", 1), int, minimum=1)
    actor = {"num_gpus": _number("num_gpus", args["num_gpus"], float, minimum=0)} if "num_gpus" in args else None
    return settings, replicas, actor


def _number(key: str, value: Any, kind: type, minimum: float) -> int | float:
    """`value` as a `kind` (int or float) of at least `minimum`; `ValueError` naming `key` otherwise."""
    convertible = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    try:
        number = kind(value) if convertible else None
    except ValueError:
        number = None
    if number is None or number < minimum or (isinstance(value, float) and number != value):  # 1.5 is no int
        raise ValueError(f"{key} must be {'an int' if kind is int else 'a number'} >= {minimum}, got {value!r}")
    return number


def build(args: dict[str, Any]) -> Application:
    """The application builder of `serve run pd_integrations.serve.ray_app:build key=value ...`.

    Args:
        args: the keys `build_arguments` takes: every `ServerSettings` field, `num_replicas` and `num_gpus`.

    Returns:
        The Ray Serve application.

    Raises:
        ValueError: an unknown key or a bad value (see `build_arguments`).
    """
    return application(*build_arguments(args))
