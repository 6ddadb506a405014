"""``python -m iskander score``: score a Parquet / Arrow IPC / CSV dataset through a running server.

Imports only click, pyarrow and the client so that it starts fast (no onnxruntime, no grpc stubs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from iskander.client import IskanderClient, IskanderClientError
from iskander.scoring.options import ScoreError, ScoreOptions
from iskander.scoring.plan import FORMATS, OUTPUT_FORMATS
from iskander.scoring.progress import ProgressBar
from iskander.scoring.score import score


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"expected OLD=NEW, got '{value}'", param_hint="--rename")
        out[old] = new
    return out


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--server", required=True, help="Flight address HOST:PORT (or grpc://, grpc+tls:// URI).")
@click.option("--model", required=True, help="Model name.")
@click.option("--version", "model_version", default=None, help="Model version. [default: newest ready]")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path, exists=True),
              help="A file, or a folder of files (hive partitions key=value/ are recognised).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Output file (file input) or folder (folder input, same layout).")
@click.option("--format", "input_format", type=click.Choice(list(FORMATS)), default=None,
              help="Input format. [default: from the file extensions]")
@click.option("--output-format", type=click.Choice(list(OUTPUT_FORMATS)), default=None,
              help="Output format. [default: from the output file's extension, else parquet]")
@click.option("--columns", default=None, metavar="A,B,...",
              help="Input columns to keep in the output. [default: all but partition columns]")
@click.option("--rename", multiple=True, metavar="OLD=NEW",
              help="Rename an input column as it is read, e.g. to the name the model expects. Repeatable.")
@click.option("--outputs", default=None, metavar="A,B,...", help="Model outputs to add. [default: all]")
@click.option("--prefix", default="", help="Prefix for the added output columns, e.g. 'pred_'.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Rows per batch sent to the server.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="DoExchange streams used at once.")
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
@click.option("--token", envvar="ISKANDER_TOKEN", default=None,
              help="Bearer token (or set ISKANDER_TOKEN).")
@click.option("--tls-root-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM CA certificate: connect with TLS and trust this CA.")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM client certificate for mutual TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr. [default: when stderr is a terminal]")
def main(server: str, model: str, model_version: str | None, input_path: Path, output_path: Path,
         input_format: str | None, output_format: str | None, columns: str | None, rename: tuple[str, ...],
         outputs: str | None, prefix: str, batch_rows: int, concurrency: int, overwrite: bool, token: str | None,
         tls_root_cert: Path | None, tls_cert: Path | None, tls_key: Path | None, progress: bool | None) -> None:
    """Score a dataset: write the input rows plus the model's predictions."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    options = ScoreOptions(
        model=model, version=model_version, input=input_path, output=output_path, input_format=input_format,
        output_format=output_format, columns=_names(columns), rename=_pairs(rename), outputs=_names(outputs),
        prefix=prefix, batch_rows=batch_rows, concurrency=concurrency, overwrite=overwrite,
    )
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with IskanderClient(server, token=token, tls_root_certs=tls_root_cert, cert_chain=tls_cert,
                            private_key=tls_key) as client:
            result = score(options, client, ProgressBar() if show else None)
    except (ScoreError, IskanderClientError) as exc:
        click.echo(f"error: {exc}\nno output written; {output_path} is as it was", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"interrupted; no output written; {output_path} is as it was", err=True)
        sys.exit(130)
    click.echo(f"scored {result.rows:,} rows ({result.files} file{'s' * (result.files != 1)}, {result.batches} "
               f"batches) with {result.model} v{result.version} in {result.seconds:.2f} s "
               f"({result.rows_per_second:,.0f} rows/s) -> {result.output}")
