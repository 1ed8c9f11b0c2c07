"""Per-model sampling defaults: the registry's `sampling`, then the model's generation_config.json, then
OpenAI's; a request's own value always wins."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from controller.catalog import build_catalog, sampling_defaults
from controller.protocol import ChatCompletionRequest, CompletionRequest
from controller.registry import ModelConfig, load_registry
from controller.serving import OpenAIServing

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-llama.json"


def dummy_model(**sampling) -> ModelConfig:
    return ModelConfig(name="m", load_format="dummy", config=TINY_CONFIG, sampling=sampling)


def test_registry_fields_override_the_generation_config_field_by_field(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 300}
    ))
    merged = sampling_defaults(dummy_model(top_p=0.5), tmp_path)
    assert (merged.temperature, merged.top_p, merged.top_k, merged.max_tokens) == (0.6, 0.5, 20, 300)


def test_an_unusable_generation_config_is_ignored(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 9.0, "top_p": 0.8}))
    merged = sampling_defaults(dummy_model(top_k=5), tmp_path)
    assert (merged.temperature, merged.top_p, merged.top_k) == (None, None, 5)
    assert "generation_config.json" in caplog.text


def test_without_either_the_openai_defaults_apply(tmp_path):
    merged = sampling_defaults(dummy_model(), None)
    assert merged.model_dump(exclude_none=True) == {}


@pytest.fixture
def serving(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.json")
    (tmp_path / "registry.yaml").write_text(textwrap.dedent("""
        devices: [cpu]
        models:
          - name: tuned
            load_format: dummy
            config: tiny.json
            max_model_len: 256
            sampling: {temperature: 0.2, top_p: 0.9, top_k: 40, max_tokens: 50}
          - name: plain
            load_format: dummy
            config: tiny.json
            max_model_len: 256
    """))
    registry = load_registry(tmp_path / "registry.yaml")
    return OpenAIServing(models=None, client=None, limits=registry.server), build_catalog(registry, tmp_path / "cache")


def sampling_of(serving: tuple[OpenAIServing, dict], request) -> tuple:
    serving, catalog = serving
    entry = catalog[request.model]
    max_tokens = request.requested_max_tokens if isinstance(request, ChatCompletionRequest) else request.max_tokens
    s = serving._generation("x", entry, request, [1, 2, 3], max_tokens).sampling
    return s.temperature, s.top_p, s.top_k, s.max_tokens


def chat(model: str, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hi"}], **fields)


def test_a_request_that_leaves_fields_out_gets_the_models_defaults(serving):
    assert sampling_of(serving, chat("tuned")) == (0.2, 0.9, 40, 50)
    assert sampling_of(serving, chat("plain")) == (1.0, 1.0, 0, 256 - 3)


def test_the_requests_own_values_win_even_when_they_equal_openais_defaults(serving):
    assert sampling_of(serving, chat("tuned", temperature=1.0, top_p=1.0, top_k=0, max_tokens=7)) == (1.0, 1.0, 0, 7)
    assert sampling_of(serving, chat("tuned", temperature=0.0)) == (0.0, 0.9, 40, 50)


def test_completions_keep_openais_16_tokens_unless_sent_null(serving):
    assert sampling_of(serving, CompletionRequest(model="tuned", prompt="hi"))[3] == 16
    assert sampling_of(serving, CompletionRequest(model="tuned", prompt="hi", max_tokens=None))[3] == 50
