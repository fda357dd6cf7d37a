"""The same FastAPI app as a Ray Serve application: each replica loads one engine and serves `create_app` over it
(`serve.ingress` with a builder, Ray Serve 2.47 or later).

Ray routes requests across the replicas and scales them (`num_replicas`, `autoscaling_config`); each replica's
engine batches the requests it gets. On GPU machines give each replica `ray_actor_options={"num_gpus": 1}`.

On an existing cluster, with this package installed on its nodes:

    serve run pd_integrations.serve.ray_app:build model=smollm2-135m-instruct num_replicas=4 num_gpus=1
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from .app import ServerSettings, create_app


def application(
    settings: ServerSettings,
    num_replicas: int | str = 1,
    ray_actor_options: dict | None = None,
    autoscaling_config: dict | None = None,
) -> Application:
    """The Ray Serve application of `settings`: `num_replicas` replicas (or "auto" with `autoscaling_config`),
    each placed with `ray_actor_options`. Ray sends each replica up to `settings.max_queued_requests` requests at
    once, all of which it admits, and queues as many more at each proxy before it answers 503."""

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


def build(args: dict[str, str]) -> Application:
    """The application builder of `serve run pd_integrations.serve.ray_app:build key=value ...`: `model`,
    `device`, `dtype`, `tool_format`, `api_key`, `max_queued_requests`, `num_replicas` and `num_gpus`."""
    settings = ServerSettings(
        **{key: value for key, value in args.items() if key in ("model", "device", "dtype", "tool_format")},
        api_key=args.get("api_key"),
        max_queued_requests=int(args.get("max_queued_requests", 64)),
    )
    actor = {"num_gpus": float(args["num_gpus"])} if "num_gpus" in args else None
    return application(settings, int(args.get("num_replicas", 1)), actor)
