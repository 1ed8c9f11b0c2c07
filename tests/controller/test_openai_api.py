"""The OpenAI API of the real server (demo registry, subprocess), through the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.controller.http_cases import INVALID_FIELDS, MALFORMED_BODIES
from tests.controller.server_process import wait_until

SMOL = "smollm2-135m-instruct"
TINY = "tiny-llama-random"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_are_listed(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {SMOL, TINY}
    assert all(m.object == "model" for m in models.values())
    assert all(m.root == m.id for m in models.values())  # `vllm bench serve` without --model crashed on KeyError: 'root'


def test_a_model_is_retrieved_by_its_id(client):
    """Regression: GET /v1/models/{id} answered 404, so `client.models.retrieve` failed."""
    model = client.models.retrieve(SMOL)
    assert model.id == SMOL and model.object == "model" and model.max_model_len > 0
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["param"] == "model"


def test_chat_answers_with_the_real_model(client, prepared_smollm2):
    response = client.chat.completions.create(model=SMOL, messages=QUESTION, temperature=0, max_tokens=30)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt_ids)
    # The answer's tokens plus the end-of-turn token that stopped it.
    assert response.usage.completion_tokens == len(tokenizer.encode(choice.message.content)) + 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_the_readme_call_without_sampling_fields_gets_the_registrys_greedy_default(client):
    greedy = client.chat.completions.create(model=SMOL, messages=QUESTION, temperature=0).choices[0].message.content
    defaults = [client.chat.completions.create(model=SMOL, messages=QUESTION).choices[0].message.content for _ in range(3)]
    assert defaults == [greedy] * 3 and "Paris" in greedy
    sampled = client.chat.completions.create(model=SMOL, messages=QUESTION, temperature=1.0, seed=3, max_tokens=12)
    assert sampled.choices[0].message.content != greedy  # a request's own temperature still wins


def test_completion_with_text_and_with_token_ids_agree(client, prepared_smollm2):
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    text = "The three primary colors are"
    by_text = client.completions.create(model=SMOL, prompt=text, temperature=0, max_tokens=12)
    by_ids = client.completions.create(model=SMOL, prompt=tokenizer.encode(text), temperature=0, max_tokens=12)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].finish_reason == "length" and by_text.usage.completion_tokens == 12
    assert by_text.usage.prompt_tokens == len(tokenizer.encode(text))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_deltas_concatenate_to_the_non_streamed_text(client, endpoint):
    kwargs = dict(model=SMOL, temperature=0, max_tokens=40)
    if endpoint == "chat":
        full = client.chat.completions.create(messages=QUESTION, **kwargs)
        chunks = list(client.chat.completions.create(messages=QUESTION, stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = full.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        full = client.completions.create(prompt="Once upon a time", **kwargs)
        chunks = list(client.completions.create(prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = full.choices[0].text
    assert text == expected and len(chunks) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and not usage_chunks[0].choices and chunks[-1] is usage_chunks[0]
    assert usage_chunks[0].usage.model_dump() == full.usage.model_dump()


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=TINY, prompt="hi", max_tokens=5, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    full = client.completions.create(model=SMOL, prompt="Count: one, two, three, four, five,", temperature=0, max_tokens=20).choices[0].text
    stop = full.strip().split()[1]  # a word from the middle of the greedy continuation
    cut = full[: full.index(stop)]
    response = client.completions.create(model=SMOL, prompt="Count: one, two, three, four, five,", temperature=0, max_tokens=20, stop=[stop])
    assert response.choices[0].text == cut and response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=SMOL, prompt="Count: one, two, three, four, five,", temperature=0, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=SMOL, prompt="My favourite food is", temperature=1.0, top_p=0.9, seed=7, max_tokens=16, extra_body={"top_k": 50})
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_max_completion_tokens_is_honoured(client):
    response = client.chat.completions.create(model=TINY, messages=QUESTION, max_completion_tokens=7, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_over_two_models_all_complete(async_client):
    async def one(i: int):
        model = SMOL if i % 2 else TINY
        return model, await async_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Say a number: {i}"}], max_tokens=12, extra_body={"ignore_eos": True}
        )

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 16
    for model, response in results:
        assert response.model == model
        assert response.usage.completion_tokens == 12 and response.choices[0].finish_reason == "length"


def _kv_in_use(server, model: str) -> tuple[int, int]:
    report = server.health()["workers"]["cpu"]
    stats = report["models"][model]
    return stats["num_kv_blocks_used"], report["pool"]["kv_pages_by_model"].get(model, 0)


def test_disconnected_stream_frees_its_kv_blocks(demo_server):
    wait_until(lambda: _kv_in_use(demo_server, SMOL) == (0, 0), 15, what="idle pool before the test")
    body = {"model": SMOL, "prompt": "Tell me a very long story.", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", demo_server.api_url + "/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            wait_until(lambda: _kv_in_use(demo_server, SMOL)[0] > 0, 15, what="KV blocks in use while streaming")
        # Leaving the block closes the connection mid-stream.
    wait_until(lambda: _kv_in_use(demo_server, SMOL) == (0, 0), 20, what="KV blocks and pages freed after the disconnect")
    assert demo_server.health()["workers"]["cpu"]["models"][SMOL]["num_running"] == 0


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_unknown_model_is_404(client):
    error = _error(lambda: client.chat.completions.create(model="no-such-model", messages=QUESTION))
    assert error.status_code == 404
    assert error.body["code"] == "model_not_found" and error.body["param"] == "model"


@pytest.mark.parametrize("extra, param", INVALID_FIELDS)
def test_invalid_fields_are_400_with_an_openai_body(client, extra, param):
    error = _error(lambda: client.chat.completions.create(model=TINY, messages=QUESTION, extra_body=extra, max_tokens=3))
    assert error.status_code == 400
    assert error.body["type"] == "invalid_request_error" and error.body["message"]
    if param:
        assert error.body["param"] == param


def test_prompt_plus_max_tokens_over_the_context_is_400(client):
    error = _error(lambda: client.completions.create(model=TINY, prompt="hello", max_tokens=4096))
    assert error.status_code == 400 and error.body["code"] == "context_length_exceeded"
    error = _error(lambda: client.completions.create(model=TINY, prompt=[5] * 3000, max_tokens=1))
    assert error.status_code == 400 and error.body["code"] == "context_length_exceeded"


def test_token_ids_outside_the_vocabulary_are_400(client):
    error = _error(lambda: client.completions.create(model=TINY, prompt=[1, 2, 10**6], max_tokens=1))
    assert error.status_code == 400 and error.body["param"] == "prompt"


@pytest.mark.parametrize("content, expected", MALFORMED_BODIES)
def test_malformed_bodies_are_400(demo_server, content, expected):
    response = httpx.post(demo_server.api_url + "/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = response.json()["error"]
    assert expected in body["message"] or body["param"] == expected
    assert set(body) == {"message", "type", "param", "code"}


def test_unknown_route_is_404_in_openai_format(demo_server):
    response = httpx.get(demo_server.base_url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_oversized_body_is_413(demo_server):
    response = httpx.post(demo_server.api_url + "/completions", json={"model": TINY, "prompt": "x" * (5 * 1024 * 1024)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_tokenize_and_detokenize_agree_with_the_models_tokenizer(demo_server, client, prepared_smollm2):
    """Regression: there was no POST /tokenize or /detokenize (vLLM's extensions), so `vllm bench serve`
    skipped its check that its tokenizer counts as the server's."""
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    base = demo_server.base_url
    text = "The capital of France is Paris. Ünïcödé too."
    tokens = httpx.post(f"{base}/tokenize", json={"model": SMOL, "prompt": text, "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["token_strs"] == tokenizer.convert_ids_to_tokens(tokens["tokens"]) and tokens["max_model_len"] == 8192
    chat = httpx.post(f"{base}/tokenize", json={"model": SMOL, "messages": QUESTION}).json()
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat["tokens"] == list(expected) and chat["token_strs"] is None
    usage = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=1).usage
    assert usage.prompt_tokens == chat["count"], "what /tokenize counts is what the request is charged"
    back = httpx.post(f"{base}/detokenize", json={"model": SMOL, "tokens": tokens["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(tokens["tokens"])}
    for path, body, param in (("/detokenize", {"model": SMOL, "tokens": [10**9]}, "tokens"),
                              ("/tokenize", {"model": "no-such-model", "prompt": "x"}, "model"),
                              ("/tokenize", {"model": SMOL, "prompt": "\ud800"}, "prompt")):
        refused = httpx.post(f"{base}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
        assert refused.status_code in (400, 404) and refused.json()["error"]["param"] == param, refused.text
