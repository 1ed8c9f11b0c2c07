"""LocalScheduler mechanics that hold under every policy: chunked prefill, admission by memory,
preemption, abort, rejection; plus the timing bookkeeping that the prism policy relies on."""

from __future__ import annotations

import pytest

from scheduler.local import LocalScheduler
from scheduler.sequence import SeqStatus
from tests.scheduler.fakes import FakeClock, SharedPool, chunks_have_blocks, make_queue, make_scheduler, make_seq, run_step

POLICIES = ["prism", "fcfs"]


@pytest.mark.parametrize("policy", POLICIES)
def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_the_end(policy):
    queue = make_queue(max_num_batched_tokens=32)
    scheduler = make_scheduler(queue, policy=policy)
    seq = make_seq("a", num_prompt=100, max_tokens=3)
    scheduler.add(seq)

    sizes, samples = [], []
    for _ in range(4):
        plan = scheduler.schedule()
        (chunk,) = plan.chunks
        sizes.append(chunk.num_new_tokens)
        samples.append(chunk.samples)
        assert chunks_have_blocks(plan, queue.block_size)
        scheduler.update(plan, {"a": 7} if chunk.samples else {})
    assert sizes == [32, 32, 32, 4]
    assert samples == [False, False, False, True]
    assert seq.output_token_ids == [7] and seq.num_computed_tokens == 100
    assert len(seq.block_ids) == 7  # ceil(100 / 16)


@pytest.mark.parametrize("policy", POLICIES)
def test_request_waits_until_memory_frees_then_is_admitted(policy):
    queue = make_queue(max_blocks=8)
    scheduler = make_scheduler(queue, policy=policy)
    first, second = make_seq("a", num_prompt=100, max_tokens=2), make_seq("b", num_prompt=100, max_tokens=2, arrival_s=1001.0)
    scheduler.add(first)
    scheduler.add(second)

    plan, _ = run_step(scheduler)
    assert [c.seq.req_id for c in plan.chunks] == ["a"]  # 7 of 8 blocks: b does not fit
    assert second.status is SeqStatus.WAITING and second.block_ids == []
    plan, finished = run_step(scheduler)
    assert finished == [first] and first.finish_reason == "length"
    assert queue.allocator.num_used == 0
    plan, _ = run_step(scheduler)
    assert [c.seq.req_id for c in plan.chunks] == ["b"]


@pytest.mark.parametrize("policy", POLICIES)
def test_growth_without_memory_preempts_and_frees_the_victims_blocks(policy):
    queue = make_queue(max_blocks=2)
    scheduler = make_scheduler(queue, policy=policy)
    # Each prompt fills one block exactly; their first decode needs a second block each: only one fits.
    old, new = make_seq("old", num_prompt=16, max_tokens=8), make_seq("new", num_prompt=16, max_tokens=8, arrival_s=1001.0)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefill and sample a token
    assert queue.allocator.num_free == 0

    plan, _ = run_step(scheduler)
    assert plan.preempted == [new]  # equal remaining decode: the newest goes, under both policies
    assert new.status is SeqStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and new.output_token_ids == [7]  # recomputed later, nothing lost
    assert [c.seq for c in plan.chunks] == [old] and chunks_have_blocks(plan, queue.block_size)
    assert queue.allocator.num_used == len(old.block_ids) == 2


def test_prism_preempts_the_longest_remaining_decode_fcfs_the_newest():
    def victim(policy: str) -> str:
        queue = make_queue(max_blocks=2)
        scheduler = make_scheduler(queue, policy=policy)
        scheduler.add(make_seq("old-long", num_prompt=16, max_tokens=100))
        scheduler.add(make_seq("new-short", num_prompt=16, max_tokens=3, arrival_s=1001.0))
        run_step(scheduler)
        plan, _ = run_step(scheduler)
        return plan.preempted[0].req_id

    assert victim("prism") == "old-long"
    assert victim("fcfs") == "new-short"


