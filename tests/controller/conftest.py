"""Fixtures for full-stack tests: the real server as a subprocess, and the official openai client."""

from __future__ import annotations

import pytest

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server
from tests.factories import smollm2_dir


@pytest.fixture(scope="session")
def prepared_smollm2():
    """Prepare SmolLM2 once per session (so a server's start-up does not include the first download)."""
    return smollm2_dir()


@pytest.fixture(scope="module")
def demo_server(prepared_smollm2):
    server = start_server(default_registry_path())
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(demo_server):
    import openai

    return openai.OpenAI(base_url=demo_server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_client(demo_server):
    import openai

    return openai.AsyncOpenAI(base_url=demo_server.api_url, api_key="unused", max_retries=0, timeout=300)
