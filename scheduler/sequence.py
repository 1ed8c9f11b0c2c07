"""A request's state on a worker, as the local scheduler and the engine see it (plain data, no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV
    RUNNING = "running"  # holds KV blocks, scheduled every step until it finishes
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    req_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float
    sampling: Any = None  # the engine's sampling parameters, opaque here
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()  # empty when the request ignores EOS
    max_model_len: int = 1 << 30
    ttft_deadline_s: float = float("inf")
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_token_s: float | None = None  # scheduler clock when the first output token was sampled
    last_token_s: float | None = None  # ...and the latest one: with the model's TPOT SLO, the next deadline

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def awaits_first_token(self) -> bool:
        """True until the first output token: the TTFT deadline applies, not the TPOT one."""
        return not self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        return (prompt + self.output_token_ids)[start:stop]

    def append_token(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason if it ends the sequence."""
        self.output_token_ids.append(token_id)
        num_out = len(self.output_token_ids)
        if num_out >= self.min_tokens and (token_id in self.eos_token_ids or token_id in self.stop_token_ids):
            return "stop"
        if num_out >= self.max_tokens or self.num_tokens >= self.max_model_len:
            return "length"
        return None
