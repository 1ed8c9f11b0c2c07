"""Logging for the controller and its workers: plain text by default, one JSON object per line with
`--log-format json`. Request-scoped lines carry `req_id` and `model` (the same id in the controller's
and the worker's lines), so one request can be followed across processes."""

from __future__ import annotations

import json
import logging
import time

CONTEXT_FIELDS = ("req_id", "model", "device", "outcome", "status", "prompt_tokens", "completion_tokens", "ttft_s", "e2e_s", "error")


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"%(asctime)s %(levelname)s {process} %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k))
        return f"{line} [{context}]" if context else line


def configure_logging(level: str, fmt: str, process: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
