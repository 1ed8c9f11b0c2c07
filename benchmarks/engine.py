"""GPU engine throughput vs transformers and vs the HBM roofline, one run, same dummy weights.

    python benchmarks/engine.py --model llama-3.1-8b [--batch-sizes 1 8 32 64] [--prefill 512 2048]

Decode: `--steps` decode steps after a 128-token prompt per sequence; TPOT = median step time.
Prefill: one sequence of N tokens, time to its first token. Roofline of a batch-1 decode step: weight
bytes / measured HBM bandwidth (a large device-to-device copy, bytes read + written).
transformers: `generate` on a model holding exactly the same weights, TPOT from the difference of two
generation lengths (so prefill cancels out). Writes JSON with command, date and card; prints a table.
"""

from __future__ import annotations

import argparse
import json
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
from workers.contract.messages import ModelSpec, SamplingParams  # noqa: E402
from workers.offline import OfflineRunner  # noqa: E402
from workers.contract.sizing import Arch  # noqa: E402
from workers.weights.checkpoint import iter_dummy  # noqa: E402


def copy_bandwidth(num_bytes: int = 2 * 1024**3) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * num_bytes / statistics.median(times)


def make_runner(config: dict, max_num_seqs: int, budget_bytes: int) -> OfflineRunner:
    spec = ModelSpec(
        name="bench", weights_dir=None, hf_config=config, load_format="dummy", dtype="bfloat16", max_model_len=4096,
        block_size=16, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096, eos_token_ids=[], seed=0, ttft_slo_s=2.0, tpot_slo_s=0.2,
    )
    return OfflineRunner(spec, "cuda:0", PagePool(CudaBackend("cuda:0"), budget_bytes))


def engine_decode_tpot(runner: OfflineRunner, batch_size: int, steps: int, vocab: int) -> float:
    """Median decode step time with `batch_size` sequences running (after their prefill)."""
    generator = torch.Generator().manual_seed(batch_size)
    prompts = [torch.randint(0, vocab, (128,), generator=generator).tolist() for _ in range(batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for seq in [runner._sequence(p, params) for p in prompts]:
        runner.scheduler.add(seq)
    step_times = []
    while runner.scheduler.has_work():
        decoding = all(not s.is_prefilling for q in runner.scheduler.queues.values() for s in q.running) and not any(
            q.waiting for q in runner.scheduler.queues.values()
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        runner.step()  # ends with the sampled tokens on the host: a full step
        if decoding:
            step_times.append(time.perf_counter() - started)
    return statistics.median(step_times[2:])


def engine_prefill_s(runner: OfflineRunner, num_tokens: int, vocab: int) -> float:
    prompt = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    runner.generate([prompt], params)  # warm-up (kernel compilation for this shape)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        runner.generate([prompt], params)
        times.append(time.perf_counter() - started)
    return min(times)


def hf_model(config: dict):
    """transformers' model holding exactly the engine's dummy weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.load_state_dict(dict(iter_dummy(Arch.from_hf_config(config), 0, "cuda", torch.bfloat16)), strict=False)
    return model.eval()


@torch.inference_mode()
def hf_decode_tpot(model, batch_size: int, vocab: int, steps: int) -> float:
    ids = torch.randint(0, vocab, (batch_size, 128), device="cuda")

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(2)
    return (run(steps + 1) - run(1)) / steps


@torch.inference_mode()
def hf_prefill_s(model, num_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, num_tokens), device="cuda")
    model(ids)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b", help="a shape under configs/shapes/")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--budget-gib", type=float, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = json.loads((ROOT / "configs" / "shapes" / f"{args.model}.json").read_text())
    arch = Arch.from_hf_config(config)
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    runner = make_runner(config, max(args.batch_sizes), int(args.budget_gib * 1024**3))
    weight_bytes = runner.engine.weight_bytes
    roofline_s = weight_bytes / bandwidth
    decode = {}
    for batch_size in args.batch_sizes:
        tpot = engine_decode_tpot(runner, batch_size, args.steps, arch.vocab_size)
        decode[batch_size] = {"tpot_ms": tpot * 1e3, "tok_s": batch_size / tpot}
    prefill = {n: {"s": (t := engine_prefill_s(runner, n, arch.vocab_size)), "tok_s": n / t} for n in args.prefill}
    runner.close()
    del runner
    torch.cuda.empty_cache()

    model = hf_model(config)
    hf_decode = {}
    for batch_size in args.hf_batch_sizes:
        tpot = hf_decode_tpot(model, batch_size, arch.vocab_size, min(args.steps, 16))
        hf_decode[batch_size] = {"tpot_ms": tpot * 1e3, "tok_s": batch_size / tpot}
    hf_prefill = {n: {"s": (t := hf_prefill_s(model, n, arch.vocab_size)), "tok_s": n / t} for n in args.prefill}

    result = {
        "benchmark": "engine",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": card,
        "model": args.model + " (dummy weights, bfloat16)",
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_batch1_tpot_ms": roofline_s * 1e3,
        "engine": {"decode": decode, "prefill": prefill},
        "transformers": {"decode": hf_decode, "prefill": hf_prefill},
        "ratios": {
            "batch1_tpot_over_roofline": decode[min(decode)]["tpot_ms"] / (roofline_s * 1e3),
            **{f"decode_b{b}_vs_transformers": decode[b]["tok_s"] / hf_decode[b]["tok_s"] for b in hf_decode if b in decode},
            **{f"prefill_{n}_vs_transformers": prefill[n]["tok_s"] / hf_prefill[n]["tok_s"] for n in prefill},
        },
    }
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"engine-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"card {card}  weights {weight_bytes / 1e9:.2f} GB  copy bw {bandwidth / 1e9:.0f} GB/s  roofline b1 {roofline_s * 1e3:.2f} ms")
    print(f"{'batch':>6} {'TPOT ms':>8} {'tok/s':>9} {'HF TPOT ms':>11} {'HF tok/s':>9}")
    for b, row in decode.items():
        hf = hf_decode.get(b, {})
        print(f"{b:>6} {row['tpot_ms']:>8.2f} {row['tok_s']:>9.0f} {hf.get('tpot_ms', float('nan')):>11.2f} {hf.get('tok_s', float('nan')):>9.0f}")
    for n, row in prefill.items():
        print(f"prefill {n:>5}: {row['tok_s']:>9.0f} tok/s  (HF {hf_prefill[n]['tok_s']:.0f})")
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
