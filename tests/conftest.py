"""Shared test setup: the `gpu` marker skips where no CUDA device is present (the device machine runs them);
fixtures for full-stack tests (the real server as a subprocess, the official openai client)."""

from __future__ import annotations

import pytest

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server
from tests.factories import smollm2_dir


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine (pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

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
