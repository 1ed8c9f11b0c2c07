"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens.

A request with a seed draws from its own generator, so its output does not depend on what else is in the
batch. Greedy rows take the argmax of the raw logits (the transformers reference does the same).
"""

from __future__ import annotations

import torch

from workers.contract.messages import SamplingParams


class Sampler:
    def __init__(self, device: torch.device | str, seed: int | None = None):
        self.device = torch.device(device)
        self.shared_generator = torch.Generator(device=self.device)
        if seed is None:
            self.shared_generator.seed()
        else:
            self.shared_generator.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, req_id: str) -> None:
        self._generators.pop(req_id, None)

    def sample(
        self,
        logits: torch.Tensor,
        req_ids: list[str],
        params: list[SamplingParams],
        banned_token_ids: list[list[int]],
    ) -> torch.Tensor:
        """One token per row of `logits` [S, vocab] (float32), as an int64 tensor on the logits' device.

        `banned_token_ids[i]` are masked out of row i. Nothing here waits for the device: the caller
        reads the tokens back when it needs them (the worker, once the step is done).
        """
        rows = [row for row, banned in enumerate(banned_token_ids) for _ in banned]
        if rows:
            columns = [token for banned in banned_token_ids for token in banned]
            index = torch.tensor([rows, columns])
            if logits.is_cuda:  # from pinned memory, not waited for (a pageable copy syncs the stream)
                index = index.pin_memory().to(logits.device, non_blocking=True)
            logits[index[0], index[1]] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for row, (req_id, p) in enumerate(zip(req_ids, params)):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], p, self._generator(req_id, p))
        return tokens

    def _generator(self, req_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.shared_generator
        generator = self._generators.get(req_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self._generators[req_id] = generator
        return generator

    @staticmethod
    def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        logits = logits / params.temperature
        if 0 < params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop tokens once the mass before them already reaches top_p (the top token always stays).
            drop = probs.cumsum(-1) - probs >= params.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[0]
