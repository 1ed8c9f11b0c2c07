"""Host weight store: each model's weight image staged once per host in shared memory, pinned in every worker.

An image is the model's weights in their final byte layout (workers/weights/layout.py), so activating a
model is one contiguous copy from host to device memory, at PCIe line rate when the host side is pinned.
Images live in files under /dev/shm (POSIX shared memory): the first worker that needs one builds it
under a lock and marks it complete; every other worker on the host maps the same file. The store keeps
images within a byte budget, dropping least recently used ones that no engine is holding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)


PIN_PIECE_BYTES = 1 << 30  # an image is pinned a piece at a time, from its start (see HostImage.pin)


@dataclass(eq=False)
class HostImage:
    key: str
    path: Path
    num_bytes: int
    tensor: torch.Tensor  # uint8 view over the shared mapping
    _mapping: mmap.mmap = field(repr=False)
    pinned_on: str | None = None  # the device whose context pinned its pieces
    pinned_pieces: list[int] = field(default_factory=list)  # sizes of the page-locked pieces, in order from the start
    pin_refused: bool = False  # the driver would not page-lock this mapping: copies run from pageable memory
    users: int = 0
    _pin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pinned_bytes(self) -> int:
        """How many bytes from the start are page-locked (copies of them run at line rate)."""
        return sum(self.pinned_pieces)

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes == self.num_bytes

    def pin(self, device: str, whole: bool = False) -> bool:
        """Page-lock the mapping for DMA (cuMemHostRegister) so copies to `device` run at line rate.

        A piece of PIN_PIECE_BYTES at a time, in order: a copy that starts meanwhile takes the pinned pieces
        at line rate and the rest through bounce buffers (workers/engine/host_copy.py), and no one driver
        call holds the driver long (1 GiB in about 0.1 s on the lent H100; a whole 16 GB image took 1.8 s
        in a worker restarted over it). A DMA copy must not span two pieces (the driver refuses it):
        `whole` pins the image in one piece, for an image about to be filled from the device by copies of
        any size and place. Shared memory (/dev/shm) can be pinned; a file on a disk file system may be
        refused (Linux does not page-lock file-backed mappings for long): then the image stays usable,
        unpinned, and this says so once. Through the driver API, so that a refusal leaves no error behind
        for torch's next launch check (the runtime's cudaHostRegister does). Returns whether the image is
        pinned.
        """
        if not device.startswith("cuda"):
            return False
        with self._pin_lock:
            if self.pinned or self.pin_refused:
                return self.pinned
            from memory.backend import BackendError
            from memory.cuda_backend import CudaBackend

            backend = CudaBackend(self.pinned_on or device)
            try:
                while not self.pinned:
                    start = self.pinned_bytes
                    piece = self.tensor[start:] if whole else self.tensor[start : start + PIN_PIECE_BYTES]
                    backend.pin_host(piece)
                    self.pinned_on = self.pinned_on or device
                    self.pinned_pieces.append(piece.numel())
            except BackendError as error:
                self.pin_refused = True
                logger.warning("could not pin the weight image %s (%d bytes; %s): copies from its unpinned part go "
                               "through bounce buffers; keep the host store in /dev/shm", self.path, self.num_bytes, error)
                return False
            finally:
                backend.close()
            return True

    def close(self) -> None:
        with self._pin_lock:
            if self.pinned_pieces:
                from memory.cuda_backend import CudaBackend

                backend = CudaBackend(self.pinned_on)
                try:
                    start = 0
                    for size in self.pinned_pieces:
                        backend.unpin_host(self.tensor[start : start + size])
                        start += size
                finally:
                    backend.close()
                self.pinned_pieces = []
                self.pinned_on = None
        del self.tensor
        self._mapping.close()


def image_key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


class HostWeightStore:
    def __init__(self, budget_bytes: int, root: Path, prefix: str):
        """`root`: a tmpfs folder (the registry's `memory.host_store_dir`); `prefix`: this server's image names."""
        self.budget_bytes = budget_bytes
        self.root = Path(root)
        self.prefix = prefix
        self._images: OrderedDict[str, HostImage] = OrderedDict()
        self._building: dict[str, threading.Event] = {}  # images being filled, by key
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        return sum(image.num_bytes for image in self._images.values())

    def acquire(self, key: str, num_bytes: int, fill: Callable[[torch.Tensor], None], pin_device: str | None = None) -> HostImage:
        """The image `key`, built with `fill(uint8 tensor)` if no process on this host built it yet.

        `pin_device`: an image built here is pinned for that device before it is filled, so that the
        fill's own copies (dummy weights generated on the GPU) run at DMA speed into memory that is
        already faulted in; it stays pinned. The caller holds the image (it is not dropped) until `release`.
        """
        while True:
            with self._lock:
                image = self._images.get(key)
                if image is not None:
                    self._images.move_to_end(key)
                    image.users += 1
                    self._trim_locked()
                    return image
                building = self._building.get(key)
                if building is None:  # this thread builds it; others wait for it, outside the lock
                    building = self._building[key] = threading.Event()
                    break
            building.wait()
        try:
            image = self._open(key, num_bytes, fill, pin_device)  # fills outside the lock: images stage in parallel
            with self._lock:
                self._images[key] = image
                image.users += 1
                self._trim_locked()
            return image
        finally:
            with self._lock:
                del self._building[key]
            building.set()

    def has(self, key: str) -> bool:
        """Whether the image `key` is staged here (acquiring it is then a lookup)."""
        with self._lock:
            return key in self._images

    def is_pinned(self, key: str) -> bool:
        """Whether the image `key` is staged here and page-locked whole."""
        with self._lock:
            image = self._images.get(key)
            return image is not None and image.pinned

    def release(self, image: HostImage) -> None:
        with self._lock:
            image.users -= 1
            self._trim_locked()

    def drop_all(self, unlink: bool = False) -> None:
        with self._lock:
            for image in self._images.values():
                image.close()
                if unlink:
                    _unlink_image(image.path)
            self._images.clear()

    def _trim_locked(self) -> None:
        """Drop least recently used images nobody holds until the store fits its budget."""
        for key in list(self._images):
            if self.num_bytes <= self.budget_bytes:
                return
            image = self._images[key]
            if image.users == 0:
                logger.info("host store: dropping image %s (%.1f GiB)", key, image.num_bytes / 2**30)
                image.close()
                _unlink_image(image.path)
                del self._images[key]

    def _open(self, key: str, num_bytes: int, fill: Callable[[torch.Tensor], None], pin_device: str | None) -> HostImage:
        path = self.root / f"{self.prefix}{key}"
        stat = os.statvfs(self.root)
        if not path.exists() and stat.f_bavail * stat.f_frsize < num_bytes:
            # Writing past the end of a full tmpfs would kill the process with SIGBUS: refuse instead.
            raise MemoryError(f"{self.root} has {stat.f_bavail * stat.f_frsize} bytes free; a weight image needs {num_bytes}")
        done = path.with_name(path.name + ".complete")
        with _file_lock(path.with_name(path.name + ".lock")):
            if not done.exists() or not path.exists() or path.stat().st_size != num_bytes:
                done.unlink(missing_ok=True)
                image = self._map(key, path, num_bytes, create=True)
                try:
                    if pin_device is not None:
                        image.pin(pin_device, whole=True)  # the fill's copies go anywhere in it
                    fill(image.tensor)
                    image._mapping.flush()
                except BaseException:
                    image.close()  # unpinned and unmapped: the next try starts afresh
                    raise
                done.touch()
                return image
        return self._map(key, path, num_bytes, create=False)

    @staticmethod
    def _map(key: str, path: Path, num_bytes: int, create: bool) -> HostImage:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, num_bytes)
            mapping = mmap.mmap(fd, num_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        return HostImage(key, path, num_bytes, tensor, mapping)


def _unlink_image(path: Path) -> None:
    """Remove an image and its completion marker (the marker first: a marker without its image would say a
    missing image is complete)."""
    path.with_name(path.name + ".complete").unlink(missing_ok=True)
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
