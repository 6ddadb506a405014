"""Process logging: plain text or one JSON object per line (``--log-format json``).

Request lines carry their fields as ``extra`` (request_id, protocol, method, model, version, rows,
status, duration_ms); the JSON formatter lifts them to top-level keys so log pipelines can index
them without parsing messages.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import traceback

FIELDS = ("request_id", "protocol", "method", "model", "version", "rows", "status", "duration_ms")


# The server sets sys.tracebacklimit = 0 to keep tracebacks off the Flight wire
# (frontends/flight_errors.py); log lines still get the whole traceback.
_LOG_TRACEBACK_LIMIT = 200


class TextFormatter(logging.Formatter):
    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        out = io.StringIO()
        traceback.print_exception(ei[0], ei[1], ei[2], limit=_LOG_TRACEBACK_LIMIT, file=out)
        return out.getvalue().rstrip("\n")


class JsonFormatter(TextFormatter):
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
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # third-party libraries stay at INFO+ even when Iskander logs each request at DEBUG
    for noisy in ("grpc", "urllib3", "opentelemetry"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
