"""Model preparation in the child process: what the prepared directory says, and the progress it shows."""

from __future__ import annotations

import json
import logging
import threading

from workers.weights import prepare


def test_the_prepared_smollm2_config_names_its_architecture(prepared_smollm2):
    """Regression: the prepared config.json said `"architectures": null` (transformers leaves it so when it
    reads GGUF), so tools reading the cache guessed the model class. A copy prepared before the fix is
    mended when it is next looked up."""
    config = json.loads((prepared_smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config


def test_a_copy_prepared_before_the_fix_gets_its_architecture_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": None, "hidden_size": 8}))
    prepare._name_architecture(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8}


def test_a_long_preparation_step_says_it_is_still_running(monkeypatch, caplog):
    """Regression: the SmolLM2 conversion ran 29 s with no line between "dequantizing" and "prepared"."""
    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 0.01)
    ticked = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "still" in record.getMessage():
                ticked.set()

    watch = Watch()
    prepare.logger.addHandler(watch)
    try:
        with caplog.at_level(logging.INFO, logger=prepare.logger.name):
            with prepare._step("reading the weights (2 of 3)"):
                assert ticked.wait(10), "no progress line while the step ran"
    finally:
        prepare.logger.removeHandler(watch)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "  reading the weights (2 of 3)"
    assert any(line.startswith("  ... still reading the weights (2 of 3) (") for line in lines[1:-1])
    assert lines[-1].startswith("  done reading the weights (2 of 3) in ")
