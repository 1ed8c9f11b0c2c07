"""Several models time-sharing one GPU: the worker's step loop with and without cross-model overlap.

    python benchmarks/overlap.py [--mix llama-3.1-8b llama-3.1-8b ...] [--requests 32] [--repeats 2]

Every model of the mix (default: Prism's 8, 3x 8B + 3B + 4x 1B, dummy bf16 weights) is resident in one
page pool with its own engine, as in a worker. Each gets `--requests` requests at once (prompt and
output lengths drawn from a seeded distribution, the same in every run), and the prism local scheduler
steps them to the end through `StepLoop`. Baseline in the same run: the same loop with overlap off
(each step finished before the next is planned). Measured: wall time and output tokens/s for the same
requests in both modes. One unmeasured run of each mode first (kernel variants compile on first use),
then runs alternate baseline / overlap.
Writes JSON with command, date and card; prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory import PagePool  # noqa: E402
from memory.cuda_backend import CudaBackend  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402
from scheduler.sequence import Sequence  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.contract.messages import ModelSpec, SamplingParams  # noqa: E402
from workers.step_loop import StepLoop, model_queue  # noqa: E402

PRISM_MIX = ["llama-3.1-8b"] * 3 + ["llama-3.2-3b"] + ["llama-3.2-1b"] * 4


def make_engines(mix: list[str], pool: PagePool, max_num_seqs: int) -> dict[str, Engine]:
    engines = {}
    for index, shape in enumerate(mix):
        config = json.loads((ROOT / "configs" / "shapes" / f"{shape}.json").read_text())
        spec = ModelSpec(
            name=f"{shape}-{index}", weights_dir=None, hf_config=config, load_format="dummy", dtype="bfloat16",
            max_model_len=4096, block_size=16, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
            eos_token_ids=[], seed=index, ttft_slo_s=2.0, tpot_slo_s=0.2,
        )
        engine = Engine(spec, torch.device("cuda:0"), pool)
        engine.activate()
        engines[spec.name] = engine
    return engines


def workload(engines: dict[str, Engine], requests: int, seed: int) -> list[tuple[str, list[int], int]]:
    """(model, prompt, output length) per request: prompts 16-1024 tokens, outputs 16-256 (log-uniform)."""
    rng = random.Random(seed)
    jobs = []
    for name, engine in engines.items():
        for _ in range(requests):
            prompt_len = int(2 ** rng.uniform(4, 10))
            output_len = int(2 ** rng.uniform(4, 8))
            prompt = [rng.randrange(engine.arch.vocab_size) for _ in range(prompt_len)]
            jobs.append((name, prompt, output_len))
    return jobs


def run(engines: dict[str, Engine], jobs, overlap: bool) -> dict:
    scheduler = LocalScheduler("prism")
    for engine in engines.values():
        scheduler.add_model(model_queue(engine))
    loop = StepLoop(scheduler, engines, overlap)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for index, (name, prompt, output_len) in enumerate(jobs):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
        scheduler.add(Sequence(f"r{index}", name, prompt, output_len, time.time(), params, min_tokens=output_len))
    tokens = 0
    while scheduler.has_work():
        for outcome in loop.advance():
            tokens += len(outcome.sampled)
    wall_s = time.perf_counter() - started
    return {"overlap": overlap, "wall_s": wall_s, "output_tokens": tokens, "tokens_per_s": tokens / wall_s,
            "steps": loop.num_steps, "overlapped_steps": loop.num_overlapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", nargs="+", default=PRISM_MIX, help="model shapes (configs/shapes/*.json)")
    parser.add_argument("--requests", type=int, default=32, help="requests per model, all arriving at once")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-gib", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    pool = PagePool(CudaBackend("cuda:0"), int(args.pool_gib * 1024**3))
    engines = make_engines(args.mix, pool, args.max_num_seqs)
    jobs = workload(engines, args.requests, seed=0)
    for overlap in (False, True):  # warm-up: Triton variants of every batch shape, allocator, pinned buffers
        run(engines, jobs, overlap)
    runs = [run(engines, jobs, overlap) for _ in range(args.repeats) for overlap in (False, True)]
    summary = {}
    for overlap in (False, True):
        mine = [r for r in runs if r["overlap"] is overlap]
        summary["overlap" if overlap else "serial"] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
        }
    ratio = summary["overlap"]["tokens_per_s"] / summary["serial"]["tokens_per_s"]
    result = {
        "benchmark": "overlap",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(0),
        "mix": args.mix,
        "requests_per_model": args.requests,
        "runs": runs,
        "summary": summary,
        "overlap_vs_serial": ratio,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(f"\n{'mode':8} {'tok/s':>8} {'wall s':>7}")
    for mode, row in summary.items():
        print(f"{mode:8} {row['tokens_per_s']:8.0f} {row['wall_s']:7.2f}")
    print(f"overlap / serial: {ratio:.2f}x")


if __name__ == "__main__":
    main()
