"""What one engine step costs on the GPU: decodes alone (CUDA graph or eager) and decodes with a prefill.

    python benchmarks/step_cost.py --model llama-3.1-8b --decodes 32 128 --prefill 16 64 256 1024

Under load the replay's steps are mostly mixed: a model's running decodes plus the first chunk of a
request that just arrived. The engine runs a mixed step as graph replays (its decodes in a decode graph
and its prompt in a prefill graph, or the whole step in a prefill graph below `split_min_decodes`
decodes; eager above the largest prefill graph), so
this separates what a step pays for its decodes, for running eager, and for its prefill tokens, and
whether the host's launches keep ahead of the device (`launch_s`: the time to queue the step; when it
is close to `step_s` the device waited for Python). Sequences start from 256-token prompts.

Step times are wall time from a synchronised start to the sampled tokens on the host (the worker's
step, without overlap); medians of `--repeats`. Writes JSON with command, date and card.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import make_runner  # noqa: E402
from workers.contract.messages import SamplingParams  # noqa: E402
from workers.offline import OfflineRunner  # noqa: E402

PROMPT_TOKENS = 256


def timed_step(runner: OfflineRunner) -> tuple[float, float]:
    """(wall seconds of one step, seconds to queue it) from a synchronised start."""
    plan = runner.scheduler.schedule()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    pending = runner.engine.launch(plan)
    launched = time.perf_counter()
    sampled = pending.result()
    done = time.perf_counter()
    for seq in runner.scheduler.update(plan, sampled):
        runner.engine.release(seq.req_id)
    return done - started, launched - started


def add_sequences(runner: OfflineRunner, count: int, num_tokens: int, vocab: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=runner.spec.max_model_len - num_tokens - 64, ignore_eos=True)
    seqs = [runner._sequence(torch.randint(0, vocab, (num_tokens,), generator=generator).tolist(), params) for _ in range(count)]
    for seq in seqs:
        runner.scheduler.add(seq)
    return [seq.req_id for seq in seqs]


def decodes_running(runner: OfflineRunner) -> int:
    return sum(len(q.running) for q in runner.scheduler.queues.values())


def settle(runner: OfflineRunner) -> None:
    """Step until every sequence is decoding (all prefills done), then once more."""
    while any(q.waiting or any(s.is_prefilling for s in q.running) for q in runner.scheduler.queues.values()):
        runner.step()
    runner.step()


def median_step(runner: OfflineRunner, repeats: int) -> dict:
    times = [timed_step(runner) for _ in range(repeats)]
    return {"step_s": statistics.median(t for t, _ in times), "launch_s": statistics.median(q for _, q in times)}


def measure(runner: OfflineRunner, decodes: int, prefills: list[int], repeats: int, vocab: int) -> dict:
    """Step costs with `decodes` sequences decoding; every sequence is gone again at the end.

    `mixed_N`: the decodes and an N-token prompt in one step as the engine runs it (see the module's
    docstring); `mixed_N_eager`: the same step as one eager forward; `decode_eager`: the decodes alone,
    eager."""
    req_ids = add_sequences(runner, decodes, PROMPT_TOKENS, vocab, seed=decodes)
    settle(runner)
    graphs = runner.engine.graphs
    result = {"decodes": decodes, "split": graphs is not None and decodes >= runner.engine.split_min_decodes,
              "decode_graph": median_step(runner, repeats)}
    try:
        for num_tokens in prefills:
            result[f"mixed_{num_tokens}"] = mixed_step(runner, num_tokens, repeats, vocab)
        if graphs is not None:
            with eager_only(runner):
                median_step(runner, 2)  # first eager step at this batch: kernel variants
                result["decode_eager"] = median_step(runner, repeats)
                for num_tokens in prefills:
                    result[f"mixed_{num_tokens}_eager"] = mixed_step(runner, num_tokens, repeats, vocab)
    finally:
        for req_id in req_ids:
            abort(runner, req_id)
    return result


def mixed_step(runner: OfflineRunner, num_tokens: int, repeats: int, vocab: int) -> dict:
    samples = [step_with_prompt(runner, num_tokens, vocab, seed=1000 * num_tokens + repeat) for repeat in range(repeats + 1)]
    samples = samples[1:]  # the first compiles this prompt length's variants
    return {"step_s": statistics.median(t for t, _ in samples), "launch_s": statistics.median(q for _, q in samples)}


def profile_eager_steps(runner: OfflineRunner, decodes: int, prefills: list[int], vocab: int, directory: Path) -> None:
    """Torch profiler tables of eager steps (decode-only, and with a prefill of each size): where the host's
    launch time goes, and which kernels the device runs."""
    from torch.profiler import ProfilerActivity, profile

    directory.mkdir(parents=True, exist_ok=True)
    req_ids = add_sequences(runner, decodes, PROMPT_TOKENS, vocab, seed=decodes)
    settle(runner)
    try:
        with eager_only(runner):
            for label, num_tokens in [("decode", 0), *((f"mixed_{n}", n) for n in prefills)]:
                for seed in (7, 7):  # warm
                    step_with_prompt(runner, num_tokens, vocab, seed)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for repeat in range(3):
                        step_with_prompt(runner, num_tokens, vocab, 8 + repeat)
                host = cProfile.Profile()
                host.enable()
                for repeat in range(3):
                    step_with_prompt(runner, num_tokens, vocab, 8 + repeat)
                host.disable()
                listing = io.StringIO()
                pstats.Stats(host, stream=listing).sort_stats("tottime").print_stats(45)
                averages = prof.key_averages()
                text = (f"{label}, {decodes} decodes, 3 steps\n\nby host time\n"
                        + averages.table(sort_by="self_cpu_time_total", row_limit=40)
                        + "\n\nby device time\n" + averages.table(sort_by="self_cuda_time_total", row_limit=25)
                        + "\n\nPython functions by own time (cProfile, 3 more steps)\n" + listing.getvalue())
                (directory / f"{label}.txt").write_text(text)
    finally:
        for req_id in req_ids:
            abort(runner, req_id)


def step_with_prompt(runner: OfflineRunner, num_tokens: int, vocab: int, seed: int) -> tuple[float, float]:
    """One timed step of the running decodes plus a new `num_tokens`-token prompt (none for 0), which is
    dropped again after it, so the batch stays as it was."""
    req_ids = add_sequences(runner, 1, num_tokens, vocab, seed) if num_tokens else []
    timing = timed_step(runner)
    for req_id in req_ids:
        abort(runner, req_id)
    return timing


@contextlib.contextmanager
def eager_only(runner: OfflineRunner) -> Iterator[None]:
    """Every step an eager forward (the decode and prefill graphs refuse every batch) inside the block."""
    graphs = [g for g in (runner.engine.graphs, runner.engine.prefill_graphs) if g is not None]
    saved = [g.can_run for g in graphs]
    for g in graphs:
        g.can_run = lambda *shape: False
    try:
        yield
    finally:
        for g, can_run in zip(graphs, saved):
            g.can_run = can_run


def abort(runner: OfflineRunner, req_id: str) -> None:
    runner.scheduler.abort(req_id)
    runner.engine.release(req_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b", help="a shape under configs/shapes/")
    parser.add_argument("--decodes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--prefill", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-gib", type=float, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also write torch profiler tables (host and device time per op) of eager steps here")
    args = parser.parse_args()
    shape = ROOT / "configs" / "shapes" / f"{args.model}.json"
    if not shape.is_file():
        parser.error(f"no shape {args.model!r}; configs/shapes has {sorted(p.stem for p in shape.parent.glob('*.json'))}")
    config = json.loads(shape.read_text())
    vocab = config["vocab_size"]
    runner = make_runner(config, max_num_seqs=max(args.decodes) + 1, budget_bytes=int(args.budget_gib * 1024**3))
    points = []
    try:
        for decodes in args.decodes:
            point = measure(runner, decodes, args.prefill, args.repeats, vocab)
            points.append(point)
            cells = ", ".join(f"{k} {v['step_s'] * 1e3:.2f} ms (launch {v['launch_s'] * 1e3:.2f})"
                              for k, v in point.items() if isinstance(v, dict))
            print(f"{args.model} decodes {decodes}: {cells}", flush=True)
        if args.profile is not None:
            profile_eager_steps(runner, max(args.decodes), args.prefill, vocab, args.profile / args.model)
    finally:
        runner.close()
    result = {
        "benchmark": "step_cost",
        "command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "model": args.model,
        "prompt_tokens": PROMPT_TOKENS,
        "points": points,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
