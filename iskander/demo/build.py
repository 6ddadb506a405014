"""Build the demo ONNX models with onnx.helper (needs the ``onnx`` package: ``pip install -e .[dev]``).

    python -m iskander.demo.build [OUT_DIR]

The built files are committed under iskander/demo/ so that serving them needs only onnxruntime.
Tests call the same builders to make fresh copies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OPSET = 17
IR_VERSION = 9  # readable by every onnxruntime >= 1.16


def save_model(graph, path: Path, producer: str = "iskander-demo") -> Path:
    """Wrap a graph in a model (opset OPSET, IR_VERSION), check it and save it."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_two_tower(path: Path, dim_in: int = 16, dim_emb: int = 32, seed: int = 7) -> Path:
    """score = <tanh(user @ Wu), tanh(item @ Wi)>; also returns the user embedding."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    wu = (rng.standard_normal((dim_in, dim_emb)) / np.sqrt(dim_in)).astype(np.float32)
    wi = (rng.standard_normal((dim_in, dim_emb)) / np.sqrt(dim_in)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["user_features", "Wu"], ["u_lin"]),
        helper.make_node("Tanh", ["u_lin"], ["user_embedding"]),
        helper.make_node("MatMul", ["item_features", "Wi"], ["i_lin"]),
        helper.make_node("Tanh", ["i_lin"], ["item_embedding"]),
        helper.make_node("Mul", ["user_embedding", "item_embedding"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axes"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_tower",
        inputs=[
            helper.make_tensor_value_info("user_features", TensorProto.FLOAT, ["N", dim_in]),
            helper.make_tensor_value_info("item_features", TensorProto.FLOAT, ["N", dim_in]),
        ],
        outputs=[
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["N", dim_emb]),
        ],
        initializer=[
            numpy_helper.from_array(wu, "Wu"),
            numpy_helper.from_array(wi, "Wi"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    return save_model(graph, path)


def build_tabular(path: Path, n_num: int = 4, n_categories: int = 10, seed: int = 11) -> Path:
    """score [N, 1] = sigmoid([numeric, embed(category)] @ W + b): a tabular scorer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n_categories, 4)).astype(np.float32)
    w = (rng.standard_normal((n_num + 4, 1)) / 2).astype(np.float32)
    b = np.array([0.1], dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "category"], ["cat_emb"], axis=0),
        helper.make_node("Concat", ["numeric", "cat_emb"], ["x"], axis=1),
        helper.make_node("Gemm", ["x", "W", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tabular",
        inputs=[
            helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", n_num]),
            helper.make_tensor_value_info("category", TensorProto.INT64, ["N"]),
        ],
        outputs=[helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        initializer=[
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    return save_model(graph, path)


TWO_TOWER_MANIFEST = """\
# Arrow contract of the demo two-tower model (see docs/manifest.md).
[[passthrough]]
name = "user_id"
type = "utf8"

[[passthrough]]
name = "item_id"
type = "utf8"

[[inputs]]
name = "user_features"
type = "fixed_size_list<float32>[16]"

[[inputs]]
name = "item_features"
type = "fixed_size_list<float32>[16]"

[[outputs]]
name = "score"
type = "float32"

[[outputs]]
name = "user_embedding"
type = "fixed_size_list<float32>[32]"
"""

TABULAR_MANIFEST = """\
# Arrow contract of the demo tabular scorer (see docs/manifest.md).
[[passthrough]]
name = "entity_id"
type = "utf8"

[[inputs]]
name = "features"
type = "fixed_size_list<float32>[4]"
tensor = "numeric"

[[inputs]]
name = "category"
type = "int64"

[[outputs]]
name = "score"
type = "float32"
tensor = "probability"   # ONNX gives [N, 1]; one value per row becomes a float32 column
"""

CONFIG = """\
# Demo model set served by `python -m iskander` when no --config is given.
[[models]]
name = "two_tower"
backend = "onnx"
path = "two_tower.onnx"
execution_providers = ["cpu"]
intra_threads = 1
inter_threads = 1
optimization_level = "level3"
parallel_execution = false
memory_pattern = true

[[models]]
name = "tabular"
backend = "onnx"
path = "tabular.onnx"
intra_threads = 1

# The quickstart recommender, trained on synthetic MovieLens-100K-shaped data by
# configs/movielens-two-tower/train_two_tower.py (which writes the .onnx and manifest here).
[[models]]
name = "movielens-two-tower"
backend = "onnx"
path = "movielens_two_tower.onnx"
intra_threads = 1
"""


def build_demo(out: Path) -> None:
    build_two_tower(out / "two_tower.onnx")
    (out / "two_tower.manifest.toml").write_text(TWO_TOWER_MANIFEST)
    build_tabular(out / "tabular.onnx")
    (out / "tabular.manifest.toml").write_text(TABULAR_MANIFEST)
    (out / "config.toml").write_text(CONFIG)


if __name__ == "__main__":
    build_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
