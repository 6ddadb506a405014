"""How a setting is declared: one attrs field whose metadata carries what the loader needs.

``setting(default, toml=int, check=at_least(0), doc=...)`` gives the field its default, the TOML
value types it accepts, a check (which may also convert: ``check(value)`` returns what is stored or
raises BadValue with the message) and whether it names a file. ``loader.py`` walks these fields, so a
key, its type, its default and its validation are written in one place.

Checks run only when a config file is loaded; settings built in code are taken as given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs

Check = Callable[[Any], Any]
NUMBER = (int, float)  # a TOML integer is a fine number of seconds; stored as float


class BadValue(ValueError):
    """A value of the right type out of its range; the message completes "config F, key 'K': "."""


@attrs.frozen
class Setting:
    toml: tuple[type, ...]  # accepted TOML value types (a TOML bool is never an int)
    check: Check | None = None
    doc: str = ""
    key: str | None = None  # the TOML key when it differs from the field name
    path: bool = False  # a file name, resolved against the config file's folder; "" = none
    required: str | None = None  # the message when the key is missing; None = optional
    table: type | None = None  # a nested TOML table read into this settings class


_METADATA = "iskander.setting"


def setting(
    default: Any = attrs.NOTHING,
    *,
    toml: type | tuple[type, ...] | None = None,
    check: Check | None = None,
    doc: str,
    key: str | None = None,
    path: bool = False,
    required: str | None = None,
    table: type | None = None,
    factory: Callable[[], Any] | None = None,
    hash: bool | None = None,
) -> Any:
    """An attrs field that is also a config key (see the module docstring)."""
    kinds = (dict,) if table is not None else (str,) if path else toml
    if kinds is None:
        raise TypeError("setting() needs toml=, path=True or table=")
    meta = Setting(kinds if isinstance(kinds, tuple) else (kinds,), check, doc, key, path, required, table)
    return attrs.field(default=default, factory=factory, hash=hash, metadata={_METADATA: meta})


@functools.cache
def settings_of(cls: type) -> tuple[tuple[str, attrs.Attribute, Setting], ...]:
    """(TOML key, field, setting) of every config key of ``cls``, in declaration order."""
    return tuple((meta.key or field.name, field, meta) for field in attrs.fields(cls)
                 if (meta := field.metadata.get(_METADATA)) is not None)


@functools.cache
def keys_of(cls: type) -> frozenset[str]:
    return frozenset(key for key, _, _ in settings_of(cls))


# --- checks: each returns the value to store or raises BadValue ----------------------------------

def at_least(low: int) -> Check:
    def check(value: Any) -> Any:
        if value < low:
            raise BadValue(f"must be >= {low}, got {value}")
        return value
    return check


def above(low: int) -> Check:
    def check(value: Any) -> Any:
        if value <= low:
            raise BadValue(f"must be > {low}, got {value}")
        return value
    return check


def within(low: int, high: int) -> Check:
    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise BadValue(f"must be in {low}..{high}, got {value}")
        return value
    return check


def port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise BadValue(f"must be a port number 0..65535, got {value}")
    return value


def one_of(choices: Sequence[str]) -> Check:
    def check(value: str) -> str:
        if value not in choices:
            raise BadValue(f"must be one of {', '.join(choices)}, got '{value}'")
        return value
    return check


def none_if_empty(value: Any) -> Any:
    """0 or "" in TOML means "not set" (TOML has no null)."""
    return value or None


def then(*checks: Check) -> Check:
    def check(value: Any) -> Any:
        for c in checks:
            value = c(value)
        return value
    return check
