"""OpenAI routes: thin; parse, hand to the serving object, return what it builds."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from controller.auth import require_api_key
from controller.offloop_json import OffLoopJSONRoute
from controller.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

router = APIRouter(route_class=OffLoopJSONRoute)
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], route_class=OffLoopJSONRoute)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}
_GENERATION = {
    200: {"description": "a completion (JSON), or a stream of chunks (server-sent events) with `stream: true`",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **_ERRORS,
}


def _server(request: Request):
    return request.app.state.server


@router.get("/health", responses={503: {"description": "a worker or a model is not ready"}})
async def health(request: Request) -> JSONResponse:
    report = _server(request).health()
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus exposition format."""
    return PlainTextResponse(_server(request).metrics.render(), media_type="text/plain; version=0.0.4")


@v1.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    return _server(request).serving.list_models()


@v1.get("/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return _server(request).serving.model_card(model_id)


@v1.post("/completions", responses=_GENERATION)
async def completions(body: CompletionRequest, request: Request):
    return await _server(request).serving.completion(body, request)


@v1.post("/chat/completions", responses=_GENERATION)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _server(request).serving.chat(body, request)


# vLLM's extensions, at the root as vLLM serves them (`vllm bench serve` checks its tokenizer against them).
extensions = APIRouter(dependencies=[Depends(require_api_key)])


@extensions.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> TokenizeResponse:
    """A prompt's token ids (`prompt`), or chat messages' through the model's chat template (`messages`)."""
    return await _server(request).serving.tokenize(body)


@extensions.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await _server(request).serving.detokenize(body)


router.include_router(v1)
router.include_router(extensions)
