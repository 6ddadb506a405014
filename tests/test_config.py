"""Config loading: Rust-compatible keys, path resolution and errors that name file, model and key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from iskander.errors import ConfigError
import attrs

from iskander.config.fields import keys_of
from iskander.config.loader import default_config_path, load_config
from iskander.config.settings import (
    BACKEND_NAMES,
    BACKEND_OPTIONS,
    DynamicBatching,
    ModelSettings,
    ObservabilitySettings,
    OnnxOptions,
    PythonOptions,
    ServerSettings,
    WorkerOptions,
)

RUST_README_CONFIG = """\
[[models]]
name = "movielens-two-tower"
backend = "onnx"
path = "devmodels/movielens_two_tower/artifacts/two_tower.onnx"
execution_providers = ["cpu"]
intra_threads = 4
inter_threads = 1
optimization_level = "level3"
parallel_execution = false
memory_pattern = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_rust_readme_config_loads_and_serves(tmp_path, models_dir):
    """The Rust project's example config, unchanged, loads and its model serves."""
    model = tmp_path / "devmodels/movielens_two_tower/artifacts/two_tower.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes((models_dir / "two_tower.onnx").read_bytes())
    settings = load_config(write(tmp_path, RUST_README_CONFIG))
    (m,) = settings.models
    assert m.name == "movielens-two-tower"
    assert m.path == model.resolve()  # relative to the config file's folder
    assert m.options == OnnxOptions(intra_threads=4, inter_threads=1, optimization_level="all",
                                    parallel_execution=False, memory_pattern=True, execution_providers=("cpu",))
    assert m.manifest_path == model.with_name("two_tower.manifest.toml")

    from iskander.core.registry import ModelRegistry, ModelState

    registry = ModelRegistry(settings.models)
    registry.load_all()
    assert registry.find("movielens-two-tower").state is ModelState.READY


@pytest.mark.parametrize("level,expected", [
    ("disable", "disable"), ("level1", "basic"), ("basic", "basic"), ("level2", "extended"),
    ("extended", "extended"), ("level3", "all"), ("all", "all"),
])
def test_optimization_level_aliases(tmp_path, level, expected):
    cfg = write(tmp_path, f'[[models]]\nname = "m"\npath = "m.onnx"\noptimization_level = "{level}"\n')
    assert load_config(cfg).models[0].options.optimization_level == expected


def test_defaults_and_server_table(tmp_path):
    cfg = write(tmp_path, '[server]\nflight_port = 6000\n\n[[models]]\nname = "m"\npath = "sub/m.onnx"\n'
                          'manifest = "other.toml"\nversion = 3\n')
    s = load_config(cfg)
    assert s.server.flight_port == 6000 and s.server.grpc_port == 8001 and s.server.host == "127.0.0.1"
    m = s.models[0]
    assert m.version == 3 and m.manifest_path == (tmp_path / "other.toml").resolve()
    assert m.options.intra_threads == 1 and m.options.instances == 1


