"""Planning a scoring run: the input's files and format, which columns are read, sent, kept and
added, and where each output file goes. Every mistake in the options is found here, before any
batch is sent."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from iskander.client import ModelInfo
from iskander.scoring.options import ScoreError, ScoreOptions

# format name -> (pyarrow.dataset format, file extensions it is recognised by; the first is written)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "parquet": ("parquet", (".parquet", ".pq")),
    "ipc": ("ipc", (".arrow", ".ipc", ".feather")),
    "feather": ("ipc", (".feather", ".arrow", ".ipc")),
    "csv": ("csv", (".csv", ".csv.gz", ".csv.bz2", ".tsv")),
}
OUTPUT_FORMATS = ("parquet", "ipc", "feather", "csv")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".".join([""] + name.split(".")[-2:]) if name.endswith((".gz", ".bz2")) else path.suffix.lower()


def _detect_format(files: list[Path], given: str | None, where: Path) -> str:
    if given:
        if given not in FORMATS:
            raise ScoreError(f"unknown input format '{given}'; use one of {', '.join(FORMATS)}")
        return given
    for f in files:
        for name, (_, extensions) in FORMATS.items():
            if _suffix(f) in extensions:
                return name
    raise ScoreError(f"cannot tell the format of {where} from its file names; pass --format "
                     f"({', '.join(FORMATS)})")


def _list_files(root: Path) -> list[Path]:
    """Files under root, skipping hidden and underscore names (_SUCCESS, .crc, our own temporaries)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith((".", "_"))]
    return out


@attrs.frozen
class Plan:
    dataset: ds.Dataset
    fragments: list[ds.Fragment]
    names: list[str]  # each fragment's path as reported in messages (relative to the input folder)
    relative: list[Path]  # each fragment's output path relative to the output root
    sources: dict[str, str]  # read columns: name after --rename -> column in the input
    keep: list[str]  # names of the read columns that are written
    request: list[str]  # names of the read columns the model takes
    outputs: list[str]  # model output columns added
    output_names: list[str]  # their names in the output
    out_schema: pa.Schema
    output_format: str
    single_file: bool


def _open(options: ScoreOptions, info: ModelInfo) -> ds.FileSystemDataset:
    """The input as a dataset: one file, or the files of a folder (hive partitions recognised)."""
    src = options.input
    if not src.exists():
        raise ScoreError(f"input {src} does not exist")
    single = src.is_file()
    listed = [src] if single else _list_files(src)
    fmt = _detect_format(listed, options.input_format, src)
    ds_format, extensions = FORMATS[fmt]
    files = listed if single or options.input_format else [f for f in listed if _suffix(f) in extensions]
    if not files:
        raise ScoreError(f"no {fmt} files under {src}")
    if not single and options.output.resolve().is_relative_to(src.resolve()):
        raise ScoreError(f"the output {options.output} is inside the input {src}; choose another place")

    source_of = {new: old for old, new in options.rename.items()}
    file_format: ds.FileFormat | str = ds_format
    if ds_format == "csv":
        # CSV is text: parse the model's scalar columns as the types the model expects, instead of
        # letting Arrow guess (an int-looking id for a utf8 passthrough, float64 for float32)
        types = {source_of.get(f.name, f.name): f.type for f in info.input_schema if _is_scalar(f.type)}
        file_format = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))
    try:
        dataset = ds.dataset([str(f) for f in files], format=file_format,
                             partitioning=None if single else "hive", partition_base_dir=None if single else str(src))
    except (pa.ArrowException, OSError) as exc:
        raise ScoreError(f"cannot open {src} as {fmt}: {exc}", cause=exc) from None
    return dataset


