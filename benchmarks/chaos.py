"""Chaos: trace traffic over an overcommitted registry while the worker is killed (`kill -9`) at moments of
each kind (mid-activation, mid-request, between requests); nothing may hang or be lost silently.

    python benchmarks/chaos.py --config configs/soak-swapping.yaml --duration 240 --kills 4 \
        --out benchmarks/results/chaos-cpu.json                                                   # CPU
    python benchmarks/chaos.py --config configs/prism-20models.yaml --gpu-memory-utilization 0.915 \
        --duration 600 --kills 10 --out benchmarks/results/chaos-h100.json                        # GPU

Traffic: the trace of `benchmarks/replay.py`'s options (Arena by default, models drawn by a popularity
law), prompts of random token ids, each request asking for exactly its trace's output length and its
usage. Kills: `--kills` moments spread over the run; each waits (up to 15 s) for its kind, in turn:
"mid-activation" (a model is activating), "mid-request" (a model holds KV: prefill or decode running),
"between requests" (nothing running); a mid-activation moment that traffic has not made by half the wait is
made (a model evicted and activated again through the admin API); past the wait it kills anyway and says so.

What must hold, and is reported:
  * every request completes (its stream ends with [DONE] and the output length asked for) or gets an error
    (an HTTP status or an error event); none hangs: the client's timeout is the server's
    `request_timeout_s` plus a margin, so a client timeout is a request the server never answered;
  * none is lost silently: a stream that ends without [DONE] and without an error, or short of its tokens;
  * after each kill the worker is replaced: `recovered_s` is the time from the kill to a health report
    with a new worker pid and every worker ready;
  * after the traffic, once every model is prepared again: each pool is at its idle level (no request's KV
    blocks, no capture scratch, every mapped page a model's weights or KV) and holds as many virtual address
    reservations, of as many bytes, as before the first kill; the server's weight images in /dev/shm (the
    host store) are as many as before the first kill (a restarted worker maps the images that outlived its
    predecessor); after SIGTERM, none is left.
Writes JSON (command, date, card).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.replay import (  # noqa: E402
    ADMIN_TOKEN,
    TraceRequest,
    _card,
    add_trace_arguments,
    policy_registry,
    sse_lines,
    start_policy_server,
    trace_jobs,
)
from tests.controller.server_process import stop_server, wait_until  # noqa: E402

KINDS = ("mid-activation", "mid-request", "between requests")
MARGIN_S = 60.0  # beyond the server's request timeout: a request unanswered this long hangs


async def send(client: httpx.AsyncClient, url: str, model: str, request: TraceRequest, rng: random.Random) -> dict:
    """One streamed completion; what became of it: completed, error (and what), hung, or lost."""
    want = max(1, request.output_len)
    body = {"model": model, "prompt": [rng.randrange(10, 1000) for _ in range(max(1, request.prompt_len))], "max_tokens": want,
            "min_tokens": want, "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    outcome = {"model": model, "sent_s": time.perf_counter()}
    done, tokens = False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {**outcome, "outcome": "error", "error": f"HTTP {response.status_code}: {(await response.aread())[:160]!r}"}
            async for line in sse_lines(response):
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {**outcome, "outcome": "error", "error": "event: " + chunk["error"]["message"][:160]}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.TimeoutException as exc:
        return {**outcome, "outcome": "hung", "error": f"{type(exc).__name__} after {time.perf_counter() - outcome['sent_s']:.0f} s"}
    except (httpx.HTTPError, ValueError) as exc:  # a connection the server dropped, a chunk that is not JSON
        return {**outcome, "outcome": "lost", "error": f"{type(exc).__name__}: {exc}"[:200]}
    if not done or tokens != want:
        return {**outcome, "outcome": "lost", "error": f"stream ended ({'[DONE]' if done else 'no [DONE]'}) with {tokens} of {want} tokens"}
    return {**outcome, "outcome": "completed"}


async def traffic(url: str, window: list[tuple[TraceRequest, str]], rate_scale: float, timeout_s: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        started, tasks = time.perf_counter(), []
        for request, model in window:
            delay = request.time_s / rate_scale - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, url, model, request, rng)))
        return await asyncio.gather(*tasks)


def health(base_url: str) -> dict:
    return httpx.get(base_url + "/health", timeout=30).json()


def moment_of(kind: str, report: dict) -> bool:
    models = report["models"].values()
    running = [m for w in report["workers"].values() for m in w.get("models", {}).values() if m.get("num_kv_blocks_used", 0) > 0]
    if kind == "mid-activation":
        return any(m["state"] == "activating" for m in models)
    if kind == "mid-request":
        return bool(running)
    return not running and not any(m["state"] == "activating" for m in models)


def start_an_activation(base_url: str) -> str | None:
    """Make a mid-activation moment where traffic made none: the last inactive model in the registry's order
    (or, with none, the last active one, evicted once its running requests drained) is activated through the
    admin API, in the background."""
    models = health(base_url)["models"]
    inactive = [name for name, model in models.items() if model["state"] == "inactive"]
    active = [name for name, model in models.items() if model["state"] == "active"]
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if not inactive and active:
        httpx.post(f"{base_url}/admin/models/{active[-1]}/evict", json={"drain_timeout_s": 5}, headers=headers, timeout=60)
    name = (inactive or active or [None])[-1]
    if name is not None:  # its answer does not matter: the kill fails it
        threading.Thread(target=lambda: httpx.post(f"{base_url}/admin/models/{name}/activate", headers=headers, timeout=300),
                         daemon=True).start()
    return name


def kill_once(server, kind: str, wait_s: float = 15.0) -> dict:
    """Wait (up to `wait_s`) for a moment of `kind`, kill the worker there, and time its replacement. Where
    traffic has made no mid-activation moment by half the wait, one is made (`start_an_activation`, up to
    three times: an activation can end between two looks)."""
    deadline, hit, made = time.monotonic() + wait_s, False, []
    while time.monotonic() < deadline:
        report = health(server.base_url)
        if moment_of(kind, report):
            hit = True
            break
        if kind == "mid-activation" and len(made) < 3 and time.monotonic() > deadline - wait_s / 2:
            if not made or report["models"].get(made[-1], {}).get("state") == "active":  # the last one ended unseen
                made.append(start_an_activation(server.base_url))
                deadline = max(deadline, time.monotonic() + 10)
            continue  # look again at once: an activation lasts milliseconds to a second
        time.sleep(0.02)
    (worker_id, worker), = report["workers"].items()
    pid = worker["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def replaced() -> bool:
        now = health(server.base_url)
        return all(w.get("pid") not in (None, pid) and w.get("state") == "ready" for w in now["workers"].values())

    wait_until(replaced, 180, 0.05, "the killed worker replaced")
    return {"kind": kind, "moment_found": hit, "activations_made_for": made, "worker": worker_id, "pid": pid, "recovered_s": time.monotonic() - killed,
            "at_s": killed}


def images(server_pid: int) -> list[str]:
    return sorted(glob.glob(f"/dev/shm/prism-weights-{server_pid}-*"))


def pool_levels(base_url: str) -> dict:
    """Each worker's pool as an idle comparison needs it: pages by use, KV blocks in use by model, the models
    whose CUDA graphs are captured, and the virtual address reservations."""
    levels = {}
    for wid, w in health(base_url)["workers"].items():
        models = w.get("models", {})
        levels[wid] = {
            "pages_mapped": w["pool"]["pages_mapped"], "weight_pages": sum(w["pool"]["weight_pages_by_model"].values()),
            "kv_pages": w["pool"]["kv_pages_by_model"], "scratch_pages": w["pool"]["scratch_pages"],
            "kv_blocks_used": {name: m["num_kv_blocks_used"] for name, m in models.items() if m.get("num_kv_blocks_used")},
            "with_graphs": sorted(name for name, m in models.items() if m.get("graphs_captured")),
            "ranges_reserved": w["pool"]["ranges_reserved"], "va_bytes_reserved": w["pool"]["va_bytes_reserved"],
        }
    return levels


def at_idle_level(before: dict, after: dict) -> bool:
    """No request's KV blocks (a model with CUDA graphs keeps one for its graphs' padded rows; mapped pages that
    no block uses may stay, as the KV space's hysteresis keeps them, for the pool to reclaim), no capture
    scratch, every mapped page a model's weights or KV, and the virtual address reservations of before the
    first kill."""
    return before.keys() == after.keys() and all(
        all(n <= (name in a["with_graphs"]) for name, n in a["kv_blocks_used"].items()) and not a["scratch_pages"]
        and a["pages_mapped"] == a["weight_pages"] + sum(a["kv_pages"].values())
        and (a["ranges_reserved"], a["va_bytes_reserved"]) == (before[w]["ranges_reserved"], before[w]["va_bytes_reserved"])
        for w, a in after.items())


def activations(base_url: str) -> dict[str, float]:
    """Model activations since the server started, by outcome, from its Prometheus metrics."""
    counts: Counter = Counter()
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("prism:model_activations_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] += float(line.rsplit(" ", 1)[1])
    return dict(counts)


def all_prepared(base_url: str) -> bool:
    models = httpx.get(base_url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).json()["models"]
    return all(m["preparation"] and all(s in ("prepared", "staged, graphs pending") for s in m["preparation"].values()) for m in models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "soak-swapping.yaml")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="the server's request_timeout_s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "chaos.json")
    add_trace_arguments(parser, duration_s=240.0, max_output=64)
    args = parser.parse_args()

    registry = policy_registry(args.config, "prism", None, 1.0, args.gpu_memory_utilization)
    registry["server"]["request_timeout_s"] = args.request_timeout
    rate_scale = args.rate_scales[0]
    result: dict = {"benchmark": "chaos", "command": " ".join(["python", *sys.argv]),
                    "date": datetime.now().astimezone().isoformat(timespec="seconds"), "config": str(args.config), "rate_scale": rate_scale}
    with tempfile.TemporaryDirectory() as workdir:
        server = start_policy_server(registry, "chaos", Path(workdir))
        try:
            result["card"] = _card() if any(d.startswith("cuda") for d in health(server.base_url)["workers"]) else "cpu"
            wait_until(lambda: all_prepared(server.base_url), 900, 0.5, "every model prepared")
            models = list(health(server.base_url)["models"])
            window = [(r, m) for r, m in trace_jobs(args, models) if r.time_s <= args.duration * rate_scale]
            images_before = images(server.process.pid)
            pools_before = pool_levels(server.base_url)
            activations_before = activations(server.base_url)
            outcomes: list[dict] = []
            runner = threading.Thread(target=lambda: outcomes.extend(asyncio.run(
                traffic(server.base_url, window, rate_scale, args.request_timeout + MARGIN_S, args.seed)))
            )
            started = time.monotonic()
            runner.start()
            kills = []
            for i in range(args.kills):
                due = started + args.duration * (i + 1) / (args.kills + 1)
                time.sleep(max(0.0, due - time.monotonic()))
                kill = kill_once(server, KINDS[i % len(KINDS)])
                kill["at_s"] -= started
                kills.append(kill)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in kill.items()}), flush=True)
            runner.join()
            traffic_s = time.monotonic() - started
            activated = Counter(activations(server.base_url))
            activated.subtract(activations_before)
            try:
                wait_until(lambda: all_prepared(server.base_url) and at_idle_level(pools_before, pool_levels(server.base_url)),
                           180, 0.5, "every model prepared again and the pool at its idle level")
            except AssertionError as exc:  # reported, not raised: the run's other findings still count
                print(f"not at the idle level: {exc}", flush=True)
            pools = pool_levels(server.base_url)
            images_after = images(server.process.pid)
        finally:
            exit_code = stop_server(server)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".server.log").write_text(server.log())
    left = images(server.process.pid)
    counts = Counter(o["outcome"] for o in outcomes)
    errors = Counter(o["error"].split(" (")[0][:90] for o in outcomes if o["outcome"] == "error")
    result.update({
        "duration_s": args.duration, "requests": len(outcomes), "outcomes": dict(counts), "errors": dict(errors.most_common(20)),
        "hung": [o for o in outcomes if o["outcome"] == "hung"][:20], "lost": [o for o in outcomes if o["outcome"] == "lost"][:20],
        "activations": dict(activated), "activations_per_minute": round(activated["ok"] * 60 / traffic_s, 2), "kills": kills, "recovered_s_max": max((k["recovered_s"] for k in kills), default=None),
        "pool_before_kills": pools_before, "pool_after": pools, "images_before_kills": len(images_before), "images_after_traffic": len(images_after),
        "exit_code_after_sigterm": exit_code, "left_in_dev_shm_after_exit": left,
    })
    result["pass"] = (not counts["hung"] and not counts["lost"] and at_idle_level(pools_before, pools)
                      and len(images_after) == len(images_before) and not left)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "outcomes", "errors", "activations_per_minute", "recovered_s_max", "pool_before_kills", "pool_after", "images_before_kills",
                                             "images_after_traffic", "left_in_dev_shm_after_exit", "pass")}, indent=1))


if __name__ == "__main__":
    main()
