"""The built-in engine: one model on one device, its KV in the device's page pool.

The engine does not decide what runs: the worker's local scheduler hands it a StepPlan (which sequences,
how many new tokens each) with KV blocks already allocated, and the engine runs that step and returns the
sampled tokens. Narrow interface: `execute(plan)`, `release(req_id)`, `stats()`, `close()`.
"""

from __future__ import annotations

import time

import torch

from memory import KVSpace, PagePool
from scheduler.local import ScheduledChunk, StepPlan
from workers.engine.batch import build_batch
from workers.engine.cuda_graphs import DecodeGraphs
from workers.engine.llama import LlamaModel
from workers.engine.sampler import Sampler
from workers.messages import ModelSpec
from workers.weights.arch import Arch
from workers.weights.checkpoint import iter_dummy, iter_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    def __init__(self, spec: ModelSpec, device: torch.device, pool: PagePool):
        started = time.monotonic()
        self.spec = spec
        self.device = device
        self.dtype = DTYPES[spec.dtype]
        self.arch = Arch.from_hf_config(spec.hf_config)
        self.model = self._load_model()
        self.weight_bytes = sum(t.numel() * t.element_size() for t in self._weight_tensors())
        self.block_size = spec.block_size
        self.kv_block_shape = (self.arch.num_layers, 2, spec.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        block_bytes = self.arch.kv_bytes_per_token(self.dtype) * spec.block_size
        # Address space for as many blocks as the whole pool could back: pages are mapped only on use.
        max_blocks = max(1, pool.budget_pages * pool.page_bytes // block_bytes)
        self.kv = KVSpace(pool, spec.name, block_bytes, max_blocks)
        self.kv_cache = self.kv.tensor(self.dtype, self.kv_block_shape)
        self.sampler = Sampler(device, seed=None)
        self.graphs = self._capture_graphs() if device.type == "cuda" and spec.cuda_graphs else None
        self.load_s = time.monotonic() - started

    def _capture_graphs(self) -> DecodeGraphs | None:
        scratch = self.kv.allocate(1)  # padded graph rows write here; held for the engine's life
        if scratch is None:
            return None
        graphs = DecodeGraphs(
            self.model, self.kv_cache, self.block_size, self.spec.max_num_seqs,
            max_blocks_per_seq=-(-self.spec.max_model_len // self.block_size), scratch_block=scratch[0],
        )
        graphs.capture()
        return graphs

    def _load_model(self) -> LlamaModel:
        spec = self.spec
        if spec.load_format == "dummy":
            tensors = iter_dummy(self.arch, spec.seed, str(self.device), self.dtype)
        else:
            tensors = iter_safetensors(spec.weights_dir, str(self.device), self.dtype)
        ops = "triton" if self.device.type == "cuda" else "torch"
        return LlamaModel.from_checkpoint(self.arch, spec.hf_config, tensors, self.device, self.dtype, ops)

    def _weight_tensors(self) -> list[torch.Tensor]:
        model = self.model
        tensors = {id(t): t for t in (model.embed, model.final_norm, model.lm_head)}
        for layer in model.layers:
            for t in vars(layer).values():
                if t is not None:
                    tensors[id(t)] = t
        return list(tensors.values())

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[str, int]:
        """Run one step; return the sampled token of every sequence whose chunk reached its end."""
        if not plan.chunks:
            return {}
        logits = self._logits(plan.chunks)
        sampling = [c.seq for c in plan.chunks if c.samples]
        if not sampling:
            return {}
        banned = [
            sorted(s.eos_token_ids | s.stop_token_ids) if s.num_output_tokens < s.min_tokens else []
            for s in sampling
        ]
        tokens = self.sampler.sample(logits, [s.req_id for s in sampling], [s.sampling for s in sampling], banned)
        return {s.req_id: t for s, t in zip(sampling, tokens)}

    def _logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Logits of the sampled rows: a CUDA graph replay for decode batches, else an eager forward."""
        if self.graphs is not None and all(c.num_new_tokens == 1 for c in chunks) and self.graphs.can_run(len(chunks)):
            return self.graphs.run(
                [c.seq.token_ids(c.start, c.start + 1)[0] for c in chunks],
                [c.start for c in chunks],
                [c.seq.block_ids for c in chunks],
            )
        batch = build_batch(
            token_chunks=[c.seq.token_ids(c.start, c.start + c.num_new_tokens) for c in chunks],
            start_positions=[c.start for c in chunks],
            block_tables=[c.seq.block_ids for c in chunks],
            sample_mask=[c.samples for c in chunks],
            block_size=self.block_size,
            device=self.device,
            with_device_meta=self.device.type == "cuda",
        )
        hidden = self.model.forward(batch, self.kv_cache)
        return self.model.logits(hidden) if hidden.shape[0] else None

    def release(self, req_id: str) -> None:
        """Forget per-request state (its seeded generator); the scheduler has freed its blocks."""
        self.sampler.forget(req_id)

    def close(self) -> None:
        del self.kv_cache
        self.kv.close()
