"""Worker process entry point: `prism worker --controller tcp://HOST:PORT --device cuda:0`
(`python -m workers.main ...`).

The controller starts one per configured device; on another host an operator (or a launcher such as
Ray) starts it, and it joins the controller over the network. The command line says only how to reach
the controller and which device to drive; the worker's configuration comes from the controller when it
connects (`workers/contract/config.py`). The channel's secret comes in the environment
(`PRISM_WORKER_SECRET`, or the variable `--secret-env` names; workers/contract/channel_keys.py), never on
the command line. A worker that joined exits when it loses its controller (its supervisor starts it
again and it joins afresh).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import faulthandler
import importlib
import signal
import socket
import sys

from workers.contract.channel_keys import SECRET_ENV

# What a worker imports lazily, on its first model: a standby imports it before it is needed (about 3 s of
# the 4 s a fresh worker spent in imports before its first model was built). Optional where a machine may
# lack it (Triton and the CUDA bindings on a CPU-only host).
STANDBY_IMPORTS = (
    ("transformers.models.llama.modeling_llama", False),
    ("workers.engine.triton_ops", True),
    ("workers.engine.triton_attention", True),
    ("cuda.bindings.driver", True),
)


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits, so no worker outlives its controller."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _import_ahead() -> None:
    for module, optional in STANDBY_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            if not optional:
                raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prism worker", description=__doc__)
    parser.add_argument("--controller", required=True, help="controller channel address, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--device", default="cpu", help="cpu, cpu:N or cuda:N")
    parser.add_argument("--worker-id", default=None,
                        help="unique id among the controller's workers (default: HOSTNAME/DEVICE; the controller names the "
                             "workers it spawns by their device)")
    parser.add_argument("--secret-env", default=SECRET_ENV,
                        help=f"environment variable holding the controller's channel secret (default: {SECRET_ENV})")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--standby", action="store_true",
                        help="import everything, then wait for a line 'go' on stdin before connecting (a spare "
                             "that takes over when the device's worker dies); exit at end of input")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faulthandler.enable()  # a fatal signal (e.g. a stray access to an unmapped page) prints the Python stack
    from workers.contract.logs import configure_logging

    configure_logging(args.log_level, args.log_format, f"worker[{args.device}]")
    if args.parent_pid is not None:
        _die_with_parent()
        # Ctrl-C in a terminal signals the whole process group: the controller drains its requests, then
        # stops its workers; a worker that stopped on its own would fail the requests it runs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # until the worker runs (a standby: at once)

    from workers.worker import Worker

    if args.standby:
        _import_ahead()
        if sys.stdin.readline().strip() != "go":
            return
    from workers.worker import NoConfiguration

    try:
        worker = Worker(args.worker_id or f"{socket.gethostname()}/{args.device}", args.device, args.controller,
                        args.parent_pid, args.secret_env)
        stop = lambda signum, _frame: worker.request_stop(f"stopped by {signal.Signals(signum).name}")  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        if args.parent_pid is None:
            signal.signal(signal.SIGINT, stop)
        worker.run()
    except NoConfiguration as exc:
        print(f"prism worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
