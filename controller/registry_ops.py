"""Run-time registry changes: add, update and remove a model, and reload the registry file.

Changes made through the API live in memory; a reload re-reads the file and makes the served models
match it (models added through the API and absent from the file are removed). Sections other than
`models` (server, devices, memory, scheduler) take effect only on restart: a reload reports them.

Every change is all or nothing: the new entries are checked and prepared before anything is removed, so
an update or a reload that fails (a missing file, a model that cannot be prepared) leaves the served
models as they were.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from controller.catalog import CatalogEntry, CatalogError, build_entry
from controller.errors import APIError, InvalidRequest, ModelNotFound
from controller.model_sources import AdminSources
from controller.registry import ModelConfig, RegistryError, load_registry, resolve_model

logger = logging.getLogger("prism.controller")


class Conflict(APIError):
    """The operation clashes with the current state (e.g. adding a model that exists); the client changes it."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RegistryOps:
    def __init__(self, server):
        self.server = server
        self._lock = asyncio.Lock()
        self.sources = AdminSources.of(server.registry, server.registry_path, server.cache_dir)

    @property
    def base(self) -> Path:
        path = self.server.registry_path
        return path.parent if path is not None else Path.cwd()

    async def add(self, config: ModelConfig) -> dict:
        async with self._lock:
            if config.name in self.server.manager.runtimes:
                raise Conflict(f"model {config.name!r} exists; use PUT to update it", param="name")
            return await self._add(config)

    async def update(self, name: str, config: ModelConfig) -> dict:
        async with self._lock:
            if name not in self.server.manager.runtimes:
                raise ModelNotFound(f"the model {name!r} does not exist", param="name")
            if config.name != name:
                raise InvalidRequest(f"the body names {config.name!r}, the path {name!r}", param="name")
            entry = await self._prepare(config)  # raises before anything changed
            self._check_removable(name)
            await self._remove(name)
            return self._install(entry)

    async def remove(self, name: str) -> dict:
        async with self._lock:
            if name not in self.server.manager.runtimes:
                raise ModelNotFound(f"the model {name!r} does not exist", param="name")
            self._check_removable(name)
            await self._remove(name)
            return {"removed": name}

    async def reload(self) -> dict:
        """Re-read the registry file and make the served models match it."""
        path = self.server.registry_path
        if path is None:
            raise InvalidRequest("this server was started without a registry file to reload")
        async with self._lock:
            try:
                registry = await asyncio.to_thread(load_registry, path)
            except RegistryError as exc:
                raise InvalidRequest(f"the registry file is invalid, nothing changed:\n{exc}") from None
            wanted = {m.name: m for m in registry.models}
            current = {name: runtime.entry.config for name, runtime in self.server.manager.runtimes.items()}
            removed = [n for n in current if n not in wanted]
            changed = [n for n in current if n in wanted and wanted[n] != current[n]]
            added = [n for n in wanted if n not in current]
            entries: dict[str, CatalogEntry] = {}
            try:
                for name in changed + added:  # in order: a later model may use an earlier one's tokenizer
                    entries[name] = await self._prepare(wanted[name], resolved=True, beside=entries)
            except InvalidRequest as exc:
                raise InvalidRequest(f"{exc.message}; nothing changed") from None
            for name in removed + changed:
                self._check_removable(name, leaving=set(removed + changed))
            for name in removed + changed:
                await self._remove(name)
            for entry in entries.values():
                self._install(entry)
            old = self.server.registry
            restart = [s for s in ("server", "devices", "memory", "scheduler") if getattr(old, s) != getattr(registry, s)]
            return {"added": added, "updated": changed, "removed": removed, "restart_required_for": restart}

    async def _add(self, config: ModelConfig) -> dict:
        return self._install(await self._prepare(config))

    async def _prepare(self, config: ModelConfig, resolved: bool = False, beside: dict[str, CatalogEntry] | None = None) -> CatalogEntry:
        """The model's entry, its files checked and its weights prepared (`beside`: entries prepared with it,
        not yet served, whose tokenizers it may use); changes nothing served."""
        server = self.server
        if not resolved:  # from the admin API: confined, then checked
            self.sources.check(config, self.base, set(server.manager.runtimes))
            try:
                config = resolve_model(config, self.base, set(server.manager.runtimes))
            except RegistryError as exc:
                raise InvalidRequest(str(exc)) from None
        if config.device is not None and config.device not in server.devices:
            raise InvalidRequest(f"device {config.device!r} is not one of {server.devices}", param="device")
        try:
            entry = await asyncio.to_thread(build_entry, config, server.cache_dir, {**server.manager.entries, **(beside or {})})
        except CatalogError as exc:
            raise InvalidRequest(str(exc)) from None
        return entry

    def _install(self, entry: CatalogEntry) -> dict:
        self.server.manager.add(entry)
        self.server.events.add("model_added", entry.name)
        return {"added": entry.name, "max_model_len": entry.max_model_len}

    def _check_removable(self, name: str, leaving: set[str] = frozenset()) -> None:
        """Refuse (before anything changes) to remove a model whose tokenizer a staying model uses."""
        users = [n for n, e in self.server.manager.entries.items() if e.config.tokenizer == name and n != name and n not in leaving]
        if users:
            raise Conflict(f"{', '.join(sorted(users))} use the tokenizer of {name!r}; change them first", param="name")

    async def _remove(self, name: str) -> None:
        """Remove a model (the caller has checked that it may: `_check_removable`)."""
        server = self.server
        await server.manager.remove(name)
        server.events.add("model_removed", name)
