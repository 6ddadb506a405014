"""Fixtures: test models on disk and real server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import serving
from iskander.launch import ServerProcess
from models import build_all

@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_all(tmp_path_factory.mktemp("models"))


MAIN_CONFIG = """\
[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "tabular"
version = 2
path = "{root}/tabular.onnx"

[[models]]
name = "dtypes"
path = "{root}/dtypes.onnx"

[[models]]
name = "sklearn"
path = "{root}/sklearn.onnx"

[[models]]
name = "alltypes"
path = "{root}/alltypes.onnx"

[[models]]
name = "ints"
path = "{root}/ints.onnx"

[[models]]
name = "strings"
path = "{root}/strings.onnx"

[[models]]
name = "small_batch"
path = "{root}/tabular.onnx"
manifest = "{root}/tabular.manifest.toml"
max_batch_size = 8
instances = 2
"""


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with every good test model, shared by the protocol tests."""
    with serving(tmp_path_factory.mktemp("server"), MAIN_CONFIG.format(root=models_dir)) as running:
        yield running


FAULTY_CONFIG = """\
[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "broken"
path = "{root}/broken.onnx"
"""


@pytest.fixture(scope="session")
def faulty_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server where one model fails to load while another serves."""
    with serving(tmp_path_factory.mktemp("faulty"), FAULTY_CONFIG.format(root=models_dir)) as running:
        yield running


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Report how many hostile cases the property-based suite tried (issue 6 asks for the count)."""
    import sys

    module = next((m for name, m in sys.modules.items() if name.endswith("test_hostile_inputs")), None)
    tried = getattr(module, "TRIED", None)
    if tried:
        terminalreporter.write_line(f"hostile-input cases tried: {dict(tried)} (total {sum(tried.values())})")
