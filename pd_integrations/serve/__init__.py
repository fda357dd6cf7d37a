"""pd-serve: PromptDistill behind OpenAI's HTTP API (`create_app`), in one process or as a Ray Serve application
(`pd_integrations.serve.ray_app`). Needs the `serve` extra (FastAPI, uvicorn); Ray Serve needs the `ray` extra."""

from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
