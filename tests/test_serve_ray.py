"""pd-serve as a Ray Serve application: a local Ray instance started and shut down here, two replicas of the default
model, 32 concurrent requests through Ray's HTTP proxy. Every one is answered, and greedily exactly as the
single-process server answers it."""

from __future__ import annotations

import asyncio

import openai
import pytest

from pd_integrations import PromptDistillEngine
from pd_integrations.loading import DEFAULT_MODEL
from pd_integrations.serve import ServerSettings, create_app

from .serving import free_socket, running

pytestmark = pytest.mark.slow

SETTINGS = ServerSettings(device="cpu", dtype="float32")
REQUESTS = 32
CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Athens", "Dublin"]
PROMPTS = [f"Question {i}: in one word, which country is {CITIES[i % len(CITIES)]} in?" for i in range(REQUESTS)]


async def answers(base_url: str) -> list[str]:
    """Every prompt sent at once, greedy and short; the answers in prompt order."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        responses = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0
                )
                for prompt in PROMPTS
            )
        )
    return [response.choices[0].message.content for response in responses]


@pytest.fixture(scope="module")
def ray_url():
    ray = pytest.importorskip("ray")
    from ray import serve

    from pd_integrations.serve.ray_app import application

    with free_socket() as sock:  # a port free now; Ray's proxy binds it itself
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(SETTINGS, num_replicas=2, ray_actor_options={"num_cpus": 1}))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_32_concurrent_requests_as_one_process_does(ray_url):
    from ray import serve

    assert serve.status().applications["default"].deployments["pd-serve"].replica_states == {"RUNNING": 2}
    from_ray = asyncio.run(answers(ray_url))
    assert len(from_ray) == REQUESTS and all(from_ray)
    with running(
        create_app(PromptDistillEngine.from_pretrained(device=SETTINGS.device, dtype=SETTINGS.dtype), SETTINGS)
    ) as url:
        from_one_process = asyncio.run(answers(url))
    assert from_ray == from_one_process
