"""Bounded echo of client-supplied text (model names, versions, ids, column names).

A client controls these strings; a 10 MB model name must not become a 10 MB log line or error
message per request. Everything a client sent that Iskander repeats goes through ``clip``.
"""

from __future__ import annotations

MAX_ECHO_CHARS = 128


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` as text of at most ``limit`` characters; longer text keeps its head and says how
    much was cut, so two long names still read differently in a log."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"