@pytest.mark.parametrize("body,expected", [
    ('[[models]]\nname = "m"\npath = "m.onnx"\nintra_thread = 2\n',
     "model 'm', key 'intra_thread': unknown key"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\noptimization_level = "turbo"\n',
     "model 'm', key 'optimization_level': unknown level 'turbo'"),
    ('[[models]]\nname = "m"\n', "model 'm', key 'path': is required"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\nintra_threads = "4"\n',
     "model 'm', key 'intra_threads': expected an integer, got str '4'"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\nintra_threads = true\n',
     "model 'm', key 'intra_threads': expected an integer, got boolean True"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\nbackend = "torch"\n',
     "model 'm', key 'backend': unsupported backend 'torch'"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\nexecution_providers = ["tpu"]\n',
     "model 'm', key 'execution_providers': unknown provider 'tpu'"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\nversion = 0\n',
     "model 'm', key 'version': must be a positive integer"),
    ('[[models]]\nname = "m"\npath = "a.onnx"\n[[models]]\nname = "m"\npath = "b.onnx"\n',
     "model 'm', key 'version': version 1 is configured twice"),
    ('[[models]]\npath = "m.onnx"\n', "model '#1', key 'name': is required"),
    ('[server]\ngrpc_port = 70000\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.grpc_port': must be a port number"),
    ('[server]\nport = 1\n[[models]]\nname = "m"\npath = "m.onnx"\n', "key 'server.port': unknown key"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\ndynamic_batching = { max_batch_rows = 0 }\n',
     "model 'm', key 'dynamic_batching.max_batch_rows': must be >= 1, got 0"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\ndynamic_batching = { max_delay = 5 }\n',
     "model 'm', key 'dynamic_batching.max_delay': unknown key"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\ndynamic_batching = { preferred_batch_rows = [4096] }\n',
     "model 'm', key 'dynamic_batching.preferred_batch_rows': must be integers in 1..max_batch_rows (1024)"),
    ('[server]\nrequest_timeout_s = -1\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.request_timeout_s': must be >= 0, got -1"),
    ('[server]\nauth_tokens = "secret"\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.auth_tokens': expected a list, got str 'secret'"),
    ('[observability]\notlp_insecure = 1\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'observability.otlp_insecure': expected a boolean, got int 1"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\ndynamic_batching = { max_queue_delay_us = true }\n',
     "model 'm', key 'dynamic_batching.max_queue_delay_us': expected an integer, got boolean True"),
    ('[[models]]\nname = "m"\npath = "m.onnx"\ndynamic_batching = 5\n',
     "model 'm', key 'dynamic_batching': must be a table, e.g. dynamic_batching = { max_batch_rows = 1024 }"),
    ('[[models]]\nname = "m"\npath = "m.py"\nbackend = "python"\nworker_timeout_s = 0\n',
     "model 'm', key 'worker_timeout_s': must be > 0, got 0"),
    ('[server]\nmax_concurrent_rpcs = 8\nmax_concurrent_streams = 8\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.max_concurrent_streams': must be >= 1 and below max_concurrent_rpcs (8)"),
    ('[server]\nauth_tokens = [""]\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.auth_tokens': must be a list of non-empty strings"),
    ('[server]\ntls_cert = "c.pem"\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.tls_cert': tls_cert and tls_key go together"),
    ('[server]\ntls_client_ca = "ca.pem"\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.tls_client_ca': mutual TLS needs tls_cert and tls_key too"),
    ('[server]\nmax_inflight = -1\n[[models]]\nname = "m"\npath = "m.onnx"\n',
     "key 'server.max_inflight': must be >= 0, got -1"),
    ('', "key 'models': at least one [[models]] table is required"),
    ('[[models]\n', "invalid TOML"),
])
def test_bad_config_names_file_model_and_key(tmp_path, body, expected):
    cfg = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value).startswith(f"config {cfg}")
    assert expected in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_cli_refuses_bad_config_with_the_message(tmp_path):
    cfg = write(tmp_path, '[[models]]\nname = "m"\npath = "m.onnx"\nmemory_patern = true\n')
    proc = subprocess.run(
        [sys.executable, "-m", "iskander", "--config", str(cfg), "--flight-port", "0", "--grpc-port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert f"config {cfg}, model 'm', key 'memory_patern': unknown key" in proc.stderr


def test_cli_help_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "iskander", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--config", "--host", "--flight-port", "--grpc-port"):
        assert flag in proc.stdout


def test_embedded_default_config_is_valid():
    s = load_config(default_config_path())
    assert {m.name for m in s.models} == {"two_tower", "tabular", "movielens-two-tower"}
    assert all(m.path.is_file() and m.manifest_path.is_file() for m in s.models)


def test_bad_manifest_fails_that_model_only(tmp_path, models_dir):
    (tmp_path / "t.onnx").write_bytes((models_dir / "tabular.onnx").read_bytes())
    (tmp_path / "t.manifest.toml").write_text('[[inputs]]\nname = "x"\ntype = "float128"\n')
    (tmp_path / "ok.onnx").write_bytes((models_dir / "tabular.onnx").read_bytes())
    (tmp_path / "ok.manifest.toml").write_text((models_dir / "tabular.manifest.toml").read_text())
    cfg = write(tmp_path, '[[models]]\nname = "t"\npath = "t.onnx"\n[[models]]\nname = "ok"\npath = "ok.onnx"\n')
    from iskander.core.registry import ModelRegistry, ModelState

    registry = ModelRegistry(load_config(cfg).models)
    registry.load_all()
    bad = registry.find("t")
    assert bad.state is ModelState.UNAVAILABLE
    assert "model 't', inputs[0] ('x') key 'type': unknown Arrow type 'float128'" in bad.reason
    assert registry.find("ok").state is ModelState.READY


def test_shipped_example_configs_load_and_serve():
    from iskander.core.registry import ModelRegistry, ModelState

    # churn-sklearn's joblib file is built, not committed: test_sklearn_backend serves that config
    configs = sorted(c for c in (Path(__file__).resolve().parents[1] / "configs").glob("*.toml")
                     if c.name != "churn-sklearn.toml")
    assert configs
    for cfg in configs:
        registry = ModelRegistry(load_config(cfg).models)
        registry.load_all()
        try:
            assert all(e.state is ModelState.READY for e in registry.all()), (cfg, [e.reason for e in registry.all()])
        finally:
            registry.close()


@pytest.mark.parametrize("flag", ["--flight-port", "--grpc-port"])
def test_port_in_use_is_a_clear_start_error(tmp_path, models_dir, flag):
    import socket

    cfg = write(tmp_path, f'[[models]]\nname = "t"\npath = "{models_dir}/tabular.onnx"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = {"--flight-port": "0", "--grpc-port": "0", flag: str(port)}
        proc = subprocess.run(
            [sys.executable, "-m", "iskander", "--config", str(cfg), *[x for kv in args.items() for x in kv]],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode != 0
    assert "cannot bind the" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_committed_demo_models_are_what_the_builder_makes(tmp_path):
    from iskander.demo.build import build_demo

    build_demo(tmp_path)
    demo = default_config_path().parent
    for name in ("two_tower.onnx", "tabular.onnx", "two_tower.manifest.toml", "tabular.manifest.toml", "config.toml"):
        assert (tmp_path / name).read_bytes() == (demo / name).read_bytes(), name


# --- each key is declared once, as a field, and documented --------------------------------------

def _known_keys(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(write(tmp_path, body))
    return re.search(r"known keys: ([^)]*)\)", str(info.value)).group(1).split(", ")


MODEL = '[[models]]\nname = "m"\npath = "m.onnx"\n'


@pytest.mark.parametrize("body,classes", [
    ('[server]\nbogus = 1\n' + MODEL, [ServerSettings]),
    ('[observability]\nbogus = 1\n' + MODEL, [ObservabilitySettings]),
    (MODEL + 'dynamic_batching = { bogus = 1 }\n', [DynamicBatching]),
    (MODEL + 'bogus = 1\n', [ModelSettings, OnnxOptions, WorkerOptions, PythonOptions]),
])
def test_the_loader_knows_exactly_the_settings_fields(tmp_path, body, classes):
    """The keys a table accepts are its classes' attrs fields: there is no second list to keep in step."""
    fields = {f.name for cls in classes for f in attrs.fields(cls)} - {"options"}  # options: the backend's keys
    assert _known_keys(tmp_path, body) == sorted(fields)
    assert set().union(*map(keys_of, classes)) == fields


def test_backend_options_declare_each_key_once():
    model = keys_of(ModelSettings)
    for cls in BACKEND_OPTIONS.values():
        assert not model & keys_of(cls), cls
    assert all(f.inherited for f in attrs.fields(PythonOptions) if f.name in keys_of(WorkerOptions))
    assert not keys_of(OnnxOptions) & keys_of(PythonOptions)
    assert BACKEND_NAMES == ("onnx", "python", "sklearn")


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("title,classes", [
    ("`[server]`", [ServerSettings]),
    ("`[observability]`", [ObservabilitySettings]),
    ("`[[models]]`", [ModelSettings, OnnxOptions, PythonOptions, DynamicBatching]),
])
def test_every_key_is_documented(title, classes):
    section = _section((Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text(), title)
    missing = [key for cls in classes for key in sorted(keys_of(cls)) if f"`{key}`" not in section]
    assert missing == []


def test_each_backend_gets_its_own_options_type(tmp_path):
    cfg = write(tmp_path, MODEL + 'instances = 2\n'
                '[[models]]\nname = "p"\npath = "p.py"\nbackend = "python"\nworkers = 3\nparameters = { a = 1 }\n'
                '[[models]]\nname = "s"\npath = "s.joblib"\nbackend = "sklearn"\nworker_timeout_s = 5\n')
    onnx, python, sklearn = load_config(cfg).models
    assert onnx.options == OnnxOptions(instances=2)
    assert python.options == PythonOptions(workers=3, parameters={"a": 1})
    assert type(sklearn.options) is WorkerOptions and sklearn.options.worker_timeout_s == 5.0
    # built in code, a model gets its backend's defaults; options of another backend are refused
    assert ModelSettings(name="m", path=Path("m.py"), backend="python").options == PythonOptions()
    with pytest.raises(ConfigError, match="backend 'onnx' takes OnnxOptions, got WorkerOptions"):
        ModelSettings(name="m", path=Path("m.onnx"), options=WorkerOptions())


def test_backends_refuse_options_of_another_backend(tmp_path):
    from iskander.backends.onnx import OnnxBackend
    from iskander.backends.python_worker import PythonBackend
    from iskander.errors import ModelLoadError

    with attrs.validators.disabled():  # only code that bypasses ModelSettings' own check gets this far
        onnx = ModelSettings(name="m", path=tmp_path / "m.onnx", options=WorkerOptions())
        python = ModelSettings(name="m", path=tmp_path / "m.py", backend="python", options=OnnxOptions())
    with pytest.raises(ModelLoadError, match="needs OnnxOptions, got WorkerOptions"):
        OnnxBackend(onnx)
    with pytest.raises(ModelLoadError, match="needs WorkerOptions, got OnnxOptions"):
        PythonBackend(python, (), ())
