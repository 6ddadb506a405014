"""deploy/: the container and Kubernetes/KServe manifests parse, and what they ask of the server works.

Every container argument list in the manifests (and the Containerfile's ENTRYPOINT + CMD) is run
through the real CLI with ``--check`` (config and models loaded, no port bound), with the
container's model folder mapped to a local copy of the demo models. Ports the arguments bind are
the ports the manifests expose and probe; the readiness probe's health service answers as
ServerReady does on a real server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import serving

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEMO = ROOT / "iskander" / "demo"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))


def _documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _containers() -> list[tuple[str, dict]]:
    """(where, container) for every container running the Iskander image."""
    found = []
    for path, doc in _documents():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)  # Deployment, or ServingRuntime's own containers
        for container in pod.get("containers", []):
            if "iskander" in container.get("image", ""):
                found.append((f"{path.name}:{doc['kind']}/{container['name']}", container))
    return found


def _containerfile_args() -> list[str]:
    text = (DEPLOY / "Containerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry == ["python", "-m", "iskander"]
    return cmd


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_manifest_is_valid_yaml_with_kind_and_api_version():
    assert MANIFESTS, "deploy/ holds no manifests"
    kinds = set()
    for path, doc in _documents():
        assert doc.get("apiVersion") and doc.get("kind"), path
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServingRuntime", "InferenceService"} <= kinds


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a container would find mounted: config.toml and the model files it names."""
    folder = tmp_path_factory.mktemp("mounted")
    for f in DEMO.iterdir():
        if f.suffix in (".onnx", ".toml"):
            shutil.copy(f, folder / f.name)
    return folder


def _check(args: list[str], model_folder: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI with the container's arguments; the config path is mapped to the local copy."""
    local = list(args)
    if "--config" in local:
        local[local.index("--config") + 1] = str(model_folder / "config.toml")
    return subprocess.run([sys.executable, "-m", "iskander", *local, "--check"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", [w for w, _ in _containers()] + ["Containerfile CMD"])
def test_container_arguments_are_accepted_by_the_cli(where, model_folder):
    args = _containerfile_args() if where == "Containerfile CMD" else dict(_containers())[where]["args"]
    result = _check(args, model_folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tabular version 1: READY" in result.stdout


def test_check_fails_and_names_the_model_that_does_not_load(tmp_path):
    (tmp_path / "config.toml").write_text('[[models]]\nname = "gone"\npath = "missing.onnx"\n')
    result = subprocess.run([sys.executable, "-m", "iskander", "--config", str(tmp_path / "config.toml"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "gone version 1: UNAVAILABLE" in result.stdout and "missing.onnx" in result.stdout


@pytest.mark.parametrize("where", [w for w, _ in _containers()])
def test_exposed_and_probed_ports_are_the_ports_the_server_binds(where):
    container = dict(_containers())[where]
    args = container["args"]
    bound = {int(p) for p in (_option(args, "--grpc-port"), _option(args, "--flight-port"),
                              _option(args, "--metrics-port")) if p is not None}
    exposed = {p["containerPort"] for p in container.get("ports", [])}
    assert exposed and exposed <= bound
    assert _option(args, "--host") == "0.0.0.0"  # reachable from outside the pod
    grpc_port = int(_option(args, "--grpc-port"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "iskander/ready"


def test_services_target_named_container_ports():
    names = {p["name"] for _, c in _containers() for p in c.get("ports", []) if "name" in p}
    for _, doc in _documents():
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in names, port


def test_autoscaler_scales_on_a_metric_the_server_exports():
    hpa = next(doc for _, doc in _documents() if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (ROOT / "docs" / "observability.md").read_text()


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_readiness_service_follows_server_ready(models_dir, tmp_path):
    """'iskander/ready' is SERVING only while every configured model is loaded; '' while the process serves."""
    config = (f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n\n'
              f'[[models]]\nname = "broken"\npath = "{models_dir}/broken.onnx"\n')
    serving_status = health_pb2.HealthCheckResponse.SERVING
    with serving(tmp_path, config) as server:
        assert _health(server.grpc_url, "") == serving_status
        assert _health(server.grpc_url, "iskander/ready") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(server.grpc_url, "tabular") == serving_status
    (tmp_path / "ok").mkdir()
    with serving(tmp_path / "ok", config.split("\n\n")[0] + "\n") as server:
        assert _health(server.grpc_url, "iskander/ready") == serving_status


def test_oip_round_robin_spreads_requests_over_replicas(models_dir, tmp_path):
    """What docs/deploy.md tells OIP clients to do (gRPC round_robin over every address the
    resolver returns; with DNS, a headless Service), here with the static ipv4: resolver."""
    import numpy as np
    import tritonclient.grpc as triton

    config = f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(tmp_path / "a", config) as first, serving(tmp_path / "b", config) as second:
        target = f"ipv4:{first.grpc_url},{second.grpc_url}"
        client = triton.InferenceServerClient(target, channel_args=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
        ])
        try:
            meta = client.get_model_metadata("tabular", as_json=True)
            for _ in range(20):
                inputs = []
                for spec in meta["inputs"]:
                    shape = [2] + [int(d) for d in spec["shape"][1:]]
                    tensor = triton.InferInput(spec["name"], shape, spec["datatype"])
                    if spec["datatype"] == "BYTES":
                        tensor.set_data_from_numpy(np.array([b"a"] * int(np.prod(shape)), dtype=object).reshape(shape))
                    else:
                        from tritonclient.utils import triton_to_np_dtype

                        tensor.set_data_from_numpy(np.zeros(shape, dtype=triton_to_np_dtype(spec["datatype"])))
                    inputs.append(tensor)
                client.infer("tabular", inputs)
        finally:
            client.close()
        counts = []
        for server in (first, second):
            c = triton.InferenceServerClient(server.grpc_url)
            stats = c.get_inference_statistics("tabular", as_json=True)["model_stats"][0]
            counts.append(int(stats["inference_stats"]["success"]["count"]))
            c.close()
    assert sum(counts) == 20 and min(counts) >= 5, counts  # round robin: both replicas answered
