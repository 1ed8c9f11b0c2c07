"""Sampling parameters through the engine: seeds, top-k/top-p limits, stop ids, min/max tokens."""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from workers.contract.messages import SamplingParams
from workers.offline import OfflineRunner


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    directory = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), seed=4)
    return OfflineRunner(make_spec(directory), "cpu", make_pool())


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (7, 19, 40)]


def test_top_k_1_and_tiny_top_p_equal_greedy(runner, prompts):
    greedy = runner.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    assert runner.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=12)) == greedy
    assert runner.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-9, max_tokens=12)) == greedy


def test_seeded_sampling_is_reproducible_whatever_the_batch(runner, prompts):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    alone = runner.generate([prompts[1]], params)[0]
    batched = runner.generate(prompts, params)[1]
    assert alone == batched
    other_seed = runner.generate([prompts[1]], SamplingParams(temperature=1.0, seed=99, max_tokens=16))[0]
    assert other_seed != alone


def test_high_temperature_sampling_is_not_greedy(runner, prompts):
    greedy = runner.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=16))[0]
    sampled = runner.generate([prompts[2]], SamplingParams(temperature=2.0, seed=5, max_tokens=16))[0]
    assert sampled != greedy and all(0 <= t < 512 for t in sampled)


def test_stop_token_id_ends_generation_including_it(runner, prompts):
    greedy = runner.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=20))[0]
    stop_id = greedy[5]
    out = runner.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_id]))[0]
    assert out == greedy[: greedy.index(stop_id) + 1]
    assert runner.last_sequences[0].finish_reason == "stop"


def test_max_tokens_finishes_with_length(runner, prompts):
    out = runner.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert len(out) == 3 and runner.last_sequences[0].finish_reason == "length"


def test_min_tokens_masks_stop_ids_until_reached(runner, prompts):
    greedy = runner.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=10))[0]
    first = greedy[0]
    out = runner.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4, stop_token_ids=[first]))[0]
    assert first not in out[:4] and len(out) >= 4
