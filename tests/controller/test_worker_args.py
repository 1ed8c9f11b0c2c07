"""What the controller tells the workers it starts: the registry's scheduling options, as the worker parses them."""

from __future__ import annotations

import textwrap

from controller.registry import load_registry
from controller.server import Server
from workers.main import parse_args


def worker_options(tmp_path, scheduler: str):
    (tmp_path / "c.json").write_text("{}")
    path = tmp_path / "registry.yaml"
    path.write_text(textwrap.dedent(f"""
        scheduler: {scheduler}
        models: [{{name: m1, load_format: dummy, config: c.json, tokenizer: /}}]
    """))
    server = Server(load_registry(path), {}, tmp_path)
    return parse_args(["--controller", "tcp://127.0.0.1:1", *server._worker_args("cpu")])


def test_workers_get_the_local_policy_overlap_and_tpot_target_of_the_registry(tmp_path):
    options = worker_options(tmp_path, "{policy: prism, tpot_target: request, overlap_steps: false}")
    assert (options.local_policy, options.tpot_target, options.overlap) == ("prism", "request", False)
    defaults = worker_options(tmp_path, "{policy: static}")
    assert (defaults.local_policy, defaults.tpot_target, defaults.overlap) == ("fcfs", "request", True)
