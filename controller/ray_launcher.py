"""Workers launched on a Ray cluster: one Ray actor per GPU of the cluster (and `cpu_workers` more for CPU
devices), each running `prism worker`, which joins this controller over its channel as any worker from
another host does (`server.worker_listen`; the channel's secret goes to the actors with their arguments).

Ray does the supervision: an actor is restarted whenever it dies (`max_restarts=-1`), and an actor exits
as soon as its worker process does, so a killed worker or actor comes back under the same worker id and
joins again. The actors belong to this controller (the Ray driver): they are killed when it stops, and a
Ray instance the controller started itself (`address: local`) is shut down with it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from controller.registry import RayConfig

logger = logging.getLogger("prism.controller")

ANY_ADDRESS = ("0.0.0.0", "::", "")
LOCAL_OBJECT_STORE_BYTES = 80 * 2**20  # the workers pass nothing through Ray's object store


class WorkerActor:
    """Runs `prism worker` as its child (the worker exits with the actor); exits when the worker does,
    so that Ray restarts both."""

    def __init__(self, controller: str, worker_id: str, device: str, secret: str, log_level: str):
        command = [sys.executable, "-m", "workers.main", "--controller", controller, "--device", device,
                   "--worker-id", worker_id, "--parent-pid", str(os.getpid()), "--log-level", log_level]
        from workers.contract.channel_keys import SECRET_ENV

        self.process = subprocess.Popen(command, env={**os.environ, SECRET_ENV: secret})
        threading.Thread(target=self._exit_with_worker, daemon=True).start()

    def _exit_with_worker(self) -> None:
        code = self.process.wait()
        print(f"prism worker exited with {code}; the actor exits so that Ray restarts it", file=sys.stderr, flush=True)
        os._exit(1)

    def worker_pid(self) -> int:
        return self.process.pid


class RayLauncher:
    """Ray is driven from one thread of its own, from `ray.init` to `ray.shutdown`: the processes a local
    Ray instance starts die with the thread that started them (their parent-death signal follows the
    thread), so that thread must live as long as the cluster is used."""

    def __init__(self, config: RayConfig, channel_address: str, secret: str):
        self.config = config
        self.channel_address = channel_address
        self.secret = secret
        self.worker_ids: list[str] = []
        self.error: BaseException | None = None
        self._actors: list[object] = []
        self._started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-launcher", daemon=True)

    def start(self, timeout_s: float) -> list[str]:
        """Connect to (or start) the Ray cluster and start the worker actors; their worker ids. Blocking."""
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"Ray did not start within {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"Ray: {type(self.error).__name__}: {self.error}") from self.error
        return self.worker_ids

    def stop(self, timeout_s: float = 60.0) -> None:
        """Kill the worker actors (their workers exit with them); disconnect from Ray, shutting down an
        instance started here. Blocking."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        import ray

        try:
            self._launch(ray)
        except BaseException as exc:  # reported by start()
            self.error = exc
        finally:
            self._started.set()
        self._stop.wait()
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if ray.is_initialized():
            ray.shutdown()

    def _launch(self, ray) -> None:
        local = self.config.address == "local"
        options = {"num_cpus": self.config.local_num_cpus, "object_store_memory": LOCAL_OBJECT_STORE_BYTES} if local else {}
        ray.init(address=None if local else self.config.address, include_dashboard=False, logging_level=logging.WARNING,
                 **options)
        address = self._address_for_workers(ray.util.get_node_ip_address())
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actor = ray.remote(max_restarts=-1, max_task_retries=0)(WorkerActor)
        level = logging.getLevelName(logging.getLogger("prism").getEffectiveLevel())
        devices = [(f"ray-gpu-{i}", "cuda:0", 1) for i in range(gpus)] + [(f"ray-cpu-{i}", "cpu", 0) for i in range(self.config.cpu_workers)]
        for worker_id, device, num_gpus in devices:
            self._actors.append(actor.options(name=f"prism-{worker_id}-{os.getpid()}", num_gpus=num_gpus,
                                              num_cpus=self.config.cpus_per_worker).remote(address, worker_id, device, self.secret, level))
            self.worker_ids.append(worker_id)
        logger.info("Ray: started %d worker actor(s) (%d for GPUs, %d for CPUs) that join %s", len(devices), gpus,
                    self.config.cpu_workers, address)
        if not devices:
            logger.error("Ray: the cluster has no GPU and ray.cpu_workers is 0: no worker will join")

    def _address_for_workers(self, node_ip: str) -> str:
        """The channel's address as the actors reach it: a wildcard listen address means this node's IP."""
        scheme_host, _, port = self.channel_address.rpartition(":")
        host = scheme_host.removeprefix("tcp://").strip("[]")
        if host in ANY_ADDRESS:
            return f"tcp://{node_ip}:{port}"
        return self.channel_address
