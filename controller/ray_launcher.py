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
    def __init__(self, config: RayConfig, channel_address: str, secret: str):
        self.config = config
        self.channel_address = channel_address
        self.secret = secret
        self.actors: dict[str, object] = {}
        self._started_ray = False

    def start(self) -> list[str]:
        """Connect to (or start) the Ray cluster and start the worker actors; their worker ids. Blocking."""
        import ray

        if not ray.is_initialized():
            local = self.config.address == "local"
            options = {"num_cpus": self.config.local_num_cpus, "object_store_memory": 80 * 2**20} if local else {}
            ray.init(address=None if local else self.config.address, include_dashboard=False, logging_level=logging.WARNING,
                     **options)
            self._started_ray = local
        address = self._address_for_workers(ray.util.get_node_ip_address())
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actor = ray.remote(max_restarts=-1, max_task_retries=0)(WorkerActor)
        level = logging.getLevelName(logging.getLogger("prism").getEffectiveLevel())
        for i in range(gpus):
            worker_id = f"ray-gpu-{i}"
            self.actors[worker_id] = actor.options(name=f"prism-{worker_id}-{os.getpid()}", num_gpus=1, num_cpus=self.config.cpus_per_worker
                                                   ).remote(address, worker_id, "cuda:0", self.secret, level)
        for i in range(self.config.cpu_workers):
            worker_id = f"ray-cpu-{i}"
            self.actors[worker_id] = actor.options(name=f"prism-{worker_id}-{os.getpid()}", num_cpus=self.config.cpus_per_worker
                                                   ).remote(address, worker_id, "cpu", self.secret, level)
        logger.info("Ray: started %d worker actor(s) (%d GPU, %d CPU) joining %s", len(self.actors), gpus,
                    self.config.cpu_workers, address)
        if not self.actors:
            logger.error("Ray: the cluster has no GPU and ray.cpu_workers is 0: no worker will join")
        return list(self.actors)

    def _address_for_workers(self, node_ip: str) -> str:
        """The channel's address as the actors reach it: a wildcard listen address means this node's IP."""
        scheme_host, _, port = self.channel_address.rpartition(":")
        host = scheme_host.removeprefix("tcp://").strip("[]")
        if host in ANY_ADDRESS:
            return f"tcp://{node_ip}:{port}"
        return self.channel_address

    def stop(self) -> None:
        """Kill the worker actors (their workers exit with them); shut down a Ray instance started here. Blocking."""
        import ray

        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors.clear()
        if ray.is_initialized():
            ray.shutdown()
