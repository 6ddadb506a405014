"""Process logging: plain text or one JSON object per line (``--log-format json``).

Request lines carry their fields as ``extra`` (request_id, protocol, method, model, version, rows,
status, duration_ms); the JSON formatter lifts them to top-level keys so log pipelines can index
them without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("request_id", "protocol", "method", "model", "version", "rows", "status", "duration_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # third-party libraries stay at INFO+ even when Iskander logs each request at DEBUG
    for noisy in ("grpc", "urllib3", "opentelemetry"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
