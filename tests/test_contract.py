"""The schema contract and the copy boundaries, in process on real ONNX models (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data import fsl, tabular_batch, two_tower_batch
from iskander.arrow.tensor import compile_writer, from_ndarray, to_ndarray
from iskander.errors import InvalidInput
from iskander.frontends.oip_codec import TensorDecoder, encode_column
from iskander.core.registry import ModelState, load_model
from iskander.config.settings import ModelSettings
from models import reference


def addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def value_buffer_address(arr: pa.Array) -> int:
    """Address of the first value of a (possibly sliced, possibly nested) fixed-width column."""
    while pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.buffers()[1].address + arr.offset * arr.type.bit_width // 8


def load(path: Path, manifest: str | None = None, tmp: Path | None = None):
    settings = ModelSettings(name=path.stem, path=path)
    if manifest is not None:
        assert tmp is not None
        mpath = tmp / f"{path.stem}.manifest.toml"
        mpath.write_text(manifest)
        settings = ModelSettings(name=path.stem, path=path, manifest=mpath)
    return load_model(settings)


# --- zero copy ------------------------------------------------------------------------------------


def test_non_null_columns_reach_onnxruntime_as_views(models_dir):
    entry = load(models_dir / "tabular.onnx")
    assert entry.state is ModelState.READY
    batch, _ = tabular_batch(100)
    prepared = entry.contract.prepare(batch)
    assert addr(prepared.feeds["numeric"]) == value_buffer_address(batch.column("features"))
    assert addr(prepared.feeds["category"]) == value_buffer_address(batch.column("category"))
    assert not prepared.feeds["numeric"].flags.owndata


def test_sliced_columns_stay_zero_copy(models_dir):
    entry = load(models_dir / "two_tower.onnx")
    batch, _ = two_tower_batch(50)
    part = batch.slice(10, 20)
    prepared = entry.contract.prepare(part)
    assert prepared.feeds["user_features"].shape == (20, 16)
    assert addr(prepared.feeds["user_features"]) == value_buffer_address(part.column("user_features"))


def test_output_arrays_wrap_the_result_buffer():
    result = np.arange(24, dtype=np.float32).reshape(6, 4)
    arr = from_ndarray(result, pa.list_(pa.float32(), 4))
    assert value_buffer_address(arr) == addr(result)
    scalar = np.arange(6, dtype=np.int64)
    assert value_buffer_address(from_ndarray(scalar, pa.int64())) == addr(scalar)
    # the writers compiled per output column at load wrap the buffer the same way
    assert value_buffer_address(compile_writer(pa.list_(pa.float32(), 4))(result)) == addr(result)
    assert value_buffer_address(compile_writer(pa.int64())(scalar)) == addr(scalar)


def test_oip_raw_bytes_become_arrow_without_copy():
    data = np.arange(12, dtype=np.float32).tobytes()
    decoder = TensorDecoder("m", "x", pa.list_(pa.float32(), 4))
    arr = decoder.from_raw(data, 3)
    assert value_buffer_address(arr) == addr(np.frombuffer(data, dtype=np.uint8))
    tensor = to_ndarray(arr)
    assert addr(tensor) == addr(np.frombuffer(data, dtype=np.uint8))
    np.testing.assert_array_equal(tensor, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_encode_column_round_trips_through_decoder():
    for arrow_type, values in (
        (pa.float16(), np.arange(5, dtype=np.float16)),
        (pa.uint16(), np.arange(5, dtype=np.uint16)),
        (pa.int8(), np.arange(-2, 3, dtype=np.int8)),
        (pa.bool_(), np.array([True, False, True, True, False])),
    ):
        arr = pa.array(values, type=arrow_type)
        datatype, shape, raw = encode_column(arr)
        assert shape == [5, 1]
        back = TensorDecoder("m", "x", arrow_type).from_raw(raw, shape[0])
        assert back.equals(arr), datatype
    strings = pa.array(["a", "", "ünïcode"])
    datatype, shape, raw = encode_column(strings)
    assert datatype == "BYTES" and raw[:4] == (1).to_bytes(4, "little")
    assert TensorDecoder("m", "s", pa.utf8()).from_raw(raw, 3).equals(strings)


# --- request validation ---------------------------------------------------------------------------


def test_prepare_and_assemble_match_onnxruntime(models_dir):
    entry = load(models_dir / "two_tower.onnx")
    batch, feeds = two_tower_batch(10)
    contract = entry.contract
    prepared = contract.prepare(batch)
    selected = contract.select_outputs(["score"])
    tensors = contract.run_tensors(selected)
    out = contract.assemble(prepared, selected, dict(zip(tensors, entry.backend.run(tensors, prepared.feeds, "two_tower"))))
    assert out.schema.names == ["user_id", "item_id", "score"]
    ref = reference(models_dir / "two_tower.onnx", feeds, ["score"])["score"]
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref)


def test_list_child_field_name_is_ignored(models_dir):
    entry = load(models_dir / "tabular.onnx")
    batch, _ = tabular_batch(3)
    values = batch.column("features").flatten()
    renamed = pa.FixedSizeListArray.from_arrays(values, type=pa.list_(pa.field("element", pa.float32()), 4))
    prepared = entry.contract.prepare(batch.set_column(1, "features", renamed))
    assert prepared.feeds["numeric"].shape == (3, 4)


def test_null_error_names_column_and_first_null_row(models_dir):
    entry = load(models_dir / "tabular.onnx")
    batch, _ = tabular_batch(6)
    bad = batch.set_column(2, "category", pa.array([1, 2, 3, 4, None, None], pa.int64()))
    with pytest.raises(InvalidInput) as info:
        entry.contract.prepare(bad)
    assert info.value.details == {"model": "tabular", "column": "category", "row": 4}


# --- load-time checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("manifest,expected", [
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float64>[4]"\ntensor = "numeric"\n'
     '[[inputs]]\nname = "category"\ntype = "int64"\n[[outputs]]\nname = "s"\ntype = "float32"\ntensor = "probability"\n',
     "manifest input 'features' is fixed_size_list<float64>[4] but ONNX input 'numeric' is tensor(float)"),
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float32>[5]"\ntensor = "numeric"\n'
     '[[inputs]]\nname = "category"\ntype = "int64"\n[[outputs]]\nname = "s"\ntype = "float32"\ntensor = "probability"\n',
     "manifest input 'features' has per-row shape [5] but ONNX input 'numeric' has shape [-1,4]"),
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float32>[4]"\ntensor = "numeric"\n'
     '[[outputs]]\nname = "s"\ntype = "float32"\ntensor = "probability"\n',
     "ONNX input 'category' is not fed by any manifest input column"),
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float32>[4]"\ntensor = "nums"\n'
     '[[inputs]]\nname = "category"\ntype = "int64"\n[[outputs]]\nname = "s"\ntype = "float32"\ntensor = "probability"\n',
     "manifest input 'features' maps to tensor 'nums', but the model has no such input; ONNX inputs: numeric, category"),
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float32>[4]"\ntensor = "numeric"\n'
     '[[inputs]]\nname = "category"\ntype = "int64"\n[[outputs]]\nname = "s"\ntype = "fixed_size_list<float32>[3]"\n'
     'tensor = "probability"\n',
     "manifest output 's' has per-row shape [3] but ONNX output 'probability' has shape [-1,1]"),
    ('[[inputs]]\nname = "features"\ntype = "fixed_size_list<float32>[4]"\ntensor = "numeric"\n'
     '[[inputs]]\nname = "category"\ntype = "int64"\n',
     "at least one [[outputs]] column is required"),
])
def test_manifest_is_checked_against_the_model_at_load(models_dir, tmp_path, manifest, expected):
    entry = load(models_dir / "tabular.onnx", manifest, tmp_path)
    assert entry.state is ModelState.UNAVAILABLE
    assert expected in entry.reason


def test_derived_contract_without_manifest(models_dir):
    entry = load(models_dir / "dtypes.onnx")
    schema = entry.contract.input_schema
    assert schema.field("x64").type == pa.float64()
    assert schema.field("i64x3").type == pa.list_(pa.int64(), 3)
    assert schema.field("f32x2x3").type == pa.list_(pa.list_(pa.float32(), 3), 2)
    assert schema.field("flag").type == pa.bool_()
    assert entry.contract.from_manifest is False


def test_unsupported_input_type_is_a_clear_load_error(tmp_path):
    from onnx import TensorProto, helper

    from models import _save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
    )
    path = _save(graph, tmp_path / "dyn.onnx")
    entry = load(path)
    assert entry.state is ModelState.UNAVAILABLE
    assert "ONNX input 'x' has shape [-1,-1] with a dynamic non-batch dimension" in entry.reason
    ok = load(path, '[[inputs]]\nname = "x"\ntype = "fixed_size_list<float32>[3]"\n'
                    '[[outputs]]\nname = "y"\ntype = "fixed_size_list<float32>[3]"\n', tmp_path)
    assert ok.state is ModelState.READY
    x = fsl(np.ones((2, 3), np.float32))
    prepared = ok.contract.prepare(pa.record_batch({"x": x}))
    selected = ok.contract.select_outputs(None)
    out = ok.contract.assemble(prepared, selected, {"y": ok.backend.run(["y"], prepared.feeds, "dyn")[0]})
    assert out.column("y").equals(x)


def _identity_model(tmp_path: Path, in_shape: list, out_shape: list) -> Path:
    from onnx import TensorProto, helper

    from models import _save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    return _save(graph, tmp_path / "identity.onnx")


def test_fixed_batch_dimension_is_checked_before_running(tmp_path):
    entry = load(_identity_model(tmp_path, [1, 3], [1, 3]))
    assert entry.state is ModelState.READY
    batch = pa.record_batch({"x": fsl(np.ones((2, 3), np.float32))})
    with pytest.raises(InvalidInput) as info:
        entry.contract.prepare(batch)
    assert info.value.message == (
        "model 'identity' takes exactly 1 rows per batch (column 'x' feeds an ONNX input with a fixed batch "
        "dimension), got 2"
    )
    assert entry.contract.prepare(batch.slice(0, 1)).rows == 1


def test_list_output_and_descriptions(tmp_path):
    from iskander.frontends.oip_codec import encode_column, oip_shape

    path = _identity_model(tmp_path, ["N", 3], ["N", "K"])
    entry = load(path, '[[inputs]]\nname = "x"\ntype = "fixed_size_list<float32>[3]"\ndescription = "three floats"\n'
                       '[[outputs]]\nname = "y"\ntype = "list<float32>"\n', tmp_path)
    assert entry.state is ModelState.READY, entry.reason
    contract = entry.contract
    assert contract.input_schema.field("x").metadata == {b"description": b"three floats"}
    assert contract.output_schema.field("y").type == pa.list_(pa.float32())
    assert oip_shape(contract.output_schema.field("y").type) == [-1, -1]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    prepared = contract.prepare(pa.record_batch({"x": fsl(x)}))
    out = contract.assemble(prepared, contract.outputs, {"y": entry.backend.run(["y"], prepared.feeds, "identity")[0]})
    assert out.column("y").to_pylist() == x.tolist()
    datatype, shape, raw = encode_column(out.column("y"))
    assert (datatype, shape) == ("FP32", [2, 3]) and raw == x.tobytes()


def test_variable_list_input_is_refused_at_load(tmp_path):
    path = _identity_model(tmp_path, ["N", 3], ["N", 3])
    entry = load(path, '[[inputs]]\nname = "x"\ntype = "list<float32>"\n'
                       '[[outputs]]\nname = "y"\ntype = "fixed_size_list<float32>[3]"\n', tmp_path)
    assert entry.state is ModelState.UNAVAILABLE
    assert "manifest input 'x' is list<float32>: variable-size lists are for outputs" in entry.reason


@pytest.mark.parametrize("items", [
    [b"x"] * 5,                      # equal lengths: vectorised path
    [b"abc", b"def", b"ghi"],
    [b"", b"", b""],                 # all empty
    [b"a", b"", b"longer one", b"\xc3\xbc"],  # variable lengths
    [],
    [f"id-{i}".encode() * (i % 4) for i in range(100)],  # above the small-batch path, variable
    [b"same"] * 100,  # above the small-batch path, equal lengths
])
def test_raw_bytes_decode_and_encode(items):
    """Round trip of raw BYTES through the decoder and encoder, on every code path."""
    raw = b"".join(len(x).to_bytes(4, "little") + x for x in items)
    arr = TensorDecoder("m", "s", pa.binary()).from_raw(raw, len(items))
    assert arr.to_pylist() == items
    assert encode_column(arr)[2] == raw
    text = TensorDecoder("m", "s", pa.utf8()).from_raw(raw, len(items))
    assert text.to_pylist() == [x.decode() for x in items]


# --- workload features: structs, concatenation, tensors, nulls, casts, output transforms -------------


def _graph_model(tmp_path: Path, name: str, nodes, inputs, outputs, initializers=()) -> Path:
    from onnx import helper

    from models import _save

    return _save(helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers)), tmp_path / f"{name}.onnx")


@pytest.fixture
def scorer(tmp_path):
    """x [N, 3] float -> score [N] = sum(x * w); probs [N, 2] = softmax([0, score])."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["s2"]),
        helper.make_node("Squeeze", ["s2", "one"], ["score"]),
        helper.make_node("Concat", ["zero_col", "s2"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    return _graph_model(
        tmp_path, "scorer", nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("zero_col", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array([[1.0], [2.0], [3.0]], np.float32), "w"),
         numpy_helper.from_array(np.array([1], np.int64), "one")],
    )


def run(entry, batch, outputs=None):
    contract = entry.contract
    prepared = contract.prepare(batch)
    selected = contract.select_outputs(outputs)
    tensors = contract.run_tensors(selected)
    return contract.assemble(prepared, selected, dict(zip(tensors, entry.backend.run(tensors, prepared.feeds, "m"))))


STRUCT_MANIFEST = """\
[[passthrough]]
name = "user_id"
type = "utf8"

[[inputs]]
name = "features"
type = "struct<a: float32, b: fixed_size_list<float32>[2]>"
tensor = "x"

[[inputs]]
name = "zero"
type = "float32"
tensor = "zero_col"
nulls = "fill"
fill = 0.0

[[outputs]]
name = "score"
type = "float32"

[[outputs]]
name = "label"
type = "utf8"
tensor = "probs"
transform = "label"
labels = ["low", "high"]

[[outputs]]
name = "p_high"
type = "float32"
tensor = "probs"
transform = "select"
index = 1

[[outputs]]
name = "rank"
type = "int32"
transform = "rank"
of = "score"
group_by = "user_id"
"""


def test_struct_concat_fill_and_output_transforms(scorer, tmp_path, models_dir):
    entry = load(scorer, STRUCT_MANIFEST, tmp_path)
    assert entry.state is ModelState.READY, entry.reason
    a = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    b = np.array([[1, 0], [0, 1], [1, 1], [-1, -1]], np.float32)
    features = pa.StructArray.from_arrays([pa.array(a), fsl(b)], fields=list(entry.contract.input_schema.field("features").type))
    batch = pa.record_batch({
        "user_id": pa.array(["u1", "u1", "u2", "u1"]),
        "features": features,
        "zero": pa.array([0.0, None, 0.0, None], pa.float32()),
    })
    out = run(entry, batch)
    x = np.column_stack([a, b])
    ref = reference(scorer, {"x": x, "zero_col": np.zeros((4, 1), np.float32)})
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref["score"])
    assert out.column("label").to_pylist() == [["low", "high"][i] for i in ref["probs"].argmax(axis=1)]
    np.testing.assert_array_equal(out.column("p_high").to_numpy(), ref["probs"][:, 1])
    # scores 2.5, 2.0, 5.0, -3.0: within u1 the order is row0 (2.5), row1 (2.0), row3 (-3.0)
    assert out.column("rank").to_pylist() == [1, 2, 1, 3]
    assert out.schema.field("rank").type == pa.int32()
    assert entry.contract.input_schema.field("zero").metadata == {b"iskander.fill": b"0.0"}


