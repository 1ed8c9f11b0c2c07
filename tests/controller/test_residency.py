"""Residency: what the controller believes a worker holds and what the worker holds are reconciled.

The real controller (`Server.build`: channel, worker handles, model manager, serving) talks over its real
ZMQ channel to a scripted peer that speaks the worker's side of the contract and, unlike a real worker,
can be made to disagree with the controller. Each disagreement must be logged as an error and repaired;
a request routed to a worker that does not hold its model is routed again, not failed.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import msgspec
import pytest
import zmq
import zmq.asyncio

from controller.app import create_app
from controller.catalog import build_catalog
from controller.registry import default_registry_path, load_registry
from controller.server import Server
from scheduler.cluster import ModelState
from workers.contract import messages as m
from workers.contract.channel_keys import as_client, channel_keys
from workers.contract.prepare import default_cache_dir

TINY = "tiny-llama-random"
SMOL = "smollm2-135m-instruct"
POOL = m.PoolStats(2 * 2**30, 2 * 2**20, 0, 1024, 0, {}, {})


@pytest.fixture(scope="module")
def catalog(prepared_smollm2):
    return build_catalog(load_registry(default_registry_path()), default_cache_dir())


def stats(name: str) -> m.ModelStats:
    return m.ModelStats(name, True, 0, 0, 0, 64, 0, 0)


class Peer:
    """The worker's side of the channel, scripted: it answers what it is sent as its sets below say."""

    def __init__(self, address: str, secret: str | None, worker_id: str = "cpu"):
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        if secret is not None:  # None: a plain connection, as any local process could make
            as_client(self.socket, channel_keys(secret))
        self.socket.connect(address)
        self.worker_id = worker_id
        self.received: list[m.ToWorker] = []
        self.holds: set[str] = set()  # what this peer reports as resident
        self.not_resident_once: set[str] = set()  # refuse the next request of these models as not resident
        self.preparing: set[str] = set()  # activations of these wait (as for a preparation) until cancelled
        self._handled = asyncio.Condition()  # notified after each message the peer has answered

    def send(self, message: m.FromWorker) -> None:
        self.socket.send(m.encode(message))

    def heartbeat(self) -> None:
        self.send(m.Heartbeat(self.worker_id, [stats(n) for n in sorted(self.holds)], POOL, 0))

    async def join(self) -> m.Configure:
        self.send(m.Hello(self.worker_id, "cpu", 4242))
        configure = m.decode_to_worker(await self.socket.recv())
        self.send(m.WorkerReady(self.worker_id, "cpu", 4242, POOL.budget_bytes))
        return configure

    async def serve(self) -> None:
        """Answer as a worker would: activations succeed, requests get two tokens (or a refusal)."""
        while True:
            message = m.decode_to_worker(await self.socket.recv())
            self.received.append(message)
            self._answer(message)
            async with self._handled:
                self._handled.notify_all()

    async def handled(self, predicate, timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds, checking it after each message the peer answers."""
        async with self._handled:
            await asyncio.wait_for(self._handled.wait_for(predicate), timeout_s)

    def _answer(self, message: m.ToWorker) -> None:
        if isinstance(message, m.Activate) and message.spec.name in self.preparing:
            return  # answered when cancelled, as a worker still preparing the model would
        if isinstance(message, m.CancelActivation) and message.name in self.preparing:
            self.heartbeat()
            self.send(m.ModelActivated(message.name, "cancelled: no request waits for it", "cancelled"))
        elif isinstance(message, m.Activate):
            self.holds.add(message.spec.name)
            self.heartbeat()  # a worker's state goes out before its reply
            self.send(m.ModelActivated(message.spec.name, None))
        elif isinstance(message, m.Evict):
            self.holds.discard(message.name)
            self.heartbeat()
            self.send(m.ModelEvicted(message.name))
        elif isinstance(message, m.Generate) and message.model in self.not_resident_once:
            self.not_resident_once.discard(message.model)
            self.holds.discard(message.model)
            self.send(m.StepOutputs([m.TokenDelta(message.req_id, [], "error", "not resident here", "not_resident")]))
        elif isinstance(message, m.Generate):
            self.send(m.StepOutputs([m.TokenDelta(message.req_id, [72]), m.TokenDelta(message.req_id, [105], "length")]))

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


async def state_reaches(runtime, state: ModelState, timeout_s: float = 10.0) -> None:
    """Wait until the controller's runtime is in `state`, woken by each of its state changes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while runtime.state is not state:
        await runtime.changed(deadline - asyncio.get_running_loop().time())


def client_of(server) -> httpx.AsyncClient:
    """An in-process HTTP client of the server's app (its workers are the scripted peer)."""
    app = create_app(server.registry, default_cache_dir(), server)
    app.state.server = server
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://prism.test")


def run(catalog, scenario) -> None:
    """Build the controller, join the peer, activate the tiny model through the admin path, run `scenario`."""

    async def main():
        registry = load_registry(default_registry_path())
        server = Server(registry, dict(catalog), default_cache_dir())
        await server.build()
        peer = Peer(server.channel.address, server.channel.secret)
        configure = await peer.join()
        assert configure.config == registry.worker_config(server.store_prefix, default_cache_dir())
        serving = asyncio.create_task(peer.serve())
        try:
            assert await server.workers["cpu"].wait_ready(10)
            await server.manager.activate(TINY)
            await scenario(server, peer)
        finally:
            serving.cancel()
            await server.stop(drain_timeout_s=0)
            peer.close()

    asyncio.run(main())


def repairs(server, model: str) -> list[dict]:
    return [e for e in server.events.recent(100, model) if e["kind"] == "residency_repaired"]


def test_a_model_the_worker_no_longer_lists_is_marked_inactive_with_an_error(catalog, caplog):
    async def scenario(server, peer):
        runtime = server.manager.runtimes[TINY]
        assert (runtime.state, runtime.device) == (ModelState.ACTIVE, "cpu")
        peer.holds.clear()
        with caplog.at_level(logging.ERROR, logger="prism.controller"):
            peer.heartbeat()
            await state_reaches(runtime, ModelState.INACTIVE)
        assert runtime.device is None and len(repairs(server, TINY)) == 1
        assert any("residency" in r.getMessage() and TINY in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)

    run(catalog, scenario)


def test_a_model_held_by_a_worker_the_controller_does_not_place_it_on_is_evicted_there(catalog):
    async def scenario(server, peer):
        assert server.manager.runtimes[SMOL].state is ModelState.INACTIVE
        peer.holds.add(SMOL)  # the worker says it holds a model the controller never activated
        peer.heartbeat()
        await peer.handled(lambda: any(isinstance(x, m.Evict) and x.name == SMOL for x in peer.received))
        assert server.manager.runtimes[SMOL].state is ModelState.INACTIVE and len(repairs(server, SMOL)) == 1
        assert SMOL not in peer.holds

    run(catalog, scenario)


def test_a_request_refused_as_not_resident_is_routed_again_and_completes(catalog):
    async def scenario(server, peer):
        peer.not_resident_once.add(TINY)
        async with client_of(server) as client:
            response = await client.post("/v1/completions", json={"model": TINY, "prompt": "Hello", "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length" and response.json()["usage"]["completion_tokens"] == 2
        generates = [x for x in peer.received if isinstance(x, m.Generate)]
        activations = [x for x in peer.received if isinstance(x, m.Activate) and x.spec.name == TINY]
        assert len(generates) == 2 and generates[0].req_id == generates[1].req_id  # the same request, routed twice
        assert len(activations) == 2  # once by the admin call, once to repair the disagreement
        assert len(repairs(server, TINY)) == 1
        assert server.manager.runtimes[TINY].num_in_flight == 0

    run(catalog, scenario)


def test_an_activation_whose_requests_all_left_is_cancelled(catalog):
    async def scenario(server, peer):
        peer.preparing.add(SMOL)
        async with client_of(server) as client:
            request = asyncio.ensure_future(client.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 2}))
            runtime = server.manager.runtimes[SMOL]
            await state_reaches(runtime, ModelState.ACTIVATING)
            request.cancel()  # the client goes away while the model is still being prepared
        await state_reaches(runtime, ModelState.INACTIVE)
        assert any(isinstance(x, m.CancelActivation) and x.name == SMOL for x in peer.received)
        assert [e["kind"] for e in server.events.recent(100, SMOL)][-1] == "activation_cancelled"
        assert runtime.error is None and runtime.num_in_flight == 0

    run(catalog, scenario)


def test_an_activation_an_operator_asked_for_is_not_cancelled_when_requests_leave(catalog):
    async def scenario(server, peer):
        runtime = server.manager.runtimes[TINY]
        await server.manager.evict(TINY)
        peer.preparing.add(TINY)
        admin = asyncio.ensure_future(server.manager.activate(TINY))
        await state_reaches(runtime, ModelState.ACTIVATING)
        server.manager.executor.cancel_if_unwanted(runtime)  # what a departing request does
        assert not any(isinstance(x, m.CancelActivation) for x in peer.received)
        admin.cancel()

    run(catalog, scenario)


@pytest.mark.parametrize("secret", [None, "not the secret"], ids=["plain", "wrong-secret"])
def test_a_peer_without_the_channel_secret_can_neither_join_nor_take_over_a_workers_identity(catalog, secret):
    """Regression: the channel had no authentication, and with ROUTER_HANDOVER any local process that
    connected as `cpu` took that worker's identity: it received its prompts and could inject outputs."""
    from zmq.utils.monitor import recv_monitor_message

    async def scenario(server, peer):
        intruder = Peer(server.channel.address, secret)  # the real worker's identity, without its secret
        monitor = intruder.socket.get_monitor_socket()
        try:
            intruder.send(m.Hello("cpu", "cpu", 666))
            refused = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                       zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_DISCONNECTED)
            while (await asyncio.wait_for(recv_monitor_message(monitor), 10))["event"] not in refused:
                pass  # connected at the TCP level; the CURVE handshake then fails
            await server.manager.evict(TINY)  # still routed to the real worker
            assert any(isinstance(x, m.Evict) and x.name == TINY for x in peer.received)
            assert server.workers["cpu"].pid == 4242  # the intruder's Hello never reached the controller
            assert await intruder.socket.poll(0) == 0  # and nothing reached the intruder
        finally:
            intruder.socket.disable_monitor()
            monitor.close(0)
            intruder.close()

    run(catalog, scenario)


