"""CPU throughput of the built-in engine vs transformers `generate` on SmolLM2-135M, same run, same weights.

    python benchmarks/engine_cpu.py [--tokens 64] [--batch-sizes 1 8] [--out FILE]

Both generate exactly `--tokens` tokens per sequence greedily (EOS masked) from the same chat prompts;
tokens/s counts generated tokens over wall time including prefill. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.factories import make_pool, make_spec, smollm2_dir  # noqa: E402
from workers.contract.messages import SamplingParams  # noqa: E402
from workers.offline import OfflineRunner  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain recursion briefly.",
    "Name three planets.", "What is 12 times 12?", "Describe a cat.", "Why is the sky blue?", "Give me a fun fact.",
]


def chat_prompts(tokenizer, batch_size: int) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [ids[i % len(ids)] for i in range(batch_size)]


def time_transformers(model, tokenizer, prompts: list[list[int]], num_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    return time.perf_counter() - started


def time_engine(runner: OfflineRunner, prompts: list[list[int]], num_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens)
    started = time.perf_counter()
    outputs = runner.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o) == num_tokens for o in outputs)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point; the best is kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu-cpu.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    runner = OfflineRunner(make_spec(directory, eos_token_ids=[2], max_num_batched_tokens=1024, max_num_seqs=64), "cpu", make_pool(1024**3))
    rows = []
    for batch_size in args.batch_sizes:
        prompts = chat_prompts(tokenizer, batch_size)
        time_engine(runner, prompts, 4)  # warm-up
        time_transformers(model, tokenizer, prompts, 4)
        engine_s = min(time_engine(runner, prompts, args.tokens) for _ in range(args.repeats))
        hf_s = min(time_transformers(model, tokenizer, prompts, args.tokens) for _ in range(args.repeats))
        generated = batch_size * args.tokens
        rows.append({
            "batch_size": batch_size,
            "engine_tok_s": generated / engine_s,
            "transformers_tok_s": generated / hf_s,
            "speedup": hf_s / engine_s,
        })
    result = {
        "benchmark": "engine_cpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": "SmolLM2-135M-Instruct (float32)",
        "tokens_per_sequence": args.tokens,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['engine_tok_s']:>13.1f} {row['transformers_tok_s']:>19.1f} {row['speedup']:>6.2f}")


if __name__ == "__main__":
    main()
