"""The import layering of docs/architecture.md, checked on the source (no imports executed).

Layers, bottom to top: shared (errors, text, auth) -> arrow -> config -> backends -> contract ->
models (core.model, core.registry, core.batcher, observability.stats) -> observability -> core
(dataplane, control) -> frontends -> server. A module imports iskander modules of its own layer or
below only; a model runtime is imported only by its backend module; nothing above the backends
names an implementation; the frontends reach models only through the dataplane and control plane.
The client and batch scoring stand apart: they talk to a server over Flight and import none of it.
Every import statement counts, including those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "iskander"

# (layer, module prefixes), bottom to top
LAYERS = (
    ("shared", ("iskander.errors", "iskander.text", "iskander.auth")),
    ("arrow", ("iskander.arrow",)),
    ("config", ("iskander.config",)),
    ("backends", ("iskander.backends",)),
    ("contract", ("iskander.contract",)),
    ("models", ("iskander.core.model", "iskander.core.registry", "iskander.core.batcher", "iskander.observability.stats")),
    ("observability", ("iskander.observability",)),
    ("core", ("iskander.core",)),
    ("frontends", ("iskander.frontends", "iskander._proto")),
    ("server", ("iskander.server", "iskander.cli", "iskander.launch", "iskander")),
)
# Standing apart: what each may import from iskander (they never load models or serve).
APART = {
    "iskander.client": ("iskander.client",),
    "iskander.scoring": ("iskander.scoring", "iskander.client"),
    "iskander.demo": ("iskander.demo",),
    "iskander.integrations": ("iskander.integrations", "iskander.client", "iskander.embedded"),
    "iskander.__main__": ("iskander.cli", "iskander.scoring"),  # `python -m iskander [score]` dispatch
}
PROTOCOLS = ("grpc", "grpc_health", "pyarrow.flight", "iskander.frontends", "iskander._proto")
RUNTIMES = ("onnxruntime", "onnx")
# The frontends translate and map errors: models reach them through the dataplane and control plane.
FRONTENDS_NEVER = ("iskander.backends", "iskander.contract", "iskander.core.registry", "iskander.core.batcher")
# Config is read by every layer, so it sits below them all.
CONFIG_MAY_IMPORT = ("iskander.config", "iskander.errors", "iskander.text")


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


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest matching prefix; None for modules standing apart."""
    if any(_under(module, (p,)) for p in APART):
        return None
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _under(module, (prefix,)) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def _in_layers(max_layer: int) -> set[str]:
    return {m for m in MODULES if (layer := layer_of(m)) is not None and layer <= max_layer}


def test_every_module_has_a_place():
    assert [m for m in MODULES if layer_of(m) is None and not _under(m, tuple(APART))] == []
    assert "iskander.core.dataplane" in MODULES and "iskander.core.control" in MODULES


def test_each_layer_imports_only_its_own_layer_or_below():
    bad = []
    for module, imports in sorted(MODULES.items()):
        mine = layer_of(module)
        if mine is None:
            continue
        for name in sorted(imports):
            if not _under(name, ("iskander",)) or name == "iskander":
                continue
            theirs = layer_of(name)
            if theirs is None or theirs > mine:
                bad.append(f"{module} ({LAYERS[mine][0]}) imports {name} "
                           f"({LAYERS[theirs][0] if theirs is not None else 'client/scoring/demo'})")
    assert bad == []


def test_client_and_scoring_import_no_server_code():
    bad = [f"{m} imports {i}" for prefix, allowed in APART.items() for m in MODULES if _under(m, (prefix,))
           for i in MODULES[m] if _under(i, ("iskander",)) and i != "iskander" and not _under(i, allowed)]
    assert bad == []


def test_only_the_onnx_backend_imports_onnx_runtime():
    # iskander.demo builds ONNX files with the onnx package; it is a tool, not the server.
    allowed = {m for m in MODULES if m.startswith("iskander.backends.onnx") or _under(m, ("iskander.demo",))}
    assert _violations(set(MODULES) - allowed, RUNTIMES) == []


def test_only_the_sklearn_model_imports_joblib_or_sklearn():
    # joblib.load unpickles: it belongs in the worker-side model, never in the server process
    allowed = {"iskander.backends.sklearn_model"}
    assert _violations(set(MODULES) - allowed, ("joblib", "sklearn", "pandas")) == []


def test_layers_below_the_frontends_import_no_protocol():
    core = LAYERS.index(next(layer for layer in LAYERS if layer[0] == "core"))
    assert _violations(_in_layers(core), PROTOCOLS) == []


def test_above_the_backends_only_the_interface_is_visible():
    implementations = tuple(m for m in MODULES if _under(m, ("iskander.backends",))
                            and m not in ("iskander.backends", "iskander.backends.base"))
    outside = {m for m in MODULES if not _under(m, ("iskander.backends",))}
    assert _violations(outside, implementations) == []


def test_frontends_reach_models_only_through_the_dataplane_and_control_plane():
    frontends = {m for m in MODULES if _under(m, ("iskander.frontends",))}
    assert _violations(frontends, FRONTENDS_NEVER) == []


def test_config_imports_only_errors_and_text():
    bad = [f"{m} imports {i}" for m in MODULES if _under(m, ("iskander.config",))
           for i in MODULES[m] if _under(i, ("iskander",)) and not _under(i, CONFIG_MAY_IMPORT)]
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
    ("from . import model", "iskander.core", "iskander.core.model"),
    ("def f():\n    from onnx import helper", "iskander.core.dataplane", "onnx.helper"),
    ("from ..frontends import flight", "iskander.core.registry", "iskander.frontends.flight"),
    ("from ..frontends.oip import x", "iskander.backends.onnx", "iskander.frontends.oip"),
    ("from .onnx import OnnxBackend", "iskander.backends", "iskander.backends.onnx"),
    ("from pyarrow import flight", "iskander.core.dataplane", "pyarrow.flight"),
])
def test_the_checker_sees_imports(source, module, expected):
    """The rules above are only as good as this resolution of relative and nested imports."""
    assert expected in imports_of(source, module, is_package=module in ("iskander.backends", "iskander.core"))