@pytest.mark.parametrize("policy", POLICIES)
def test_preempting_a_scheduled_sequence_drops_its_chunk(policy):
    """Regression: a decode already given a chunk was preempted later in the same plan and kept its
    chunk with no blocks, so the engine would have read and written freed KV blocks."""
    queue = make_queue(max_blocks=3, max_num_batched_tokens=16)
    scheduler = make_scheduler(queue, policy=policy)
    prefill = make_seq("prefill", num_prompt=64, max_tokens=1, arrival_s=1000.0)
    decode = make_seq("decode", num_prompt=15, max_tokens=50, arrival_s=1001.0)
    prefill.status = decode.status = SeqStatus.RUNNING
    prefill.num_computed_tokens, prefill.block_ids = 32, queue.allocator.allocate(2)
    decode.output_token_ids, decode.num_computed_tokens, decode.block_ids = [5], 15, queue.allocator.allocate(1)
    queue.running += [prefill, decode]

    plan = scheduler.schedule()
    # Decodes are planned first; the prefill then needs the decode's block, and the decode is the victim.
    assert plan.preempted == [decode]
    assert [c.seq for c in plan.chunks] == [prefill]
    assert plan.chunks[0].num_new_tokens == 15  # sized before the victim was chosen
    assert chunks_have_blocks(plan, queue.block_size)


@pytest.mark.parametrize("policy", POLICIES)
def test_abort_frees_blocks_wherever_the_request_is(policy):
    queue = make_queue(max_blocks=16)
    scheduler = make_scheduler(queue, policy=policy)
    running, waiting = make_seq("r", num_prompt=40), make_seq("w", num_prompt=40, arrival_s=1001.0)
    queue.max_num_seqs = 1
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert queue.allocator.num_used == 3

    assert scheduler.abort("r") is running and running.finish_reason == "abort"
    assert queue.allocator.num_used == 0 and running.block_ids == []
    assert scheduler.abort("w") is waiting and not queue.waiting
    assert scheduler.abort("w") is None and scheduler.abort("unknown") is None
    assert not scheduler.has_work() and scheduler.num_unfinished() == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_larger_than_the_kv_space_is_rejected_not_stuck(policy):
    queue = make_queue(max_blocks=4)
    scheduler = make_scheduler(queue, policy=policy)
    too_big, fine = make_seq("big", num_prompt=64), make_seq("ok", num_prompt=16, arrival_s=1001.0)
    scheduler.add(too_big)
    scheduler.add(fine)
    plan, _ = run_step(scheduler)
    assert plan.rejected == [too_big] and too_big.finish_reason == "error"
    assert [c.seq for c in plan.chunks] == [fine]


@pytest.mark.parametrize("policy", POLICIES)
def test_models_sharing_one_pool_admit_only_what_the_pool_can_back(policy):
    pool = SharedPool(num_blocks=8)
    a, b = make_queue("a"), make_queue("b")
    a.allocator, b.allocator = pool.allocator(), pool.allocator()
    scheduler = make_scheduler(a, b, policy=policy)
    scheduler.add(make_seq("a-1", model="a", num_prompt=100, max_tokens=2))
    scheduler.add(make_seq("b-1", model="b", num_prompt=100, max_tokens=2, arrival_s=1001.0))

    plan, _ = run_step(scheduler)
    assert plan.model == "a" and pool.num_free == 1  # 7 blocks: b's 7 cannot be backed now
    plan, finished = run_step(scheduler)
    assert plan.model == "a" and [s.req_id for s in finished] == ["a-1"]  # b still could not be admitted
    assert pool.num_free == 8
    plan = scheduler.schedule()
    assert plan.model == "b" and chunks_have_blocks(plan, 16) and pool.num_free == 1


