"""The import layering of docs/architecture.md, checked on the source (no imports executed).

frontends -> core -> contract -> backends: a layer imports only what lies below it, a model runtime
is imported only by its backend module, and nothing above the backends names an implementation.
Every import statement counts, including those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "iskander"

# Layers below the frontends: protocol-agnostic, so neither gRPC nor Flight nor any frontend.
CORE = {
    "iskander.core.dataplane", "iskander.core.registry", "iskander.contract.compile", "iskander.core.batcher", "iskander.observability.stats",
    "iskander.observability.observer", "iskander.config.settings", "iskander.contract.manifest", "iskander.errors", "iskander.text",
    "iskander.core.control", "iskander.arrow.types", "iskander.arrow.tensor", "iskander.arrow.checks",
}
PROTOCOLS = ("grpc", "grpc_health", "pyarrow.flight", "iskander.frontends", "iskander._proto")
RUNTIMES = ("onnxruntime", "onnx")
# What the contract and the backends may import from iskander (everything else is above them).
CONTRACT_MAY_IMPORT = ("iskander.arrow.types", "iskander.arrow.tensor", "iskander.errors", "iskander.contract.manifest",
                       "iskander.text", "iskander.backends.base")
BACKENDS_MAY_IMPORT = ("iskander.backends", "iskander.arrow.types", "iskander.arrow.tensor", "iskander.errors",
                       "iskander.config.settings", "iskander.text")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` imports (``from a import b`` gives a and a.b)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # may name a submodule
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, set[str]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_proto" in path.parts:
            continue  # generated protobuf code
        name = module_name(path)
        out[name] = imports_of(path.read_text(), name, path.name == "__init__.py")
    return out


MODULES = _modules()


def _violations(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {i}" for m in sorted(modules) for i in sorted(MODULES[m]) if _under(i, banned)]


def test_the_module_lists_name_existing_modules():
    assert CORE <= set(MODULES), sorted(CORE - set(MODULES))
    assert "iskander.backends.base" in MODULES and "iskander.backends.onnx" in MODULES


def test_only_the_onnx_backend_imports_onnx_runtime():
    # iskander.demo builds ONNX files with the onnx package; it is a tool, not the server.
    allowed = {m for m in MODULES if m.startswith("iskander.backends.onnx") or _under(m, ("iskander.demo",))}
    assert _violations(set(MODULES) - allowed, RUNTIMES) == []


def test_only_the_sklearn_model_imports_joblib_or_sklearn():
    # joblib.load unpickles: it belongs in the worker-side model, never in the server process
    allowed = {"iskander.backends.sklearn_model"}
    assert _violations(set(MODULES) - allowed, ("joblib", "sklearn", "pandas")) == []


def test_core_layers_import_no_protocol():
    backends = {m for m in MODULES if _under(m, ("iskander.backends",))}
    assert _violations(CORE | backends, PROTOCOLS) == []


def test_above_the_backends_only_the_interface_is_visible():
    implementations = tuple(m for m in MODULES if _under(m, ("iskander.backends",))
                            and m not in ("iskander.backends", "iskander.backends.base"))
    outside = {m for m in MODULES if not _under(m, ("iskander.backends",))}
    assert _violations(outside, implementations) == []


def test_contract_imports_only_what_lies_below_it():
    bad = [i for i in MODULES["iskander.contract.compile"] if _under(i, ("iskander",)) and not _under(i, CONTRACT_MAY_IMPORT)]
    assert bad == []


def test_backends_import_nothing_above_them():
    bad = [f"{m} imports {i}" for m in MODULES if _under(m, ("iskander.backends",))
           for i in MODULES[m] if _under(i, ("iskander",)) and not _under(i, BACKENDS_MAY_IMPORT)]
    assert bad == []


def test_the_client_imports_only_itself():
    """iskander.client runs on machines that serve nothing (docs/architecture.md)."""
    bad = [f"{m} imports {i}" for m in MODULES if _under(m, ("iskander.client",))
           for i in MODULES[m] if _under(i, ("iskander",)) and not _under(i, ("iskander.client",))]
    assert bad == []


INTEGRATIONS_MAY_IMPORT = ("iskander.client", "iskander.embedded", "iskander.integrations")
# Each engine's package is imported by its own module only (and only when its function runs).
ENGINE_PACKAGES = {"iskander.integrations.ray": "ray", "iskander.integrations.spark": "pyspark"}


def test_integrations_stand_apart_like_the_client():
    """Ray and Spark integrations reach a model through the client (server=) or the embedded
    engine (config=), never through the core; nothing in the server imports them."""
    integrations = {m for m in MODULES if _under(m, ("iskander.integrations",))}
    assert integrations >= {"iskander.integrations", "iskander.integrations.ray", "iskander.integrations.spark"}
    bad = [f"{m} imports {i}" for m in integrations for i in MODULES[m]
           if _under(i, ("iskander",)) and not _under(i, INTEGRATIONS_MAY_IMPORT)]
    assert bad == []
    assert _violations(set(MODULES) - integrations, ("iskander.integrations",)) == []


def test_ray_and_pyspark_only_in_their_integration_modules():
    for module, package in ENGINE_PACKAGES.items():
        assert _violations(set(MODULES) - {module}, (package,)) == [], package


def test_the_embedded_engine_is_the_server_without_its_protocols():
    """iskander.embedded wires the core like server.py but opens no port: no gRPC, no Flight."""
    assert _violations({"iskander.embedded"}, PROTOCOLS) == []
    assert _violations(set(MODULES) - {"iskander.embedded"} - {m for m in MODULES if _under(
        m, ("iskander.integrations",))}, ("iskander.embedded",)) == []


@pytest.mark.parametrize(("source", "module", "expected"), [
    ("import onnxruntime as ort", "iskander.contract.compile", "onnxruntime"),
    ("def f():\n    from onnx import helper", "iskander.core.dataplane", "onnx.helper"),
    ("from ..frontends import flight", "iskander.core.registry", "iskander.frontends.flight"),
    ("from ..frontends.oip import x", "iskander.backends.onnx", "iskander.frontends.oip"),
    ("from .onnx import OnnxBackend", "iskander.backends", "iskander.backends.onnx"),
    ("from pyarrow import flight", "iskander.core.dataplane", "pyarrow.flight"),
])
def test_the_checker_sees_imports(source, module, expected):
    """The rules above are only as good as this resolution of relative and nested imports."""
    assert expected in imports_of(source, module, is_package=module == "iskander.backends")