def test_struct_with_null_rows_is_rejected_naming_the_field(scorer, tmp_path):
    entry = load(scorer, STRUCT_MANIFEST, tmp_path)
    t = entry.contract.input_schema.field("features").type
    features = pa.StructArray.from_arrays(
        [pa.array([1.0, 2.0], pa.float32()), fsl(np.ones((2, 2), np.float32))], fields=list(t),
        mask=pa.array([False, True]),
    )
    batch = pa.record_batch({"user_id": pa.array(["a", "b"]), "features": features,
                             "zero": pa.array([0.0, 0.0], pa.float32())})
    with pytest.raises(InvalidInput) as info:
        run(entry, batch)
    assert info.value.details["column"] == "features.a" and info.value.details["row"] == 1


def test_rank_needs_group_by_request_column(scorer, tmp_path):
    bad = STRUCT_MANIFEST.replace('group_by = "user_id"', 'group_by = "nope"')
    entry = load(scorer, bad, tmp_path)
    assert "manifest output 'rank' groups by 'nope', which is not a request column" in entry.reason


def test_columns_concatenated_and_declared_casts(scorer, tmp_path):
    manifest = """\
[[inputs]]
name = "f1"
type = "float32"
tensor = "x"
cast_from = ["float64", "int32"]

[[inputs]]
name = "f2"
type = "float32"
tensor = "x"

[[inputs]]
name = "f3"
type = "float32"
tensor = "x"

[[inputs]]
name = "zero"
type = "float32"
tensor = "zero_col"

[[outputs]]
name = "score"
type = "float32"
"""
    entry = load(scorer, manifest, tmp_path)
    assert entry.state is ModelState.READY, entry.reason
    f1 = np.array([1.5, 2.0], np.float64)
    rest = {"f2": pa.array([1.0, 1.0], pa.float32()), "f3": pa.array([0.0, 1.0], pa.float32()),
            "zero": pa.array([0.0, 0.0], pa.float32())}
    out = run(entry, pa.record_batch({"f1": pa.array(f1), **rest}))
    np.testing.assert_array_equal(out.column("score").to_numpy(), np.array([3.5, 7.0], np.float32))
    out_int = run(entry, pa.record_batch({"f1": pa.array([1, 2], pa.int32()), **rest}))
    np.testing.assert_array_equal(out_int.column("score").to_numpy(), np.array([3.0, 7.0], np.float32))
    with pytest.raises(InvalidInput) as info:
        run(entry, pa.record_batch({"f1": pa.array([1, 2], pa.int64()), **rest}))
    assert info.value.message == (
        "column 'f1' of model 'scorer' has type int64, model expects float32 or float64 or int32"
    )
    bad_width = manifest.replace('[[inputs]]\nname = "f3"\ntype = "float32"\ntensor = "x"\n\n', "")
    entry2 = load(scorer, bad_width, tmp_path)
    assert "columns 'f1', 'f2' give 2 values per row but ONNX input 'x' has shape [-1,3]" in entry2.reason


