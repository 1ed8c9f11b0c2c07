"""The names of a controller's weight images in the host store, and the removal of those whose controller
is gone (a controller killed with SIGKILL cannot remove its own; they hold tmpfs memory until deleted).

The controller never imports torch, so this works on names and pids only (memory/host_store.py, which
maps the images, is the workers').
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("prism.controller")

STORE_PREFIX = "prism-weights-{pid}-"  # a controller's weight images in the host store: removed when it stops
_IMAGE_NAME = re.compile(r"prism-weights-(\d+)-")


def sweep_orphan_images(store_dir: Path) -> None:
    """Remove the weight images (and their lock and completion files) of controllers that are gone: one
    killed with SIGKILL could not remove its own, and they hold host memory (a tmpfs) until deleted."""
    gone: dict[int, list[Path]] = {}
    for path in store_dir.glob("prism-weights-*"):
        match = _IMAGE_NAME.match(path.name)
        if match and not _controller_alive(int(match.group(1))):
            gone.setdefault(int(match.group(1)), []).append(path)
    if not gone:
        return
    freed = 0
    for paths in gone.values():
        for path in paths:
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass  # another controller swept it meanwhile
    logger.warning("removed %.2f GiB of weight images in %s left by controllers that are gone (pid %s)", freed / 2**30,
                   store_dir, ", ".join(map(str, sorted(gone))))


def _controller_alive(pid: int) -> bool:
    """Whether `pid` is a running prism-serve controller (a reused pid of another program is not)."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:  # another user's process: not ours to judge
        return True
    return b"serve" in words and any(w.endswith((b"prism", b"controller.cli")) for w in words)
