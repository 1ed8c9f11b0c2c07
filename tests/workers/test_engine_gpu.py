"""The GPU engine (Triton kernels, CUDA graphs, KV in CUDA VMM pool pages) against transformers.

Run on the device machine: `pytest -m gpu tests/workers/test_engine_gpu.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.engine.batch import build_batch
from workers.engine.engine import Engine
from workers.contract.messages import ModelSpec, SamplingParams
from workers.offline import OfflineRunner
from workers.contract.sizing import Arch
from workers.weights.checkpoint import iter_dummy

pytestmark = pytest.mark.gpu

SHAPES = Path(__file__).resolve().parents[2] / "configs" / "shapes"


def shape_config(name: str, **overrides) -> dict:
    config = json.loads((SHAPES / f"{name}.json").read_text())
    config.update(overrides)
    return config


def cuda_pool(budget_bytes: int):
    from memory import PagePool
    from memory.cuda_backend import CudaBackend

    return PagePool(CudaBackend("cuda:0"), budget_bytes)


def dummy_spec(hf_config: dict, dtype: str, **overrides) -> ModelSpec:
    fields = dict(
        name="dummy", weights_dir=None, hf_config=hf_config, load_format="dummy", dtype=dtype, max_model_len=2048,
        block_size=16, max_num_seqs=16, max_num_batched_tokens=512, eos_token_ids=[], seed=0, ttft_slo_s=2.0, tpot_slo_s=0.2,
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def hf_model(hf_config: dict, dtype: torch.dtype, seed: int = 0):
    """transformers' model of the config, holding exactly the engine's dummy weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to("cuda").eval()
    state = dict(iter_dummy(Arch.from_hf_config(hf_config), seed, "cuda", dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if hf_config.get("tie_word_embeddings") else set()
    assert not unexpected and all("rotary" in k or k in tied for k in missing), (missing, unexpected)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def hf_step_logits(model, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    """Logits of the prefill's last position and of each decode step fed `forced` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(torch.tensor([prompt], device="cuda"), past_key_values=cache, use_cache=True)
    logits = [out.logits[0, -1].float()]
    for token in forced:
        out = model(torch.tensor([[token]], device="cuda"), past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1].float())
    return logits


@torch.inference_mode()
def engine_step_logits(engine: Engine, prompt: list[int], forced: list[int], use_graphs: bool) -> list[torch.Tensor]:
    num_tokens = len(prompt) + len(forced) + 1
    blocks = engine.kv.allocate(-(-num_tokens // engine.block_size))
    assert blocks is not None
    try:
        batch = build_batch([prompt], [0], [blocks], [True], engine.block_size, engine.device, with_device_meta=True)
        logits = [engine.model.logits(engine.model.forward(batch, engine.kv_cache))[0].clone()]
        for step, token in enumerate(forced):
            position = len(prompt) + step
            if use_graphs:
                logits.append(engine.graphs.run([token], [position], [blocks])[0].clone())
            else:
                batch = build_batch([[token]], [position], [blocks], [True], engine.block_size, engine.device, with_device_meta=True)
                logits.append(engine.model.logits(engine.model.forward(batch, engine.kv_cache))[0].clone())
        return logits
    finally:
        engine.kv.free(blocks)


def test_bf16_logits_per_step_match_transformers_within_bf16_error():
    config = shape_config("llama-3.2-1b")
    prompt = torch.randint(0, config["vocab_size"], (100,), generator=torch.Generator().manual_seed(0)).tolist()
    reference32 = hf_model(config, torch.float32)
    forced = [int(t) for t in reference32.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 100:]]
    exact = hf_step_logits(reference32, prompt, forced)
    del reference32
    hf_bf16 = hf_step_logits(hf_model(config, torch.bfloat16), prompt, forced)
    engine = Engine(dummy_spec(config, "bfloat16"), torch.device("cuda:0"), cuda_pool(8 * 1024**3))
    engine.activate()
    for use_graphs in (False, True):
        ours = engine_step_logits(engine, prompt, forced, use_graphs)
        assert len(ours) == len(exact) == 33
        for step, (mine, theirs, truth) in enumerate(zip(ours, hf_bf16, exact)):
            assert torch.isfinite(mine).all()
            ours_err, hf_err = rel_err(mine, truth), rel_err(theirs, truth)
            # No worse than transformers' own bf16 run, and inside the bf16 range.
            assert ours_err < max(2e-2, 1.5 * hf_err), (use_graphs, step, ours_err, hf_err)


def test_fp32_greedy_is_token_identical_to_transformers_and_batching_changes_nothing():
    config = shape_config("llama-3.2-1b", num_hidden_layers=4)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config["vocab_size"], (n,), generator=generator).tolist() for n in (7, 64, 300, 33)]
    reference = hf_model(config, torch.float32)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    runner = OfflineRunner(dummy_spec(config, "float32", max_num_batched_tokens=128), "cuda:0", cuda_pool(4 * 1024**3))
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
    one_by_one = [runner.generate([p], params)[0] for p in prompts]
    batched = runner.generate(prompts, params)
    assert one_by_one == expected
    assert batched == expected


@torch.inference_mode()
def test_bf16_batched_decode_equals_unbatched_decode():
    """Each sequence's per-step logits in a batch of 3 (graph replay) equal its logits decoded alone.

    Tokens are forced (the same for both runs): with random weights the top logits nearly tie, so free
    greedy decoding in bf16 may legitimately branch on a last-bit difference of another batch shape.
    """
    config = shape_config("llama-3.2-1b", num_hidden_layers=4)
    engine = Engine(dummy_spec(config, "bfloat16"), torch.device("cuda:0"), cuda_pool(4 * 1024**3))
    engine.activate()
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config["vocab_size"], (n,), generator=generator).tolist() for n in (5, 50, 200)]
    forced = [torch.randint(0, config["vocab_size"], (16,), generator=generator).tolist() for _ in prompts]
    alone = [engine_step_logits(engine, p, f, use_graphs=True) for p, f in zip(prompts, forced)]
    tables = [engine.kv.allocate(-(-(len(p) + 17) // 16)) for p in prompts]
    for prompt, table in zip(prompts, tables):
        engine.model.forward(build_batch([prompt], [0], [table], [True], 16, engine.device, with_device_meta=True), engine.kv_cache)
    for step in range(16):
        logits = engine.graphs.run([f[step] for f in forced], [len(p) + step for p in prompts], tables)
        for row in range(len(prompts)):
            assert rel_err(logits[row], alone[row][step + 1]) < 1e-2, (row, step)
    for table in tables:
        engine.kv.free(table)


def test_kv_cache_lives_in_pool_pages_and_returns_them():
    config = shape_config("llama-3.2-1b", num_hidden_layers=2)
    pool = cuda_pool(2 * 1024**3)
    runner = OfflineRunner(dummy_spec(config, "bfloat16"), "cuda:0", pool)
    mapped_idle = pool.snapshot().kv_pages.get("dummy", 0)
    runner.generate([[1] * 600] * 4, SamplingParams(temperature=0.0, max_tokens=8))
    runner.engine.kv.trim(0)
    assert pool.snapshot().kv_pages.get("dummy", 0) <= mapped_idle


PREFILL_VARIANTS_AFTER_WARM_UP = """
import json, sys
from tests.workers.test_engine_gpu import cuda_pool, dummy_spec, shape_config
from workers.engine import triton_attention
from workers.contract.messages import SamplingParams
from workers.offline import OfflineRunner

def variants():  # Triton 3.x keeps each compiled specialisation in JITFunction.device_caches
    return sum(len(c[0]) for c in triton_attention._prefill_kernel.device_caches.values())

runner = OfflineRunner(dummy_spec(shape_config("llama-3.2-1b", num_hidden_layers=2), "bfloat16"), "cuda:0", cuda_pool(2 * 1024**3))
warmed = variants()
params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
for prompts in ([[7] * 4], [[7] * 300], [[7] * 499], [[7] * 5, [7] * 499], [[7] * 1021]):
    runner.generate(prompts, params)
print(json.dumps({"after_warm_up": warmed, "after_requests": variants()}))
"""


def test_activation_compiles_every_prefill_variant_a_request_can_need():
    """Block tables 1, 3-15 and 16+ blocks wide, alone or batched: no request pays a kernel compile."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(  # a fresh process: the variants compiled by other tests are not there
        [sys.executable, "-c", PREFILL_VARIANTS_AFTER_WARM_UP], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["after_warm_up"] > 0
    assert counts["after_requests"] == counts["after_warm_up"], counts