def make_plan(options: ScoreOptions, info: ModelInfo) -> Plan:
    """Which columns are read, sent, kept and added, and where each output file goes."""
    src, single = options.input, options.input.is_file()
    dataset = _open(options, info)
    source_of = {new: old for old, new in options.rename.items()}
    names = dataset.schema.names
    for old in options.rename:
        if old not in names:
            raise ScoreError(f"--rename names column '{old}', which the input does not have (columns: {', '.join(names)})")
    renamed = [options.rename.get(n, n) for n in names]
    partition_cols = set() if single else {options.rename.get(n, n) for n in _partition_names(dataset)}

    request = info.input_schema.names
    missing = [c for c in request if c not in renamed]
    if missing:
        raise ScoreError(f"model '{info.name}' needs column(s) {', '.join(missing)}, which the input does not have "
                         f"(columns: {', '.join(renamed)}); map a column with --rename OLD=NEW")
    if options.columns is not None:
        unknown = [c for c in options.columns if c not in renamed]
        if unknown:
            raise ScoreError(f"--columns names {', '.join(unknown)}, not in the input (columns: {', '.join(renamed)})")
        keep = [c for c in renamed if c in options.columns]
    else:
        keep = [c for c in renamed if c not in partition_cols]  # partition values live in the folder names

    outputs = options.outputs if options.outputs is not None else info.outputs
    unknown = [o for o in outputs if o not in info.output_schema.names]
    if unknown:
        raise ScoreError(f"model '{info.name}' has no output {', '.join(unknown)} "
                         f"(outputs: {', '.join(info.outputs)})")
    output_names = [options.prefix + o for o in outputs]
    clash = [n for n in output_names if n in keep]
    if clash:
        raise ScoreError(f"output column(s) {', '.join(clash)} would replace input columns of the same name; "
                         "use --prefix, --rename or --columns")

    read = [n for n in renamed if n in keep or n in request]
    sources = {n: source_of.get(n, n) for n in read}
    by_name = {options.rename.get(f.name, f.name): f for f in dataset.schema}
    out_fields = [by_name[n].with_name(n) for n in keep]
    out_fields += [info.output_schema.field(o).with_name(n) for o, n in zip(outputs, output_names)]
    out_schema = pa.schema(out_fields)

    out_fmt = options.output_format or _format_of_output(options.output, single)
    if out_fmt not in OUTPUT_FORMATS:
        raise ScoreError(f"unknown output format '{out_fmt}'; use one of {', '.join(OUTPUT_FORMATS)}")
    if out_fmt == "csv":
        nested = [f.name for f in out_schema if not _is_scalar(f.type)]
        if nested:
            raise ScoreError(f"CSV cannot hold the nested column(s) {', '.join(nested)}; write parquet or ipc")

    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    names_in = [Path(f.path).name if single else Path(f.path).relative_to(src) for f in fragments]
    extension = FORMATS[out_fmt][1][0]
    relative = [Path(".") if single else _with_extension(Path(n), extension) for n in names_in]
    return Plan(dataset, fragments, [str(n) for n in names_in], relative, sources, keep, request, list(outputs),
                 output_names, out_schema, out_fmt, single)


def _is_scalar(t: pa.DataType) -> bool:
    return not pa.types.is_nested(t) and not isinstance(t, pa.ExtensionType)


def _partition_names(dataset: ds.FileSystemDataset) -> set[str]:
    # from the fragments: with no key=value folders, dataset.partitioning.schema is the whole
    # dataset schema (pyarrow 26), not an empty one
    return {key for f in dataset.get_fragments() for key in ds.get_partition_keys(f.partition_expression)}


def _format_of_output(path: Path, single: bool) -> str:
    if single:
        for name, (_, extensions) in FORMATS.items():
            if _suffix(path) in extensions and name in OUTPUT_FORMATS:
                return "ipc" if name == "feather" else name
    return "parquet"


def _with_extension(rel: Path, extension: str) -> Path:
    suffix = _suffix(rel)
    stem = rel.name[: -len(suffix)] if suffix else rel.name
    return rel.with_name(stem + extension)
