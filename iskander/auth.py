"""Bearer-token authentication, shared by both frontends.

Tokens come from the config (`auth_tokens`), a file (`auth_token_file`, one per line) and the
ISKANDER_AUTH_TOKENS environment variable (comma-separated); any of them grants access. Clients send
`authorization: Bearer <token>` (gRPC metadata, Flight headers). Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from iskander.errors import ConfigError

ENV_VAR = "ISKANDER_AUTH_TOKENS"


class TokenAuth:
    def __init__(self, tokens: set[bytes]) -> None:
        self._tokens = tuple(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, authorization: str | bytes | None) -> bool:
        """True if the header value is 'Bearer <a known token>'."""
        if authorization is None:
            return False
        value = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        ok = False
        for known in self._tokens:  # no early exit: the time taken does not depend on which token matched
            ok |= hmac.compare_digest(known, token)
        return ok


    def check_headers(self, values: list[str | bytes] | tuple[str | bytes, ...]) -> bool:
        """The one rule for both frontends: exactly one ``authorization`` header, and it is valid.
        Two headers are refused even if one is valid: proxies and clients disagree on which of
        several wins, so accepting any would let a forwarded header override the caller's."""
        return len(values) == 1 and self.check(values[0])


def load_tokens(tokens: tuple[str, ...], token_file: Path | None) -> TokenAuth:
    found = {t.encode() for t in tokens if t}
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"auth_token_file {token_file}: cannot read: {exc.strerror or exc}") from None
        found |= {line.strip().encode() for line in lines if line.strip() and not line.startswith("#")}
    found |= {t.strip().encode() for t in os.environ.get(ENV_VAR, "").split(",") if t.strip()}
    return TokenAuth(found)


class TlsFiles:
    """PEM bytes for the server certificate, its key and (for mutual TLS) the client CA bundle."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert = _read(cert, "tls_cert")
        self.key = _read(key, "tls_key")
        self.client_ca = _read(client_ca, "tls_client_ca") if client_ca else None


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror or exc}") from None
