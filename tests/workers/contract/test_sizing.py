"""Model sizing without torch: the bytes the controller plans for are the bytes a worker maps."""

from __future__ import annotations

import json

import pytest
import torch

from tests.factories import TINY_CONFIGS, make_pool, make_spec, make_tiny_checkpoint
from workers.contract.sizing import Arch, ModelSize, resolve_dtype
from workers.engine.engine import Engine


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_controllers_size_of_a_model_is_what_the_engine_maps(model_type, tmp_path):
    checkpoint = make_tiny_checkpoint(model_type, tmp_path)
    arch = Arch.from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    size = ModelSize.of(arch, "auto", "cpu")
    engine = Engine(make_spec(checkpoint, dtype=size.dtype), torch.device("cpu"), make_pool())
    try:
        assert size.weight_bytes == engine.weight_bytes
        assert size.kv_bytes_per_token * engine.block_size == engine.kv.block_bytes
        assert size.weight_bytes >= arch.num_parameters() * 4  # every parameter, float32, plus alignment
    finally:
        engine.close()


def test_auto_dtype_is_float32_on_the_cpu_and_bfloat16_on_gpus():
    assert (resolve_dtype("auto", "cpu"), resolve_dtype("auto", "cuda:1"), resolve_dtype("float16", "cpu")) == ("float32", "bfloat16", "float16")
