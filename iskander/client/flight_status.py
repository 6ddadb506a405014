"""Reading an Iskander error back from a Flight client exception (client side of flight_errors).

Client mistakes arrive as ``pa.ArrowInvalid`` / ``pa.ArrowKeyError`` / ``pa.ArrowNotImplementedError``
(gRPC INVALID_ARGUMENT / NOT_FOUND / UNIMPLEMENTED) whose message ends with the status detail, the
last line of which is the JSON details; other errors are ``FlightError``s with the JSON in
``extra_info``. Clients in other languages read the same JSON from the ``x-arrow-status-detail-bin``
trailer (last line) or ``grpc-status-details-bin`` (FlightErrors).
"""

from __future__ import annotations

import json
from typing import Any

_DETAIL = ". Detail: "


def error_details(exc: BaseException) -> dict[str, Any]:
    """The JSON details ({"code", "message", ...}) of a Flight error from an Iskander server, or {}."""
    extra = getattr(exc, "extra_info", None)
    if extra:
        try:
            data = json.loads(extra)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
    text = str(exc)
    if _DETAIL in text:
        for line in reversed(text.split(_DETAIL, 1)[1].splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    break
                return data if isinstance(data, dict) else {}
    return {}

