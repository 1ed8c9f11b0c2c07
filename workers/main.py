"""Worker process entry point: `python -m workers.main --controller tcp://HOST:PORT --device cpu`.

The controller starts one per configured device; `prism worker` starts one by hand (e.g. on another host).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import faulthandler
import signal
import sys

from scheduler.local_policy import DEFAULT_TPOT_TARGET, TPOT_TARGETS


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits, so no worker outlives its controller."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prism worker", description=__doc__)
    parser.add_argument("--controller", required=True, help="controller channel address, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--worker-id", default=None, help="unique id (default: the device name)")
    parser.add_argument("--budget-bytes", type=int, default=4 * 1024**3, help="page pool budget")
    parser.add_argument("--page-bytes", type=int, default=2 * 1024**2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU share for the pool when no budget is given")
    parser.add_argument("--host-store-bytes", type=int, default=32 * 1024**3, help="host weight store budget (shared memory)")
    parser.add_argument("--local-policy", default="prism", choices=["prism", "fcfs"], help="step order across models")
    parser.add_argument("--tpot-target", default=DEFAULT_TPOT_TARGET, choices=TPOT_TARGETS,
                        help="prism policy: a decode's TPOT SLO held per token or as the request's mean")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="wait for each step before planning the next (default: overlap models' steps)")
    parser.add_argument("--store-prefix", default="prism-weights-", help="file name prefix of this server's weight images")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faulthandler.enable()  # a fatal signal (e.g. a stray access to an unmapped page) prints the Python stack
    from workers.logs import configure_logging

    configure_logging(args.log_level, args.log_format, f"worker[{args.device}]")
    if args.parent_pid is not None:
        _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    from memory.host_store import HostWeightStore
    from workers.worker import Worker, make_pool

    pool = make_pool(args.device, args.budget_bytes, args.page_bytes, args.gpu_memory_utilization)
    pool.replenish_reserve()
    store = HostWeightStore(args.host_store_bytes, prefix=args.store_prefix)
    worker = Worker(args.worker_id or args.device, args.device, args.controller, pool, store, args.parent_pid, args.local_policy, args.overlap,
                    args.tpot_target)
    worker.run()


if __name__ == "__main__":
    main()
