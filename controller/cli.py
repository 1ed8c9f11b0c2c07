"""`prism`: serve (controller + workers), worker (join a controller), prep (prepare models and exit)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from controller.registry import Registry, RegistryError, default_registry_path, load_registry
from workers.contract.gc_heap import freeze_heap
from workers.contract.logs import configure_logging
from workers.contract.prepare import default_cache_dir

logger = logging.getLogger("prism")


def _registry_path(config: str | None) -> Path:
    return Path(config).resolve() if config else default_registry_path()


def _load(config: str | None) -> Registry:
    path = _registry_path(config)
    try:
        return load_registry(path)
    except RegistryError as exc:
        print(f"prism: invalid registry\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _catalog(registry: Registry, cache_dir: Path):
    from controller.catalog import CatalogError, build_catalog

    try:
        return build_catalog(registry, cache_dir)
    except CatalogError as exc:
        print(f"prism: cannot prepare models: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from controller.app import create_app
    from controller.devices import CannotStart
    from controller.http_server import AnnouncingServer, listening_socket
    from controller.server import Server

    registry = _load(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        registry = registry.model_copy(update={"server": registry.server.model_copy(update=overrides)})
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    catalog = _catalog(registry, cache_dir)
    try:
        server = Server(registry, catalog, cache_dir, _registry_path(args.config), args.log_format)
    except ValueError as exc:
        print(f"prism: invalid registry: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except CannotStart as exc:
        print(f"prism: cannot serve this registry here: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(registry, cache_dir, server)
    host, port = registry.server.host, registry.server.port
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        print(f"prism: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    port = sock.getsockname()[1]
    print(f"prism-serve starting on http://{host}:{port}: workers for {', '.join(server.devices) or 'no local device'}, "
          f"then the port opens", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level.lower(), access_log=args.access_log, timeout_graceful_shutdown=30, log_config=None)
    # Imports, catalog and tokenizers live as long as the process: full collections need not walk them.
    logger.info("start-up heap: %s", freeze_heap().describe())
    listening = f"prism-serve listening on http://{host}:{port} (models: {', '.join(catalog)})"
    try:
        AnnouncingServer(config, listening).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raised the signal
        raise SystemExit(130) from None


def prep(args: argparse.Namespace) -> None:
    registry = _load(args.config)
    catalog = _catalog(registry, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    for name, entry in catalog.items():
        print(f"{name}: {entry.weights_dir or 'dummy weights'} (context {entry.max_model_len})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the worker process is its own program: this process becomes it
        os.execv(sys.executable, [sys.executable, "-m", "workers.main", *argv[1:]])
    parser = argparse.ArgumentParser(prog="prism", description="prism-serve: many LLMs behind one OpenAI endpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the controller and its workers")
    p_serve.add_argument("--config", help="registry YAML (default: the embedded CPU demo)")
    p_serve.add_argument("--host", help="override server.host")
    p_serve.add_argument("--port", type=int, help="override server.port (0: a free port)")
    p_serve.add_argument("--cache-dir", help="where prepared models are cached (default: ~/.cache/prism-serve)")
    p_serve.add_argument("--log-level", default="INFO")
    p_serve.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line, with req_id")
    p_serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p_serve.set_defaults(func=serve)
    p_prep = sub.add_parser("prep", help="fetch and convert the registry's models into the cache, then exit")
    p_prep.add_argument("--config")
    p_prep.add_argument("--cache-dir")
    p_prep.set_defaults(func=prep)
    sub.add_parser("worker", help="run a worker that joins a controller (see `prism worker --help`)")
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"), "controller")
    args.func(args)


if __name__ == "__main__":
    main()