def test_fixed_shape_tensor_in_and_out(tmp_path):
    from onnx import TensorProto, helper

    path = _graph_model(
        tmp_path, "windows", [helper.make_node("Neg", ["w"], ["neg"]),
                              helper.make_node("ReduceMean", ["w"], ["mean"], axes=[1, 2], keepdims=0)],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 4, 3])],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4, 3]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N"])],
    )
    manifest = ('[[inputs]]\nname = "w"\ntype = "fixed_shape_tensor<float32>[4, 3]"\n'
                '[[outputs]]\nname = "neg"\ntype = "fixed_shape_tensor<float32>[4, 3]"\n'
                '[[outputs]]\nname = "mean"\ntype = "float32"\n')
    entry = load(path, manifest, tmp_path)
    assert entry.state is ModelState.READY, entry.reason
    w = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(w)
    prepared = entry.contract.prepare(pa.record_batch({"w": column}))
    assert addr(prepared.feeds["w"]) == addr(np.asarray(column.storage.values))  # zero copy
    out = run(entry, pa.record_batch({"w": column}))
    assert out.schema.field("neg").type == pa.fixed_shape_tensor(pa.float32(), [4, 3])
    np.testing.assert_array_equal(out.column("neg").to_numpy_ndarray(), -w)
    np.testing.assert_array_equal(out.column("mean").to_numpy(), w.reshape(2, -1).mean(axis=1))
    # the same tensors over OIP: [N, 4, 3] FP32
    from iskander.frontends.oip_codec import oip_shape

    assert oip_shape(out.schema.field("neg").type) == [-1, 4, 3]
    datatype, shape, raw = encode_column(out.column("neg"))
    assert (datatype, shape) == ("FP32", [2, 4, 3]) and raw == (-w).tobytes()
    decoded = TensorDecoder("m", "w", column.type).from_raw(w.tobytes(), 2)
    assert decoded.type == column.type and decoded.equals(column)


