"""The static baseline as operators run it: a model static partitioning leaves out is refused at once (503),
as a request to an instance nobody started would be, instead of waiting for its request timeout."""

from __future__ import annotations

import time

import openai
import pytest
import yaml

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server


def test_a_model_static_partitioning_leaves_out_gets_a_503_at_once(tmp_path):
    tiny = str(default_registry_path().parent / "tiny-llama.json")
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "server": {"request_timeout_s": 60},
        "devices": ["cpu"],
        "memory": {"cpu_budget_bytes": "40MiB"},  # two of the three 12 MiB models (7 pages of 2 MiB) with their KV
        "scheduler": {"policy": "static", "min_kv_reserve_tokens": 256},
        "models": [{"name": f"tiny-{i}", "load_format": "dummy", "config": tiny, "seed": i, "max_model_len": 512} for i in range(3)],
    }))
    server = start_server(registry)
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=90)
        assert client.completions.create(model="tiny-0", prompt=[5, 6, 7], max_tokens=2).usage.completion_tokens == 2
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:  # before: a 504 after the 60 s request timeout
            client.completions.create(model="tiny-2", prompt=[5, 6, 7], max_tokens=2)
        assert refused.value.status_code == 503 and "static partitioning" in refused.value.message
        assert time.monotonic() - started < 10 and int(refused.value.response.headers["retry-after"]) >= 1
    finally:
        stop_server(server)
