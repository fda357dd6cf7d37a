"""`pd-serve` (or `python -m pd_integrations.serve`): an OpenAI-compatible server over one model, in this process
with uvicorn, or with `--ray` as a Ray Serve application of `--replicas` replicas."""

from __future__ import annotations

import argparse

from .settings import ServerSettings, add_arguments, settings_from_namespace


def build_parser() -> argparse.ArgumentParser:
    """`pd-serve`'s parser: an option per `ServerSettings` field (generated from the fields), then where and how
    to serve, which are not settings of the app.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(prog="pd-serve", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--ray", action="store_true", help="serve with Ray Serve (a local Ray instance, or the cluster at $RAY_ADDRESS)"
    )
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, one engine each")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica needs")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, argparse.Namespace]:
    """`pd-serve`'s command line, parsed and checked.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The settings, and the namespace for the options that are not settings (`host`, `port`, `ray`,
        `replicas`, `gpus_per_replica`).

    Raises:
        SystemExit: argparse's usage error (status 2) for an unknown option or a value that does not convert, or
            that `ServerSettings` refuses (its message names the field).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return settings_from_namespace(args), args
    except ValueError as err:
        parser.error(str(err))


def serve_here(settings: ServerSettings, host: str, port: int) -> None:
    """Load the engine here and serve it with uvicorn on `host:port` until stopped."""
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings.load_engine(), settings), host=host, port=port)


def serve_with_ray(settings: ServerSettings, host: str, port: int, replicas: int, gpus_per_replica: float) -> None:
    """Serve as the Ray Serve application "pd-serve", `replicas` replicas of `gpus_per_replica` GPUs each, with
    Ray's proxy on `host:port`, until stopped."""
    import ray
    from ray import serve

    from .ray_app import application

    ray.init()  # connects to $RAY_ADDRESS when set, else starts a local instance
    serve.start(http_options={"host": host, "port": port})
    actor = {"num_gpus": gpus_per_replica} if gpus_per_replica else None
    # Named, because an unnamed `serve.run` replaces every other application on the cluster.
    serve.run(application(settings, replicas, actor), name="pd-serve", blocking=True)


def main(argv: list[str] | None = None) -> None:
    """`pd-serve`: parse `argv` (see `parse_args`) and serve here or, with `--ray`, on Ray Serve."""
    settings, args = parse_args(argv)
    if args.ray:
        serve_with_ray(settings, args.host, args.port, args.replicas, args.gpus_per_replica)
    else:
        serve_here(settings, args.host, args.port)


if __name__ == "__main__":
    main()