def test_a_model_no_cpu_pool_can_hold_fails_its_requests_at_once_saying_why(catalog):
    """Regression: a model larger than `memory.cpu_budget_bytes` let its requests wait 300 s for "not
    available yet", and nothing was logged."""
    from controller.errors import Unavailable
    from controller.server import Server

    registry = load_registry(default_registry_path())
    registry = registry.model_copy(update={"memory": registry.memory.model_copy(update={"cpu_budget_bytes": 64 * 2**20})})
    server = Server(registry, catalog, default_cache_dir())
    assert set(server.beyond_budget) == {SMOL}  # the tiny model fits, SmolLM2 (float32) does not

    async def scenario():
        await server.build()
        try:
            with pytest.raises(Unavailable, match="more than memory.cpu_budget_bytes"):
                await asyncio.wait_for(server.manager.acquire(SMOL, 4, timeout_s=300), 5)  # at once, not after 300 s
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_the_pool_budget_a_heartbeat_reports_is_the_one_placement_plans_with(catalog):
    """A worker's pool shrinks as CUDA graphs are captured (their memory is charged to it): the controller
    planned with the budget of the worker's Ready message for good before."""

    async def scenario(server, peer):
        worker = server.workers["cpu"]
        assert worker.pool_budget_bytes == POOL.budget_bytes
        smaller = POOL.budget_bytes - 64 * 2**20
        taken = asyncio.Event()  # the heartbeat has no reply: wait for the controller to have handled it
        handled = worker.on_heartbeat

        def on_heartbeat(handle, message: m.Heartbeat) -> None:
            handled(handle, message)
            if message.pool.budget_bytes == smaller:
                taken.set()

        worker.on_heartbeat = on_heartbeat
        peer.send(m.Heartbeat(peer.worker_id, [stats(n) for n in sorted(peer.holds)],
                              msgspec.structs.replace(POOL, budget_bytes=smaller), 0))
        await asyncio.wait_for(taken.wait(), 10)
        assert worker.pool_budget_bytes == smaller
        assert {d.device_id: d.memory_bytes for d in server.manager.cluster_state().devices}["cpu"] == smaller

    run(catalog, scenario)
