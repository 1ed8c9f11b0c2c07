"""OpenAI completions and chat completions over the engine client: one code path, two response formats.

A request is turned into a `Generation` (prompt token ids, sampling parameters, stop strings) by its
endpoint; from there streaming and non-streaming responses, usage counting, stop strings, timeouts,
errors and client disconnects are handled once for both endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from controller.auth import bearer
from controller.caller_budget import ActivationBudget, caller_of
from controller.catalog import CatalogEntry
from controller.engine_client import EngineClient, RoutedStream
from controller.errors import ActivationBudgetExceeded, APIError, ContextLengthExceeded, InvalidRequest, ModelNotFound, RequestTimeout, Unavailable, WorkerFailed
from controller.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    new_request_id,
    now_s,
)
from controller.metrics import Metrics
from controller.models import ModelManager
from controller.registry import ServerConfig
from controller.tokenizer import Detokenizer
from scheduler.cluster import ModelState
from workers.contract.messages import SamplingParams, TokenDelta

logger = logging.getLogger("prism.requests")

COLD_STATES = (ModelState.INACTIVE, ModelState.EVICTING)  # a request for the model starts an activation
WARMUP_HEADER = "x-prism-warmup"  # with OpenAIServing.warmup_token: the server's own warm-up, left out of the metrics

# Prompts of more characters are tokenized (chat template included) on threads of their own, not on the
# event loop: a 2 MB prompt took 3.3 s to tokenize on a 2-core CPU, and /health waited as long. Shorter
# ones stay on the loop (at most a few ms, about what the hop to a thread and back costs under load).
TOKENIZE_INLINE_CHARS = 2048
TOKENIZE_THREADS = 2  # long prompts tokenized at once; more wait for a thread (the loop's cores stay free)

ERROR_KINDS: dict[str | None, type[APIError]] = {
    "invalid_request": InvalidRequest,
    "unavailable": Unavailable,
    "not_resident": Unavailable,  # still refused after ROUTE_ATTEMPTS routes
    "internal": WorkerFailed,
    None: WorkerFailed,
}


@dataclass
class Generation:
    req_id: str
    entry: CatalogEntry
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str] | None
    stream: bool
    include_usage: bool
    created: int
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_output_tokens: int = 0
    counted: bool = True  # in the metrics; False for the server's own warm-up request (controller/warmup.py)

    def observe(self, delta: TokenDelta) -> None:
        if delta.token_ids:
            now = time.monotonic()
            self.first_token_s = self.first_token_s or now
            self.last_token_s = now
            self.num_output_tokens += len(delta.token_ids)


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its request was aborted. Nobody acts."""


class ResponseFormat(Protocol):
    def chunk(self, gen: Generation, text: str, finish_reason: str | None, first: bool) -> dict: ...

    def response(self, gen: Generation, text: str, finish_reason: str, usage: dict) -> dict: ...


class CompletionFormat:
    def chunk(self, gen, text, finish_reason, first):
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": gen.req_id, "object": "text_completion", "created": gen.created, "model": gen.entry.name, "choices": [choice]}

    def response(self, gen, text, finish_reason, usage):
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": gen.req_id, "object": "text_completion", "created": gen.created, "model": gen.entry.name, "choices": [choice], "usage": usage}


class ChatFormat:
    def chunk(self, gen, text, finish_reason, first):
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": gen.req_id, "object": "chat.completion.chunk", "created": gen.created, "model": gen.entry.name, "choices": [choice]}

    def response(self, gen, text, finish_reason, usage):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        return {"id": gen.req_id, "object": "chat.completion", "created": gen.created, "model": gen.entry.name, "choices": [choice], "usage": usage}


