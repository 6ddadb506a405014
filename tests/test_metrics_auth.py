"""/metrics behind a bearer token (issue 12): ``[observability] metrics_auth_token`` and the
ISKANDER_METRICS_TOKEN environment variable, scraped with urllib from a real server process."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request

import pytest

from data import tabular_batch
from helpers import exchange, serving

TOKEN = "s3cret-metrics-token"

CONFIG = """\
[observability]
metrics_port = 0
{extra}

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"
"""


def get(url: str, *headers: tuple[str, str]) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of a GET; repeated header names are sent as given (http.client)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", parts.path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def protected(models_dir, tmp_path_factory):
    config = CONFIG.format(root=models_dir, extra=f'metrics_auth_token = "{TOKEN}"')
    with serving(tmp_path_factory.mktemp("metrics_auth"), config) as server:
        yield server


def test_metrics_need_the_bearer_token(protected):
    batch, _ = tabular_batch(3)
    exchange(protected.flight_uri, "tabular", [batch])  # something to count
    url = protected.metrics_url
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert "iskander_" not in refused.value.read().decode()  # nothing leaks with the refusal

    for bad in ("Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer "):
        status, headers, body = get(url, ("Authorization", bad))
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], bad
        assert "iskander_" not in body

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    assert 'model="tabular"' in text and "process_resident_memory_bytes" in text
    status, _, text = get(url, ("authorization", f"bearer {TOKEN}"))  # scheme and header name: any case
    assert status == 200 and 'model="tabular"' in text


def test_two_authorization_headers_are_refused(protected):
    # the rule of both gRPC frontends: exactly one header, even when one of them is valid
    status, _, _ = get(protected.metrics_url, ("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x"))
    assert status == 401


def test_the_token_can_come_from_the_environment(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ISKANDER_METRICS_TOKEN", "from-env")
    with serving(tmp_path, CONFIG.format(root=models_dir, extra="")) as server:
        assert get(server.metrics_url)[0] == 401
        status, _, text = get(server.metrics_url, ("Authorization", "Bearer from-env"))
        assert status == 200 and "iskander_" in text
        assert "from-env" not in server.log()  # the token is never logged


def test_metrics_stay_open_without_a_token(models_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ISKANDER_METRICS_TOKEN", raising=False)
    with serving(tmp_path, CONFIG.format(root=models_dir, extra="")) as server:
        status, _, text = get(server.metrics_url)
        assert status == 200 and "process_resident_memory_bytes" in text
