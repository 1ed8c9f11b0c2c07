"""Greedy output of the built-in engine is token-identical to Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.factories import TINY_CONFIGS, make_pool, make_spec, make_tiny_checkpoint, smollm2_dir
from workers.contract.messages import SamplingParams
from workers.offline import OfflineRunner
from workers.contract.sizing import Arch
from workers.weights.layout import WeightLayout

NUM_TOKENS = 40
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is to a child.",
    "List three uses of Python.",
]


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS masked until `num_tokens` (as our min_tokens does)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: generate() would otherwise mask prompt tokens equal to the pad id
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)


@pytest.fixture(scope="module")
def smollm2():
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    return directory, model, prompt_ids


def test_smollm2_greedy_matches_transformers_one_at_a_time(smollm2):
    directory, model, prompts = smollm2
    runner = OfflineRunner(make_spec(directory, eos_token_ids=[2]), "cpu", make_pool())
    for prompt in prompts:
        assert runner.generate([prompt], GREEDY)[0] == hf_greedy(model, prompt, NUM_TOKENS)


def test_smollm2_greedy_matches_transformers_batched_with_chunked_prefill(smollm2):
    directory, model, prompts = smollm2
    # 24-token budget per step: every prompt is prefilled in chunks, interleaved with other decodes.
    runner = OfflineRunner(make_spec(directory, eos_token_ids=[2], max_num_batched_tokens=24), "cpu", make_pool())
    outputs = runner.generate(prompts, GREEDY)
    assert outputs == [hf_greedy(model, p, NUM_TOKENS) for p in prompts]
    assert runner.num_steps > len(prompts) * NUM_TOKENS // len(prompts) + 4  # chunking really happened


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_tiny_random_models_match_transformers(model_type, tmp_path):
    directory = make_tiny_checkpoint(model_type, tmp_path, seed=1)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (5, 33, 70)]
    runner = OfflineRunner(make_spec(directory, max_num_batched_tokens=32), "cpu", make_pool())
    assert runner.generate(prompts, GREEDY) == [hf_greedy(model, p, NUM_TOKENS) for p in prompts]


def test_preemption_under_memory_pressure_keeps_outputs_identical(tmp_path):
    """A pool too small for all sequences at once forces preemption and recompute; nothing changes."""
    directory = make_tiny_checkpoint("llama", tmp_path, seed=2)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (30,), generator=generator).tolist() for _ in range(6)]
    roomy = OfflineRunner(make_spec(directory), "cpu", make_pool())
    expected = roomy.generate(prompts, GREEDY)
    # 4 KiB pages; a 16-token block of this model is 12 KiB; 48 KV pages = 16 blocks for 6 x 5 blocks needed.
    spec = make_spec(directory)
    weight_bytes = WeightLayout.of(Arch.from_hf_config(spec.hf_config), torch.float32).num_bytes
    tight_pool = make_pool(budget_bytes=-(-weight_bytes // 4096) * 4096 + 48 * 4096, page_bytes=4096)
    tight = OfflineRunner(spec, "cpu", tight_pool)
    assert tight.generate(prompts, GREEDY) == expected
    assert sum(seq.num_preemptions for seq in tight.last_sequences) > 0
    assert tight.engine.kv.num_used_blocks == 0
    assert tight_pool.snapshot().kv_pages.get("model", 0) <= tight.engine.kv.idle_pages
