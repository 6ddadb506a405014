"""TLS and mutual TLS on both frontends (issue 6), with certificates made in the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import numpy as np
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from helpers import exchange, serving


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool, san: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("iskander-test-ca", ca_key, None, ca_key, ca=True, san=False)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for name, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}_cert"] = _cert(f"iskander-{name}", ca_key, ca.subject, key, ca=False, san=san).public_bytes(
            serialization.Encoding.PEM)
        files[f"{name}_key"] = _pem_key(key)
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _config(models_dir: Path, pki: dict[str, Path], mtls: bool) -> str:
    lines = ["[server]", f'tls_cert = "{pki["server_cert"]}"', f'tls_key = "{pki["server_key"]}"']
    if mtls:
        lines.append(f'tls_client_ca = "{pki["ca"]}"')
    return "\n".join(lines) + f'\n\n[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n'


def _oip_inputs():
    inputs = []
    for name, data, dtype in (("entity_id", np.array([[b"a"]], dtype=np.object_), "BYTES"),
                              ("features", np.ones((1, 4), np.float32), "FP32"),
                              ("category", np.ones((1, 1), np.int64), "INT64")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def test_tls_on_both_frontends(models_dir, pki, tmp_path):
    with serving(tmp_path, _config(models_dir, pki, mtls=False)) as server:
        assert server.flight_uri.startswith("grpc+tls://")
        c = triton.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki["ca"]))
        assert c.infer("tabular", _oip_inputs()).as_numpy("score").shape == (1, 1)
        c.close()
        plain = triton.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        plain.close()
        fc = flight.connect(server.flight_uri, tls_root_certs=pki["ca"].read_bytes())
        batch, _ = tabular_batch(3)
        assert exchange(fc, "tabular", [batch])[0].num_rows == 3
        fc.close()


def test_mutual_tls_requires_a_client_certificate(models_dir, pki, tmp_path):
    with serving(tmp_path, _config(models_dir, pki, mtls=True)) as server:
        anonymous = triton.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki["ca"]))
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live(client_timeout=5)
        anonymous.close()
        c = triton.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki["ca"]),
                                         private_key=str(pki["client_key"]),
                                         certificate_chain=str(pki["client_cert"]))
        assert c.infer("tabular", _oip_inputs()).as_numpy("score").shape == (1, 1)
        c.close()
        fc = flight.connect(server.flight_uri, tls_root_certs=pki["ca"].read_bytes(),
                            cert_chain=pki["client_cert"].read_bytes(), private_key=pki["client_key"].read_bytes())
        batch, _ = tabular_batch(2)
        assert exchange(fc, "tabular", [batch])[0].num_rows == 2
        fc.close()
        nocert = flight.connect(server.flight_uri, tls_root_certs=pki["ca"].read_bytes())
        with pytest.raises(flight.FlightError):
            exchange(nocert, "tabular", [batch])
        nocert.close()
