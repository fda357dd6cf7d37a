"""`pd-serve` (or `python -m pd_integrations.serve`): an OpenAI-compatible server over one model, in this process
with uvicorn, or with `--ray` as a Ray Serve application of `--replicas` replicas."""

from __future__ import annotations

import argparse
import os

from ..tools import TOOL_FORMATS
from .app import API_KEY_ENVIRONMENT, ServerSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pd-serve", description=__doc__)
    parser.add_argument(
        "--model",
        default=ServerSettings.model,
        help="model name or path (default: the embedded %(default)s); also the name clients send",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENVIRONMENT),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENVIRONMENT}; unset: no key)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", choices=("4bit", "8bit"))
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServerSettings.max_body_bytes,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=ServerSettings.max_queued_requests,
        help="requests admitted at once, generating or waiting; more get 429 (default: %(default)s)",
    )
    parser.add_argument("--max-batch-size", type=int, help="rows the engine decodes together (default: its own)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longer prompts get 400 (default: the context window)")
    parser.add_argument(
        "--max-kv-bytes",
        type=int,
        help="KV cache of all running requests, each counted unpruned with its max_tokens; a "
        "request that alone exceeds it gets 400, others wait (default: no bound)",
    )
    parser.add_argument(
        "--tool-format",
        choices=TOOL_FORMATS,
        default=ServerSettings.tool_format,
        help="how requests' tools reach the model: its chat template ('template', for templates that "
        "write <tool_call> blocks, such as Qwen2.5's), the built-in Hermes text ('builtin'), or "
        "the template when it can ('auto', default)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser requests from this origin (repeatable; default: no CORS)",
    )
    parser.add_argument(
        "--ray", action="store_true", help="serve with Ray Serve (a local Ray instance, or the cluster at $RAY_ADDRESS)"
    )
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, one engine each")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica needs")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_queued_requests=args.max_queued_requests,
        cors_origins=tuple(args.cors_origin),
        max_batch_size=args.max_batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        max_kv_bytes=args.max_kv_bytes,
        tool_format=args.tool_format,
    )


def serve_here(settings: ServerSettings, host: str, port: int) -> None:
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings.load_engine(), settings), host=host, port=port)


def serve_with_ray(settings: ServerSettings, host: str, port: int, replicas: int, gpus_per_replica: float) -> None:
    import ray
    from ray import serve

    from .ray_app import application

    ray.init()  # connects to $RAY_ADDRESS when set, else starts a local instance
    serve.start(http_options={"host": host, "port": port})
    actor = {"num_gpus": gpus_per_replica} if gpus_per_replica else None
    # Named, because an unnamed `serve.run` replaces every other application on the cluster.
    serve.run(application(settings, replicas, actor), name="pd-serve", blocking=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.ray:
        serve_with_ray(settings, args.host, args.port, args.replicas, args.gpus_per_replica)
    else:
        serve_here(settings, args.host, args.port)


if __name__ == "__main__":
    main()
