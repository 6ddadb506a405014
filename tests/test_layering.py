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
# (Every module of iskander.contract is one too: CONTRACT, below.)
CORE = {
    "iskander.core.dataplane", "iskander.core.registry", "iskander.core.batcher", "iskander.observability.stats",
    "iskander.observability.observer", "iskander.config.settings", "iskander.errors", "iskander.text",
    "iskander.core.control", "iskander.arrow.types", "iskander.arrow.tensor", "iskander.arrow.checks",
}
PROTOCOLS = ("grpc", "grpc_health", "pyarrow.flight", "iskander.frontends", "iskander._proto")
RUNTIMES = ("onnxruntime", "onnx")
# What the contract and the backends may import from iskander (everything else is above them).
CONTRACT_MAY_IMPORT = ("iskander.arrow.types", "iskander.arrow.tensor", "iskander.errors", "iskander.contract",
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
CONTRACT = {m for m in MODULES if _under(m, ("iskander.contract",))}


def _violations(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {i}" for m in sorted(modules) for i in sorted(MODULES[m]) if _under(i, banned)]


def test_the_module_lists_name_existing_modules():
    assert CORE <= set(MODULES), sorted(CORE - set(MODULES))
    assert {"iskander.contract", "iskander.contract.compile", "iskander.contract.manifest"} <= CONTRACT
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
    assert _violations(CORE | CONTRACT | backends, PROTOCOLS) == []


def test_above_the_backends_only_the_interface_is_visible():
    implementations = tuple(m for m in MODULES if _under(m, ("iskander.backends",))
                            and m not in ("iskander.backends", "iskander.backends.base"))
    outside = {m for m in MODULES if not _under(m, ("iskander.backends",))}
    assert _violations(outside, implementations) == []


def test_contract_imports_only_what_lies_below_it():
    bad = [f"{m} imports {i}" for m in sorted(CONTRACT)
           for i in MODULES[m] if _under(i, ("iskander",)) and not _under(i, CONTRACT_MAY_IMPORT)]
    assert bad == []


def test_backends_import_nothing_above_them():
    bad = [f"{m} imports {i}" for m in MODULES if _under(m, ("iskander.backends",))
           for i in MODULES[m] if _under(i, ("iskander",)) and not _under(i, BACKENDS_MAY_IMPORT)]
    assert bad == []


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