def _first_set(*values):
    """The request's value, else the model's default, else the API's."""
    return next(v for v in values if v is not None)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, models: ModelManager, client: EngineClient, limits: ServerConfig, metrics: Metrics | None = None,
                 activation_budget: ActivationBudget | None = None):
        self.models = models
        self.client = client
        self.limits = limits
        self.metrics = metrics
        self.activation_budget = activation_budget  # None: callers may cause any number of cold loads
        self.warmup_token = secrets.token_hex(16)  # a request carrying it in WARMUP_HEADER is the server's own
        self._tokenize_limiter: anyio.CapacityLimiter | None = None  # made on the event loop, at first use

    # --- endpoints --------------------------------------------------------------------------------

    def list_models(self) -> ModelList:
        created = now_s()
        return ModelList(data=[self._card(name, e, created) for name, e in self.models.entries.items()])

    def model_card(self, name: str) -> ModelCard:
        return self._card(name, self._entry(name), now_s())

    @staticmethod
    def _card(name: str, entry: CatalogEntry, created: int) -> ModelCard:
        return ModelCard(id=name, created=created, root=name, max_model_len=entry.max_model_len)

    async def completion(self, request: CompletionRequest, raw: Request):
        entry = self._entry(request.model)
        if isinstance(request.prompt, str):
            prompt_ids = await self._tokenize(len(request.prompt), entry.tokenizer.encode, request.prompt)
        else:
            prompt_ids = list(request.prompt)
            if max(prompt_ids) >= entry.arch.vocab_size:
                raise InvalidRequest(f"token ids must be below the vocabulary size {entry.arch.vocab_size}", param="prompt")
        gen = self._generation("cmpl", entry, request, prompt_ids, request.max_tokens)
        gen.counted = not self._is_warmup(raw)
        return await self._respond(gen, CompletionFormat(), raw)

    async def chat(self, request: ChatCompletionRequest, raw: Request):
        entry = self._entry(request.model)
        prompt_ids = await self._chat_prompt(entry, request.messages, request.add_generation_prompt)
        gen = self._generation("chatcmpl", entry, request, prompt_ids, request.requested_max_tokens)
        gen.counted = not self._is_warmup(raw)
        return await self._respond(gen, ChatFormat(), raw)

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        entry = self._entry(request.model)
        tokenizer = entry.tokenizer
        if isinstance(request, TokenizeChatRequest):
            ids = await self._chat_prompt(entry, request.messages, request.add_generation_prompt)
        else:
            ids = await self._tokenize(len(request.prompt), tokenizer.encode, request.prompt, request.add_special_tokens)
        strs = tokenizer.token_strs(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=entry.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        entry = self._entry(request.model)
        if any(t >= entry.arch.vocab_size for t in request.tokens):
            raise InvalidRequest(f"token ids must be below the vocabulary size {entry.arch.vocab_size}", param="tokens")
        return DetokenizeResponse(prompt=await self._tokenize(len(request.tokens), entry.tokenizer.decode, request.tokens))

    def _is_warmup(self, raw: Request) -> bool:
        return hmac.compare_digest(raw.headers.get(WARMUP_HEADER, "").encode("latin-1", "replace"), self.warmup_token.encode())

    # --- preparation ------------------------------------------------------------------------------

    async def _chat_prompt(self, entry: CatalogEntry, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """The token ids of chat messages through the model's chat template ("developer" speaks as "system")."""
        turns = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()} for msg in messages]
        size = sum(len(turn["content"]) for turn in turns)
        return await self._tokenize(size, entry.tokenizer.apply_chat_template, turns, add_generation_prompt)

    async def _tokenize(self, num_chars: int, tokenize, *args):
        """`tokenize(*args)`, off the event loop for a long text (TOKENIZE_INLINE_CHARS; for decoding, as
        many token ids). The tokenizers' Rust code releases the GIL, so the loop keeps serving meanwhile."""
        if num_chars <= TOKENIZE_INLINE_CHARS:
            return tokenize(*args)
        if self._tokenize_limiter is None:
            self._tokenize_limiter = anyio.CapacityLimiter(TOKENIZE_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(tokenize, *args), limiter=self._tokenize_limiter)

    def _entry(self, model: str) -> CatalogEntry:
        entry = self.models.entry(model)
        if entry is None:
            raise ModelNotFound(f"the model {model!r} does not exist; GET /v1/models lists the models", param="model")
        return entry

    def _generation(self, prefix: str, entry: CatalogEntry, request, prompt_ids: list[int], max_tokens: int | None) -> Generation:
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        limit = self.limits.max_prompt_tokens
        if limit is not None and num_prompt > limit:
            raise InvalidRequest(f"the prompt has {num_prompt} tokens; this server accepts at most {limit}",
                                 param="messages" if prefix == "chatcmpl" else "prompt")
        room = entry.max_model_len - num_prompt
        defaults = entry.sampling
        if max_tokens is None:
            max_tokens = room if defaults.max_tokens is None else min(room, defaults.max_tokens)
        if room <= 0 or max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {entry.max_model_len} tokens; the request has "
                f"{num_prompt} prompt tokens and asks for {max_tokens} more",
                param="max_tokens" if room > 0 else ("messages" if prefix == "chatcmpl" else "prompt"),
            )
        if request.min_tokens > max_tokens:
            raise InvalidRequest("`min_tokens` must not exceed `max_tokens`", param="min_tokens")
        stop_ids = request.stop_token_ids or []
        if any(t >= entry.arch.vocab_size for t in stop_ids):
            raise InvalidRequest(f"stop_token_ids must be below the vocabulary size {entry.arch.vocab_size}", param="stop_token_ids")
        sampling = SamplingParams(
            temperature=_first_set(request.temperature, defaults.temperature, 1.0),
            top_p=_first_set(request.top_p, defaults.top_p, 1.0),
            top_k=max(0, _first_set(request.top_k, defaults.top_k, 0)),
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Generation(new_request_id(prefix), entry, prompt_ids, sampling, request.stop, request.stream, include_usage, now_s())

    # --- running ----------------------------------------------------------------------------------

    async def _respond(self, gen: Generation, fmt: ResponseFormat, raw: Request):
        # Admission and the wait for a ready worker happen before the response starts, so that 429 / 503
        # reach streaming clients as real statuses.
        resources = contextlib.AsyncExitStack()
        try:
            self._charge_cold_load(gen.entry.name, raw)
            stream = await resources.enter_async_context(
                self.client.open_stream(gen.req_id, gen.entry.name, gen.prompt_token_ids, gen.sampling,
                                        gen.arrival_s + self.limits.request_timeout_s)
            )
        except APIError:
            self._record(gen, "rejected")
            raise
        if gen.stream:
            return StreamingResponse(self._events(gen, fmt, stream, resources), media_type="text/event-stream", headers={"x-request-id": gen.req_id})
        outcome = "abort"
        try:
            async with resources:
                body = await self._until_done_or_disconnect(self._collect(gen, fmt, stream), raw)
                outcome = body["choices"][0]["finish_reason"]
                return JSONResponse(body, headers={"x-request-id": gen.req_id})
        except APIError:
            outcome = "error"
            raise
        finally:
            self._record(gen, outcome)

    def _charge_cold_load(self, model: str, raw: Request) -> None:
        """A request for a model that is neither active nor on its way costs its caller one activation."""
        runtime = self.models.runtimes.get(model)
        if self.activation_budget is None or runtime is None or runtime.state not in COLD_STATES:
            return
        caller = caller_of(bearer(raw), raw.client.host if raw.client else None)
        wait_s = self.activation_budget.charge(caller)
        if wait_s is not None:
            budget = self.limits.caller_activations
            raise ActivationBudgetExceeded(
                f"model {model!r} is not active, and this caller has caused its {budget.per_minute:g} activations a "
                f"minute (bursts of {budget.burst}); active models still answer. Retry after {wait_s:.0f} s",
                retry_after_s=wait_s,
            )

    async def _collect(self, gen: Generation, fmt: ResponseFormat, stream: RoutedStream) -> dict:
        detok = gen.entry.tokenizer.detokenizer(gen.stop, gen.prompt_token_ids)
        finish_reason = None
        deadline = gen.arrival_s + self.limits.request_timeout_s  # the wait for its model counts too
        while finish_reason is None:
            finish_reason = self._advance(gen, detok, await self._next(stream, deadline))
        return fmt.response(gen, detok.delta(final=True), finish_reason, self._usage(gen, detok))

    async def _events(self, gen: Generation, fmt: ResponseFormat, stream: RoutedStream, resources: contextlib.AsyncExitStack) -> AsyncIterator[str]:
        outcome = "abort"  # unless it ends otherwise: the client went away
        try:
            async with resources:
                detok = gen.entry.tokenizer.detokenizer(gen.stop, gen.prompt_token_ids)
                deadline = gen.arrival_s + self.limits.request_timeout_s  # the wait for its model counts too
                first = True
                try:
                    finish_reason = None
                    while finish_reason is None:
                        finish_reason = self._advance(gen, detok, await self._next(stream, deadline))
                        text = detok.delta(final=finish_reason is not None)
                        if text or first or finish_reason:
                            yield _sse(self._with_usage(fmt.chunk(gen, text, finish_reason, first), gen))
                            first = False
                    outcome = finish_reason
                    if gen.include_usage:
                        final = fmt.chunk(gen, "", None, False) | {"choices": [], "usage": self._usage(gen, detok)}
                        yield _sse(final)
                except APIError as exc:
                    outcome = "error"
                    yield _sse(exc.body())
                yield _sse("[DONE]")
        finally:
            self._record(gen, outcome)

    def _advance(self, gen: Generation, detok: Detokenizer, delta: TokenDelta) -> str | None:
        """Feed one delta; return the finish reason once the request is done."""
        gen.observe(delta)
        if delta.finish_reason == "error":
            raise ERROR_KINDS.get(delta.error_kind, WorkerFailed)(delta.error or "the request failed")
        detok.add(delta.token_ids)
        if detok.stopped:
            return "stop"
        return delta.finish_reason

    async def _next(self, stream: RoutedStream, deadline: float) -> TokenDelta:
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(stream.next(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request did not finish within {self.limits.request_timeout_s:g} s") from None

    def _record(self, gen: Generation, outcome: str) -> None:
        e2e = time.monotonic() - gen.arrival_s
        context = {"req_id": gen.req_id, "model": gen.entry.name, "outcome": outcome, "prompt_tokens": len(gen.prompt_token_ids),
                   "completion_tokens": gen.num_output_tokens, "e2e_s": round(e2e, 4)}
        logger.log(logging.WARNING if outcome in ("error", "rejected") else logging.DEBUG, "request finished", extra=context)
        if self.metrics is None or not gen.counted:
            return
        ttft = tpot = None
        if gen.first_token_s is not None:
            ttft = gen.first_token_s - gen.arrival_s
            if gen.num_output_tokens > 1:
                tpot = (gen.last_token_s - gen.first_token_s) / (gen.num_output_tokens - 1)
        slo = gen.entry.config.slo
        self.metrics.request_finished(
            gen.entry.name, outcome, len(gen.prompt_token_ids) if outcome != "rejected" else 0, gen.num_output_tokens,
            ttft, tpot, e2e, slo.ttft_s, slo.tpot_s,
        )

    def _with_usage(self, chunk: dict, gen: Generation) -> dict:
        if gen.include_usage:
            chunk["usage"] = None
        return chunk

    @staticmethod
    def _usage(gen: Generation, detok: Detokenizer) -> dict:
        prompt = len(gen.prompt_token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": detok.num_tokens, "total_tokens": prompt + detok.num_tokens}

    @staticmethod
    async def _until_done_or_disconnect(work, raw: Request):
        """Run `work`; if the client disconnects first, cancel it (which aborts the request and frees its KV)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise ClientDisconnected()
        return task.result()


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
