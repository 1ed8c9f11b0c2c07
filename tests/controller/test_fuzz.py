"""Fuzzing the real server: schemathesis over its own OpenAPI schema, and random bodies from hypothesis.

Nothing a client sends may produce a 5xx or a response that contradicts the schema. The server runs with
API keys and an admin token configured, so the auth paths are fuzzed too.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.controller.server_process import (
    default_registry,
    start_server,
    stop_server,
    write_registry,
)

schemathesis = pytest.importorskip("schemathesis")

API_KEY = "fuzz-key"
ADMIN_TOKEN = "fuzz-admin"



@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    registry = default_registry()
    registry["server"]["request_timeout_s"] = 30
    # Registry changes are fuzzed with the admin token: model sources confined to the registry's folder and
    # no wheel may be fetched, so a fuzzed model touches neither the network nor files elsewhere.
    registry["server"]["admin_pypi_wheels"] = []
    registry["server"]["admin_model_roots"] = ["."]
    path = write_registry(tmp_path_factory.mktemp("fuzz"), registry)
    process = start_server(path, env={"PRISM_API_KEYS": f"other,{API_KEY}", "PRISM_ADMIN_TOKEN": ADMIN_TOKEN})
    yield process
    stop_server(process)


def _checks():
    from schemathesis import checks

    return [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance]


def test_schema_fuzzing_finds_no_server_errors_or_schema_violations(server):
    """Every operation of /openapi.json, with generated valid and invalid inputs (schemathesis + hypothesis)."""
    api = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    checks = _checks()
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        token = ADMIN_TOKEN if operation.path.startswith("/admin") else API_KEY
        headers = {"Authorization": f"Bearer {token}"}

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(headers=headers, timeout=60)
            case.validate_response(response, checks=checks)

        fuzz()


def test_openai_routes_need_a_key_when_keys_are_configured(server):
    body = {"model": "tiny-llama-random", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.api_url + "/completions", json=body).status_code == 401
    wrong = httpx.post(server.api_url + "/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.api_url + "/models", headers={"Authorization": "Basic abc"}).status_code == 401
    ok = httpx.post(server.api_url + "/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(server.base_url + "/health").status_code == 200  # health and metrics stay open


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
          "stream_options", "min_tokens", "stop_token_ids", "logprobs", "max_completion_tokens"]
# Invalid (< 1, past any context) or small: a valid request with hundreds of tokens is a legitimate 504 on a
# loaded 2-core machine (SmolLM2 at ~15 tokens/s against the 30 s request timeout), not a server error.
max_tokens = st.one_of(st.integers(max_value=0, min_value=-(10**20)), st.integers(min_value=1, max_value=32),
                       st.integers(min_value=10**5, max_value=10**20))
bodies = st.one_of(
    st.binary(max_size=200),  # arbitrary bytes, invalid UTF-8 included
    st.binary(max_size=50).map(lambda b: b'{"model": "' + b + b'"}'),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny-llama-random", "smollm2-135m-instruct"]), "prompt": st.one_of(st.text(max_size=50), st.lists(st.integers(), max_size=5))},
        optional={"max_tokens": max_tokens, "temperature": json_values, "stop": json_values, "seed": st.integers(min_value=-(10**25), max_value=10**25)},
    ).map(lambda d: json.dumps(d).encode()),
)


@given(body=bodies, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_bodies_get_4xx_never_5xx(server, body, route):
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    try:
        response = httpx.post(server.base_url + route, content=body, headers=headers, timeout=60)
    except httpx.RemoteProtocolError as exc:  # the server must answer every request
        pytest.fail(f"connection dropped for body {body[:80]!r}: {exc}")
    assert response.status_code < 500, (body[:200], response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"]


def test_a_one_megabyte_prompt_is_a_clear_400(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "smollm2-135m-instruct", "prompt": "lorem ipsum " * 87_000, "max_tokens": 1}
    response = httpx.post(server.api_url + "/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x" * 1_000_000}]}
    response = httpx.post(server.api_url + "/chat/completions", json=chat, headers=headers, timeout=120)
    assert response.status_code == 400


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


texts = st.text(st.characters(categories=["Cs"]) | st.characters(codec="utf-8") | st.sampled_from("\x00\ufffe\uffff\U0010ffff"), max_size=12)


@given(text=texts, where=st.sampled_from(["prompt", "content", "part", "stop"]))
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_prompts_with_surrogates_and_other_odd_unicode_get_4xx_never_5xx(server, text, where):
    """Lone surrogates (which JSON can carry and no tokenizer encodes), NUL, noncharacters, the last code
    point: wherever text goes, a 400 naming the field if it is not valid Unicode, else served."""
    model = "tiny-llama-random"
    if where == "prompt":
        route, body = "/v1/completions", {"model": model, "prompt": text or "x", "max_tokens": 1}
    elif where == "stop":
        route, body = "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1, "stop": [text or "x"]}
    else:
        content = text or "x" if where == "content" else [{"type": "text", "text": text or "x"}]
        route, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = httpx.post(server.base_url + route, content=json.dumps(body).encode(), headers=headers, timeout=60)
    if _has_surrogate(text):
        assert response.status_code == 400, response.text[:300]
        assert "surrogate" in response.json()["error"]["message"] and response.json()["error"]["param"]
    else:
        assert response.status_code == 200, (text, response.text[:300])
