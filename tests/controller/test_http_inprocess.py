"""The HTTP surface in process (`httpx.ASGITransport`, no subprocess): validation and the mapping of every
error to OpenAI's body and status. The server is built as served (`Server.build`: channel, handles, model
manager, serving) but its worker processes are never launched, so a valid request waits for a worker
that never comes. The full-stack tests (test_openai_api.py) cover the same surface with real workers and
the official openai client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from controller.app import create_app
from controller.catalog import build_catalog
from controller.registry import default_registry_path, load_registry
from controller.server import Server
from tests.controller.http_cases import INVALID_FIELDS, MALFORMED_BODIES
from workers.contract.prepare import default_cache_dir

TINY = "tiny-llama-random"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ADMIN_TOKEN = "in-process-admin"


@pytest.fixture(scope="module")
def registry(prepared_smollm2):
    registry = load_registry(default_registry_path())
    return registry.model_copy(update={"server": registry.server.model_copy(update={"worker_start_timeout_s": 0.3})})


@pytest.fixture(scope="module")
def catalog(registry):
    return build_catalog(registry, default_cache_dir())


def call(registry, catalog, *requests: tuple[str, str, dict], admin: bool = False) -> list[httpx.Response]:
    """Send requests (method, path, httpx keyword arguments) in order to an app whose workers never start."""

    async def scenario() -> list[httpx.Response]:
        server = Server(registry, dict(catalog), default_cache_dir())
        app = create_app(registry, default_cache_dir(), server)
        if admin:
            app.state.auth.admin_token = ADMIN_TOKEN
        await server.build()
        app.state.server = server
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://prism.test") as client:
                return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]
        finally:
            await server.stop(drain_timeout_s=0)

    return asyncio.run(scenario())


def chat(**fields) -> tuple[str, str, dict]:
    return "POST", "/v1/chat/completions", {"json": {"model": TINY, "messages": QUESTION, "max_tokens": 3, **fields}}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_models_are_listed_with_their_context(registry, catalog):
    (response,) = call(registry, catalog, ("GET", "/v1/models", {}))
    assert response.status_code == 200
    assert {m["id"]: m["max_model_len"] for m in response.json()["data"]} == {"smollm2-135m-instruct": 8192, TINY: 2048}


@pytest.mark.parametrize("fields, param", [*INVALID_FIELDS, ({"model": "no-such-model"}, "model"), ({"max_tokens": 4096}, "max_tokens")])
def test_invalid_requests_get_an_openai_error_naming_the_field(registry, catalog, fields, param):
    (response,) = call(registry, catalog, chat(**fields))
    error = error_of(response)
    if fields.get("model") == "no-such-model":
        assert (response.status_code, error["code"], error["type"]) == (404, "model_not_found", "invalid_request_error")
    else:
        assert response.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    if fields.get("max_tokens") == 4096:
        assert error["code"] == "context_length_exceeded"
    if param:
        assert error["param"] == param


@pytest.mark.parametrize("content, expected", MALFORMED_BODIES)
def test_malformed_bodies_are_400(registry, catalog, content, expected):
    request = ("POST", "/v1/chat/completions", {"content": content, "headers": {"content-type": "application/json"}})
    (response,) = call(registry, catalog, request)
    error = error_of(response)
    assert response.status_code == 400 and (expected in error["message"] or error["param"] == expected)


def test_unknown_routes_wrong_methods_and_oversized_bodies(registry, catalog):
    oversized = ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": "x" * (5 * 1024 * 1024)}})
    unknown, wrong_method, too_large = call(registry, catalog, ("GET", "/v1/nothing", {}), ("GET", "/v1/completions", {}), oversized)
    assert unknown.status_code == 404 and error_of(unknown)["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and error_of(wrong_method)["type"] == "invalid_request_error"
    assert too_large.status_code == 413 and error_of(too_large)["code"] == "request_too_large"


def test_a_valid_request_without_a_worker_gets_503_with_retry_after(registry, catalog):
    """The model cannot be activated (no worker is ready): after `worker_start_timeout_s`, 503, not a hang."""
    completion, health = call(registry, catalog, ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": "Hello", "max_tokens": 2}}),
                              ("GET", "/health", {}))
    assert completion.status_code == 503 and int(completion.headers["retry-after"]) >= 1
    assert "not available yet" in error_of(completion)["message"]
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert health.json()["workers"]["cpu"]["state"] == "stopped"


def test_admin_routes_refuse_without_the_token_and_answer_with_it(registry, catalog):
    disabled, = call(registry, catalog, ("GET", "/admin/models", {}))
    assert disabled.status_code == 403 and error_of(disabled)["code"] == "admin_disabled"
    wrong, right, unknown = call(
        registry, catalog,
        ("GET", "/admin/models", {"headers": {"authorization": "Bearer nope"}}),
        ("GET", "/admin/models", {"headers": {"authorization": f"Bearer {ADMIN_TOKEN}"}}),
        ("POST", "/admin/models/no-such-model/evict", {"headers": {"authorization": f"Bearer {ADMIN_TOKEN}"}}),
        admin=True,
    )
    assert wrong.status_code == 401
    assert right.status_code == 200 and {m["name"]: m["state"] for m in right.json()["models"]} == {
        "smollm2-135m-instruct": "inactive", TINY: "inactive"}
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "name"


def test_a_lone_surrogate_in_a_prompt_is_a_400_naming_the_field(registry, catalog):
    """Regression: `"prompt": "\\ud800"` (valid JSON, not valid Unicode) answered 500 and logged a traceback."""
    completion, chat_reply = call(
        registry, catalog,
        ("POST", "/v1/completions", {"content": b'{"model": "tiny-llama-random", "prompt": "\\ud800", "max_tokens": 2}',
                                     "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/chat/completions", {"content": b'{"model": "tiny-llama-random", "messages": [{"role": "user", '
                                          b'"content": [{"type": "text", "text": "a\\udfff"}]}]}',
                                          "headers": {"content-type": "application/json"}}),
    )
    assert completion.status_code == 400 and error_of(completion)["param"] == "prompt"
    assert "lone surrogate (U+D800)" in error_of(completion)["message"]
    assert chat_reply.status_code == 400 and error_of(chat_reply)["param"] == "messages.0.content.0.text"


def test_a_non_ascii_bearer_token_is_a_401(registry, catalog):
    """Regression: a non-ASCII bearer token answered 500 (hmac.compare_digest refuses non-ASCII str)."""
    refused, = call(registry, catalog, ("GET", "/admin/models", {"headers": {"authorization": "Bearer \xe9t\xe9".encode("latin-1")}}),
                    admin=True)
    assert refused.status_code == 401


def test_a_chunked_body_over_the_limit_is_a_413(registry, catalog):
    """Regression: a body without Content-Length (chunked) over `max_body_bytes` answered 400 ("error parsing")."""

    async def chunks():
        for _ in range(registry.server.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    too_big, small = call(registry, catalog, ("POST", "/v1/completions", {"content": chunks()}),
                          ("POST", "/v1/completions", {"content": _one_chunk(b'{"model": "nope", "prompt": "a"}'),
                                                       "headers": {"content-type": "application/json"}}))
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "request_too_large"
    assert small.status_code == 404  # a small chunked body is read whole and served as usual


def _one_chunk(data: bytes):
    async def gen():
        yield data
    return gen()


def test_unsupported_fields_name_themselves_and_a_405_says_allow(registry, catalog):
    """Regression: `param` was null for fields refused by a model validator (n, tools); 405 had no Allow."""
    n, tools, wrong_method = call(registry, catalog, chat(n=2), chat(tools=[{"type": "function", "function": {"name": "f"}}]),
                                  ("DELETE", "/v1/completions", {}))
    assert n.status_code == 400 and error_of(n)["param"] == "n" and not error_of(n)["message"].startswith("Value error")
    assert tools.status_code == 400 and error_of(tools)["param"] == "tools"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


def test_a_request_failed_by_an_eviction_says_when_to_retry():
    """Regression: the 503 of a request whose model was evicted under it came without Retry-After."""
    from controller.serving import ERROR_KINDS

    response = ERROR_KINDS["unavailable"]("the model was evicted (admin)").response()
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1


def test_a_long_prompt_is_tokenized_off_the_event_loop(registry, catalog, monkeypatch):
    """Regression: prompts were tokenized on the event loop; a 2 MB chat body held /health for 3.7 s on a
    2-core CPU. A long one (completion or chat) is now tokenized on a thread; a short one stays inline."""
    import threading

    from controller.tokenizer import ModelTokenizer

    seen: list[tuple[str, int, bool]] = []  # (what, characters, on the event loop's thread)
    for name in ("encode", "apply_chat_template"):
        real = getattr(ModelTokenizer, name)

        def recording(self, text, *args, _real=real, _name=name):
            size = len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)
            seen.append((_name, size, threading.current_thread() is threading.main_thread()))
            return _real(self, text, *args)

        monkeypatch.setattr(ModelTokenizer, name, recording)
    long = "a long prompt " * 2000
    responses = call(
        registry, catalog,
        ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": long, "max_tokens": 1}}),
        chat(messages=[{"role": "user", "content": long}]),
        ("GET", "/health", {}),
    )
    assert [r.status_code for r in responses[:2]] == [400, 400]  # longer than the model's context
    assert all("maximum context length" in error_of(r)["message"] for r in responses[:2])
    assert seen == [("encode", len(long), False), ("apply_chat_template", len(long), False)]
    seen.clear()
    call(registry, catalog, ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": "Hello", "max_tokens": 1}}))
    assert seen == [("encode", 5, True)]


def test_a_large_body_is_parsed_off_the_event_loop(registry, catalog, monkeypatch):
    """Regression: a 3.7 MiB completion of 792k token ids held /health for 0.6 s on a 2-core CPU: its JSON was
    parsed on the event loop, and its prompt validated as list[str] first (an error collected per id). A
    large body is now parsed on a thread; a small one stays inline."""
    import json
    import threading
    import types

    from controller import offloop_json

    seen: list[tuple[int, bool]] = []  # (bytes, on the event loop's thread)

    def loads(body):
        seen.append((len(body), threading.current_thread() is threading.main_thread()))
        return json.loads(body)

    monkeypatch.setattr(offloop_json, "json", types.SimpleNamespace(loads=loads))
    ids = list(range(10, 1000)) * 100
    large, small = call(registry, catalog,
                        ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": ids, "max_tokens": 1}}),
                        ("POST", "/v1/completions", {"json": {"model": TINY, "prompt": [5, 6], "max_tokens": 1}}))
    assert large.status_code == 400 and "maximum context length" in error_of(large)["message"]
    assert [(n > offloop_json.INLINE_BODY_BYTES, on_loop) for n, on_loop in seen] == [(True, False), (False, True)]


UNSUPPORTED = [  # (route, field, a value the server refuses, the one it accepts)
    ("/v1/completions", "n", 2, 1),
    ("/v1/completions", "presence_penalty", 0.5, 0),
    ("/v1/completions", "frequency_penalty", -1.0, 0.0),
    ("/v1/completions", "logit_bias", {"50": 1.0}, {}),
    ("/v1/completions", "repetition_penalty", 1.2, 1.0),
    ("/v1/completions", "echo", True, False),
    ("/v1/completions", "logprobs", 2, None),
    ("/v1/completions", "best_of", 3, 1),
    ("/v1/completions", "suffix", "end", None),
    ("/v1/chat/completions", "logprobs", True, False),
    ("/v1/chat/completions", "top_logprobs", 2, 0),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}], []),
    ("/v1/chat/completions", "tool_choice", "auto", "none"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}, {"type": "text"}),
]


def test_the_openapi_schema_refuses_what_the_server_refuses(registry, catalog):
    """Regression: /openapi.json accepted values the server rejects (`n: 2`, penalties, `echo`, `tools`,
    ...), so clients generated from it, and schema fuzzers, sent requests that could only fail."""
    import jsonschema

    spec = create_app(registry, default_cache_dir()).openapi()
    validators = {}
    for route, component in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        schema = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
        validators[route] = jsonschema.Draft202012Validator(schema)
    bases = {"/v1/completions": {"model": TINY, "prompt": "Hi", "max_tokens": 1},
             "/v1/chat/completions": {"model": TINY, "messages": QUESTION, "max_tokens": 1}}
    refused = call(registry, catalog, *(("POST", route, {"json": {**bases[route], field: bad}}) for route, field, bad, _ in UNSUPPORTED))
    for (route, field, bad, good), response in zip(UNSUPPORTED, refused):
        assert response.status_code == 400 and error_of(response)["param"] == field, (field, response.text)
        assert not validators[route].is_valid({**bases[route], field: bad}), f"the schema accepts {field}={bad!r}"
        assert validators[route].is_valid({**bases[route], field: good}), f"the schema refuses {field}={good!r}"


@pytest.mark.parametrize("host, keys, limited", [("127.0.0.1", False, False), ("127.0.0.1", True, True),
                                                 ("0.0.0.0", False, True), ("::", True, True)])
def test_cold_loads_are_budgeted_per_caller_for_tenants_and_for_a_server_open_to_the_network(registry, catalog, monkeypatch, host, keys, limited):
    """Regression: with no API keys, anyone who could reach the port could force activations and evictions
    without limit. `caller_activations: auto` now budgets them per key, or per address beyond loopback."""
    monkeypatch.setenv("PRISM_TEST_KEYS", "k1,k2")
    server_config = registry.server.model_copy(update={"host": host, "api_keys_env": "PRISM_TEST_KEYS" if keys else None})
    server = Server(registry.model_copy(update={"server": server_config}), dict(catalog), default_cache_dir())
    assert (server._activation_budget() is not None) == limited


def test_a_request_waiting_for_its_model_gets_504_at_its_own_deadline(registry, catalog):
    """Regression (found by benchmarks/chaos.py): a request waiting for its model to be activated waited up
    to `worker_start_timeout_s` (300 s), then its `request_timeout_s` began; clients waited 180 s and more
    with no answer. The request's deadline now counts from its arrival and bounds that wait."""
    import time

    server_config = registry.server.model_copy(update={"worker_start_timeout_s": 60.0, "request_timeout_s": 0.5})
    started = time.monotonic()
    (response,) = call(registry.model_copy(update={"server": server_config}), catalog, chat(stream=True))
    assert time.monotonic() - started < 30
    assert response.status_code == 504 and error_of(response)["code"] == "timeout"
    assert "within 0.5 s" in error_of(response)["message"]


def test_a_model_that_cannot_be_activated_is_a_503_saying_why_even_with_a_short_request_deadline(registry, catalog):
    """The wait for a model is bounded by the request's deadline (a 504 when it runs out), but a model that
    cannot be activated at all (here larger than the CPU budget) is still a 503 that says why, at once."""
    memory = registry.memory.model_copy(update={"cpu_budget_bytes": 64 * 2**20})
    server_config = registry.server.model_copy(update={"worker_start_timeout_s": 60.0, "request_timeout_s": 5.0})
    (response,) = call(registry.model_copy(update={"server": server_config, "memory": memory}), catalog,
                       chat(model="smollm2-135m-instruct"))
    assert response.status_code == 503 and "more than memory.cpu_budget_bytes" in error_of(response)["message"]
