"""OpenAI routes: thin; parse, hand to the serving object, return what it builds."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from controller.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}


def _server(request: Request):
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    report = _server(request).health()
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return _server(request).serving.list_models()


@router.post("/v1/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request):
    return await _server(request).serving.completion(body, request)


@router.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _server(request).serving.chat(body, request)
