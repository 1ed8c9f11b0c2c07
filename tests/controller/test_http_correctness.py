"""Greedy output through HTTP equals transformers' for SmolLM2 and tiny random Llama, Qwen2, Qwen3 models."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.controller.server_process import start_server, stop_server
from tests.factories import SMOLLM2, TINY_CONFIGS, make_tiny_checkpoint
from tests.workers.test_engine_vs_transformers import hf_greedy

NUM_TOKENS = 32
PROMPTS = ["The history of the printing press", "def fibonacci(n):", "Les montagnes de Suisse sont"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    root = tmp_path_factory.mktemp("http-correctness")
    models = [{"name": SMOLLM2, "path": str(prepared_smollm2)}]
    for model_type in sorted(TINY_CONFIGS):
        directory = make_tiny_checkpoint(model_type, root / model_type, seed=3, vocab_size=49152)
        models.append({"name": f"tiny-{model_type}", "path": str(directory), "tokenizer": SMOLLM2})
    config = root / "registry.yaml"
    config.write_text(yaml.safe_dump({"devices": ["cpu"], "memory": {"cpu_budget_bytes": "1GiB"}, "models": models}))
    server = start_server(config)
    yield server, {m["name"]: m["path"] for m in models}
    stop_server(server)


def test_greedy_output_over_http_matches_transformers(server, prepared_smollm2):
    process, paths = server
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    client = openai.AsyncOpenAI(base_url=process.api_url, api_key="unused", max_retries=0, timeout=300)

    async def ask(model: str, prompt_ids: list[int]):
        response = await client.completions.create(
            model=model, prompt=prompt_ids, temperature=0, max_tokens=NUM_TOKENS, extra_body={"min_tokens": NUM_TOKENS}
        )
        return response.choices[0].text, response.usage.completion_tokens

    async def all_requests(jobs):  # every model and prompt at once: batched on the worker
        return await asyncio.gather(*(ask(model, ids) for model, ids in jobs))

    jobs = [(model, tokenizer.encode(text)) for model in paths for text in PROMPTS]
    results = asyncio.run(all_requests(jobs))
    for model, path in paths.items():
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for (job_model, prompt_ids), (text, num_tokens) in zip(jobs, results):
            if job_model != model:
                continue
            expected_ids = hf_greedy(reference, prompt_ids, NUM_TOKENS)
            assert num_tokens == NUM_TOKENS
            assert text == tokenizer.decode(expected_ids, skip_special_tokens=True), (model, prompt_ids)