def test_update_stamps_token_times_and_learns_prefill_speed():
    clock = FakeClock(50.0)
    queue = make_queue(max_num_batched_tokens=1024)
    scheduler = make_scheduler(queue, clock=clock, tokens_per_s=1000.0)
    seq = make_seq("a", num_prompt=800, arrival_s=50.0)
    scheduler.add(seq)
    plan = scheduler.schedule()
    clock.advance(0.2)  # 800 tokens in 0.2 s: 4000 tokens/s measured
    scheduler.update(plan, {"a": 3})
    assert seq.first_token_s == seq.last_token_s == 50.2
    speed = scheduler.prefill_speed.tokens_per_s("m")
    assert speed == pytest.approx(1000.0 + 0.2 * (4000.0 - 1000.0))

    plan = scheduler.schedule(now=51.0)  # explicit time wins over the clock
    scheduler.update(plan, {"a": 4}, now=51.1)
    assert seq.first_token_s == 50.2 and seq.last_token_s == 51.1
    assert scheduler.prefill_speed.tokens_per_s("m") == speed  # a decode step says nothing of prefill speed


def test_default_scheduler_keeps_the_worker_api():
    scheduler = LocalScheduler()
    assert scheduler.policy.name == "prism" and scheduler.schedule() is None and scheduler.num_steps == 0
    with pytest.raises(ValueError, match="unknown local scheduling policy"):
        LocalScheduler("lottery")


@pytest.mark.parametrize("policy", POLICIES)
def test_a_model_with_a_step_in_flight_is_skipped_until_its_update(policy):
    """The worker launches one model's step and plans the next while it runs: never the same model's."""
    a, b = make_queue("a"), make_queue("b")
    scheduler = make_scheduler(a, b, policy=policy)
    scheduler.add(make_seq("a-1", model="a", max_tokens=3))
    scheduler.add(make_seq("b-1", model="b", max_tokens=3, arrival_s=1001.0))

    first = scheduler.schedule()
    second = scheduler.schedule()
    assert {first.model, second.model} == {"a", "b"}
    assert scheduler.in_flight("a") and scheduler.in_flight("b")
    assert scheduler.schedule() is None  # both models' next steps need tokens not sampled yet
    assert scheduler.has_work()

    scheduler.update(first, {c.seq.req_id: 7 for c in first.chunks if c.samples})
    assert not scheduler.in_flight(first.model)
    third = scheduler.schedule()
    assert third.model == first.model and [c.num_new_tokens for c in third.chunks] == [1]  # its decode, now


def test_memory_deadlock_is_not_broken_while_a_step_may_still_free_memory():
    pool = SharedPool(num_blocks=5)
    a, b = make_queue("a"), make_queue("b")
    a.allocator, b.allocator = pool.allocator(), pool.allocator()
    scheduler = make_scheduler(a, b)
    scheduler.add(make_seq("a-1", model="a", num_prompt=64, max_tokens=1))  # 4 of the 5 blocks
    scheduler.add(make_seq("b-1", model="b", num_prompt=64, max_tokens=1, arrival_s=1001.0))
    plan = scheduler.schedule()
    assert plan.model == "a" and pool.num_free == 1

    assert scheduler.schedule() is None  # b cannot be backed, and a's step may finish a-1
    assert plan.preempted == [] and a.running  # nobody was preempted to make room
    finished = scheduler.update(plan, {"a-1": 5})
    assert [s.req_id for s in finished] == ["a-1"] and pool.num_free == 5
    assert scheduler.schedule().model == "b"


def test_prefill_speed_is_learned_from_the_steps_device_time_when_given():
    clock = FakeClock(50.0)
    queue = make_queue(max_num_batched_tokens=1024)
    scheduler = make_scheduler(queue, clock=clock, tokens_per_s=1000.0)
    scheduler.add(make_seq("a", num_prompt=800, arrival_s=50.0))
    plan = scheduler.schedule()
    clock.advance(0.5)  # waited behind another model's step: the wall clock overstates this step
    scheduler.update(plan, {"a": 3}, device_s=0.1)  # 8000 tokens/s on the device
    assert scheduler.prefill_speed.tokens_per_s("m") == pytest.approx(1000.0 + 0.2 * (8000.0 - 1000.0))