def test_fixed_shape_tensor_dim_names_are_accepted_permutations_named(tmp_path):
    from onnx import TensorProto, helper

    path = _graph_model(
        tmp_path, "win", [helper.make_node("Neg", ["w"], ["neg"])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 4, 3])],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4, 3])],
    )
    entry = load(path, '[[inputs]]\nname = "w"\ntype = "fixed_shape_tensor<float32>[4, 3]"\n'
                       '[[outputs]]\nname = "neg"\ntype = "fixed_size_list<fixed_size_list<float32>[3]>[4]"\n', tmp_path)
    w = np.ones((2, 12), np.float32)
    named = pa.fixed_shape_tensor(pa.float32(), [4, 3], dim_names=["t", "c"])
    column = pa.ExtensionArray.from_storage(named, fsl(w))
    assert entry.contract.prepare(pa.record_batch({"w": column})).feeds["w"].shape == (2, 4, 3)
    permuted = pa.fixed_shape_tensor(pa.float32(), [4, 3], permutation=[1, 0])
    with pytest.raises(InvalidInput) as info:
        entry.contract.prepare(pa.record_batch({"w": pa.ExtensionArray.from_storage(permuted, fsl(w))}))
    assert "permutation=[1, 0]" in info.value.message


def test_bytes_encode_sends_nulls_as_empty_elements():
    for n in (3, 100):
        values = [None if i % 3 == 0 else f"v{i}" for i in range(n)]
        _, _, raw = encode_column(pa.array(values))
        back = TensorDecoder("m", "s", pa.utf8()).from_raw(raw, n).to_pylist()
        assert back == [v or "" for v in values]


