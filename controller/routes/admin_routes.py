"""Admin REST API (token-protected): models with their state and memory, activation, eviction, pinning,
per-device memory, dry-run placement, run-time registry changes, and the lifecycle event log."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from controller.auth import require_admin
from controller.errors import ModelNotFound
from controller.protocol import ErrorResponse
from controller.registry import ModelConfig
from controller.registry_ops import Conflict

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 500, 503)},
)


class ActivateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str | None = Field(None, description="device to activate on (e.g. cuda:1); default: the scheduler's choice")


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = Field(description="device to move the model to (e.g. cuda:1)")


class EvictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drain_timeout_s: float | None = Field(None, ge=0, description="wait this long for running requests (default: registry)")


def _server(request: Request):
    return request.app.state.server


def _runtime(request: Request, name: str):
    runtime = _server(request).manager.runtimes.get(name)
    if runtime is None:
        raise ModelNotFound(f"the model {name!r} does not exist", param="name")
    return runtime


def _model_view(server, runtime) -> dict:
    import time

    rates = server.manager.rates.rates(time.monotonic(), runtime.name)
    worker = server.workers.get(runtime.device) if runtime.device else None
    stats = worker.model_stats(runtime.name) if worker else None
    page_bytes = int(server.registry.memory.page_bytes)
    config = runtime.entry.config
    return {
        "name": runtime.name,
        "state": runtime.state.value,
        "device": runtime.device,
        "also_on": runtime.also_on,  # a migration in flight: its destination, then its draining source
        "pinned": runtime.pinned,
        "error": runtime.error,
        "memory": {
            "weight_bytes": runtime.weight_bytes,
            "kv_pages": stats.kv_pages_mapped if stats else 0,
            "kv_bytes": (stats.kv_pages_mapped if stats else 0) * page_bytes,
            "kv_blocks_used": stats.num_kv_blocks_used if stats else 0,
            "kv_budget_bytes": runtime.kv_budget_bytes,
        },
        "rates": {
            "requests_per_s": rates.request_rate,
            "prompt_tokens_per_s": rates.prompt_token_rate,
            "decode_tokens_per_s": rates.decode_token_rate,
        },
        "queue": {
            "waiting_for_activation": runtime.num_waiting,
            "running": runtime.num_running,
            "worker_waiting": stats.num_waiting if stats else 0,
            "worker_running": stats.num_running if stats else 0,
        },
        "slo": {"ttft_s": config.slo.ttft_s, "tpot_s": config.slo.tpot_s, "attainment": server.metrics.slo_attainment(runtime.name)},
        "last_activation": runtime.last_activation,
        "preparation": server.manager.preparation(runtime.name),
        "max_model_len": runtime.entry.max_model_len,
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    server = _server(request)
    return {"models": [_model_view(server, r) for r in server.manager.runtimes.values()]}


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> dict:
    return _model_view(_server(request), _runtime(request, name))


@router.post("/models/{name}/activate")
async def activate(name: str, request: Request, body: ActivateBody | None = None) -> dict:
    _runtime(request, name)
    device = body.device if body else None
    if device is not None and device not in _server(request).workers:
        raise ModelNotFound(f"no worker on device {device!r}", param="device")
    return await _server(request).manager.activate(name, device)


@router.post("/models/{name}/migrate")
async def migrate(name: str, request: Request, body: MigrateBody) -> dict:
    """Move an active model to another device, make before break: it is loaded there while it keeps
    serving here, new requests switch, then the requests here finish and it is evicted here."""
    runtime = _runtime(request, name)
    if body.device not in _server(request).workers:
        raise ModelNotFound(f"no worker on device {body.device!r}", param="device")
    if runtime.pinned:
        raise Conflict(f"model {name!r} is pinned; unpin it first", param="name")
    return await _server(request).manager.migrate(name, body.device)


@router.post("/models/{name}/evict")
async def evict(name: str, request: Request, body: EvictBody | None = None) -> dict:
    runtime = _runtime(request, name)
    if runtime.pinned:
        raise Conflict(f"model {name!r} is pinned; unpin it first", param="name")
    return await _server(request).manager.evict(name, "admin", body.drain_timeout_s if body else None)


@router.post("/models/{name}/pin")
async def pin(name: str, request: Request) -> dict:
    _runtime(request, name)
    _server(request).manager.pin(name, True)
    return {"model": name, "pinned": True}


@router.post("/models/{name}/unpin")
async def unpin(name: str, request: Request) -> dict:
    _runtime(request, name)
    _server(request).manager.pin(name, False)
    return {"model": name, "pinned": False}


@router.get("/models/{name}/dry-run")
async def dry_run(name: str, request: Request) -> dict:
    """If this model were activated now: on which device, which models would be evicted, about how long."""
    _runtime(request, name)
    return _server(request).manager.dry_run(name)


@router.get("/devices")
async def devices(request: Request) -> dict:
    server = _server(request)
    result = {}
    for device, worker in server.workers.items():
        beat = worker.last_heartbeat
        pool = beat.pool if beat else None
        page = pool.page_bytes if pool else int(server.registry.memory.page_bytes)
        result[device] = {
            "worker": {"state": worker.state, "pid": worker.pid, "restarts": worker.num_restarts, "device": worker.device,
                       "joined": worker.remote},
            "budget_bytes": pool.budget_bytes if pool else worker.pool_budget_bytes,
            "weights_bytes": sum(pool.weight_pages_by_model.values()) * page if pool else 0,
            "kv_mapped_bytes": sum(pool.kv_pages_by_model.values()) * page if pool else 0,
            "free_bytes": pool.pages_free * page if pool else None,
            "reserve_bytes": pool.pages_reserved * page if pool else None,
            "models": {
                "weights": {m: n * page for m, n in pool.weight_pages_by_model.items()} if pool else {},
                "kv": {m: n * page for m, n in pool.kv_pages_by_model.items()} if pool else {},
            },
        }
    return {"devices": result}


@router.post("/models", status_code=201)
async def add_model(config: ModelConfig, request: Request) -> dict:
    return await _server(request).registry_ops.add(config)


@router.put("/models/{name}")
async def update_model(name: str, config: ModelConfig, request: Request) -> dict:
    return await _server(request).registry_ops.update(name, config)


@router.delete("/models/{name}")
async def remove_model(name: str, request: Request) -> dict:
    return await _server(request).registry_ops.remove(name)


@router.post("/registry/reload")
async def reload_registry(request: Request) -> dict:
    return await _server(request).registry_ops.reload()


@router.get("/events")
async def events(request: Request, limit: int = Query(100, ge=1, le=1000), model: str | None = None) -> dict:
    return {"events": _server(request).events.recent(limit, model)}
