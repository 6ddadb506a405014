"""ONNX models the tests build (onnx.helper and scikit-learn + skl2onnx), plus in-process references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from iskander.demo.build import IR_VERSION, OPSET, build_demo, save_model


def _save(graph, path: Path) -> Path:
    return save_model(graph, path, producer="iskander-tests")


def build_dtypes(path: Path) -> Path:
    """No manifest: inputs of several types; outputs echo them transformed (derived contract)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["x64", "x64"], ["x64_sq"]),          # float64 [N]
        helper.make_node("Add", ["i32", "i32"], ["i32_twice"]),       # int32 [N]
        helper.make_node("ReduceSum", ["i64x3", "axes"], ["i64_sum"], keepdims=0),  # int64 [N,3] -> [N]
        helper.make_node("Neg", ["f32x2x3"], ["f32_neg"]),            # float32 [N,2,3]
        helper.make_node("Not", ["flag"], ["flag_not"]),              # bool [N]
    ]
    graph = helper.make_graph(
        nodes,
        "dtypes",
        inputs=[
            helper.make_tensor_value_info("x64", TensorProto.DOUBLE, ["N"]),
            helper.make_tensor_value_info("i32", TensorProto.INT32, ["N"]),
            helper.make_tensor_value_info("i64x3", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("f32x2x3", TensorProto.FLOAT, ["N", 2, 3]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("x64_sq", TensorProto.DOUBLE, ["N"]),
            helper.make_tensor_value_info("i32_twice", TensorProto.INT32, ["N"]),
            helper.make_tensor_value_info("i64_sum", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("f32_neg", TensorProto.FLOAT, ["N", 2, 3]),
            helper.make_tensor_value_info("flag_not", TensorProto.BOOL, ["N"]),
        ],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    return _save(graph, path)


ALLTYPES = {  # input name -> (onnx.TensorProto type name, numpy dtype)
    "i8": ("INT8", "int8"),
    "i16": ("INT16", "int16"),
    "u8": ("UINT8", "uint8"),
    "u16": ("UINT16", "uint16"),
    "u32": ("UINT32", "uint32"),
    "u64": ("UINT64", "uint64"),
    "f16": ("FLOAT16", "float16"),
}


def build_alltypes(path: Path, halfs: bool = True) -> Path:
    """Identity for every integer width and FP16 ([N, 2] each), and bfloat16 [N] cast to float32.
    With ``halfs=False``, integers only (every input can then travel in typed contents)."""
    from onnx import TensorProto, helper

    names = [n for n, (_, dtype) in ALLTYPES.items() if halfs or dtype != "float16"]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in names]
    inputs = [helper.make_tensor_value_info(n, getattr(TensorProto, ALLTYPES[n][0]), ["N", 2]) for n in names]
    outputs = [helper.make_tensor_value_info(f"{n}_out", getattr(TensorProto, ALLTYPES[n][0]), ["N", 2]) for n in names]
    if halfs:
        nodes.append(helper.make_node("Cast", ["bf16"], ["bf16_as_f32"], to=TensorProto.FLOAT))
        inputs.append(helper.make_tensor_value_info("bf16", TensorProto.BFLOAT16, ["N"]))
        outputs.append(helper.make_tensor_value_info("bf16_as_f32", TensorProto.FLOAT, ["N"]))
    return _save(helper.make_graph(nodes, "alltypes", inputs, outputs), path)


def alltypes_feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (_, dtype) in ALLTYPES.items():
        if dtype == "float16":
            feeds[name] = rng.standard_normal((n, 2)).astype(np.float16)
        else:
            info = np.iinfo(dtype)
            feeds[name] = rng.integers(info.min, info.max, (n, 2), dtype=dtype, endpoint=True)
    return feeds


def build_sklearn(path: Path, n_features: int = 4, seed: int = 3) -> Path:
    """A scikit-learn logistic regression exported with skl2onnx (probabilities as a tensor)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, n_features)).astype(np.float32)
    y = (x @ np.arange(1, n_features + 1) > 0).astype(np.int64)
    clf = LogisticRegression().fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset={"": OPSET, "ai.onnx.ml": 3})
    onx.ir_version = IR_VERSION
    path.write_bytes(onx.SerializeToString())
    return path


SKLEARN_MANIFEST = """\
[[passthrough]]
name = "entity_id"
type = "utf8"

[[inputs]]
name = "features"
type = "fixed_size_list<float32>[4]"
tensor = "X"

[[outputs]]
name = "label"
type = "int64"

[[outputs]]
name = "probabilities"
type = "fixed_size_list<float32>[2]"
"""


def build_strings(path: Path) -> Path:
    """word: string [N] -> upper: string [N] (StringNormalizer), to exercise string tensors."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("StringNormalizer", ["word"], ["upper"], case_change_action="UPPER", locale="C")],
        "strings",
        [helper.make_tensor_value_info("word", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("upper", TensorProto.STRING, ["N"])],
    )
    return _save(graph, path)


def build_all(root: Path) -> Path:
    """Every test model under root, with manifests; returns root."""
    build_demo(root)
    build_dtypes(root / "dtypes.onnx")
    build_sklearn(root / "sklearn.onnx")
    build_alltypes(root / "alltypes.onnx")
    build_alltypes(root / "ints.onnx", halfs=False)
    build_strings(root / "strings.onnx")
    (root / "sklearn.manifest.toml").write_text(SKLEARN_MANIFEST)
    (root / "broken.onnx").write_bytes(b"this is not an onnx model")
    return root


def server_session(path: Path) -> ort.InferenceSession:
    """onnxruntime in process with the server's default session settings (one intra/inter thread,
    full graph optimisation, sequential): same file, same settings, the same bits."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def reference(path: Path, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """onnxruntime in process on the same file: what the server must return. bfloat16 inputs are
    given as uint16 bit patterns (numpy has no bfloat16) and passed as OrtValues."""
    session = server_session(path)
    bf16 = {i.name for i in session.get_inputs() if i.type == "tensor(bfloat16)"}
    feeds = {
        k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v, 16) if k in bf16 else v for k, v in feeds.items()
    }
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
