"""Small client-side helpers shared by the tests: serve a config, exchange batches over Flight."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from iskander.launch import ServerProcess, spawn_server


@contextmanager
def serving(folder: Path, config_text: str) -> Iterator[ServerProcess]:
    """Write ``config_text`` to folder/config.toml, run a server on free ports, always stop it."""
    config = folder / "config.toml"
    config.write_text(config_text)
    server = spawn_server(config, folder / "server.log")
    try:
        yield server
    finally:
        server.stop()


def exchange(
    target: str | flight.FlightClient, model: str, batches: Sequence[pa.RecordBatch], version: str | None = None
) -> list[pa.RecordBatch]:
    """Send batches on one DoExchange stream; one answer per batch, in order."""
    client = flight.connect(target) if isinstance(target, str) else target
    path = (model,) if version is None else (model, version)
    try:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(*path))
        with writer:
            writer.begin(batches[0].schema)
            answers = []
            for batch in batches:
                writer.write_batch(batch)
                answers.append(reader.read_chunk().data)
            writer.done_writing()
        return answers
    finally:
        if isinstance(target, str):
            client.close()