@pytest.mark.parametrize("manifest,expected", [
    ('[[inputs]]\nname = "word"\ntype = "binary"\n[[outputs]]\nname = "upper"\ntype = "utf8"\n',
     "manifest input 'word' is binary but ONNX input 'word' is tensor(string)"),
])
def test_binary_columns_cannot_feed_string_tensors(models_dir, tmp_path, manifest, expected):
    entry = load(models_dir / "strings.onnx", manifest, tmp_path)
    assert entry.state is ModelState.UNAVAILABLE and expected in entry.reason


def test_struct_fill_must_fit_every_field(scorer, tmp_path):
    bad = STRUCT_MANIFEST.replace(
        'type = "struct<a: float32, b: fixed_size_list<float32>[2]>"\ntensor = "x"',
        'type = "struct<a: float32, b: fixed_size_list<float32>[2]>"\ntensor = "x"\nnulls = "fill"\nfill = "n/a"')
    entry = load(scorer, bad, tmp_path)
    assert "manifest input 'features' fill value 'n/a' is not a float32" in entry.reason


def test_rank_group_key_must_be_one_value_per_row(scorer, tmp_path):
    bad = STRUCT_MANIFEST.replace('group_by = "user_id"', 'group_by = "features"')
    entry = load(scorer, bad, tmp_path)
    assert "groups by 'features', which is struct<" in entry.reason


def test_rank_type_too_small_for_the_batch(scorer, tmp_path):
    entry = load(scorer, STRUCT_MANIFEST.replace('name = "rank"\ntype = "int32"', 'name = "rank"\ntype = "int8"'),
                 tmp_path)
    n = 200
    t = entry.contract.input_schema.field("features").type
    features = pa.StructArray.from_arrays([pa.array(np.ones(n, np.float32)), fsl(np.ones((n, 2), np.float32))],
                                          fields=list(t))
    batch = pa.record_batch({"user_id": pa.array(["u"] * n), "features": features,
                             "zero": pa.array(np.zeros(n, np.float32))})
    with pytest.raises(InvalidInput) as info:
        run(entry, batch)
    assert "rank column 'rank' of model 'scorer' is int8 and cannot rank 200 rows" in info.value.message
