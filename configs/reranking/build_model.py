"""Build ``reranker.onnx``: a two-tower scorer for (user, candidate item) rows.

Each row is one candidate item for one user. Each tower maps its features to an 8-dim vector and
the score is the dot product of the two vectors. The first 4 dims of each vector are an explicit
category affinity (the user's activity share per category, the item's category embedding); the last
4 come from a small dense layer with seeded weights that mixes all six features of the tower:

    user_x [N, 6]            age, tenure_days, activity[4]   (the server concatenates the struct)
      affinity: AFFINITY * activity                                  [N, 4]
      dense:    tanh(((user_x - mean) / scale) @ W_user + b_user)    [N, 4]
    user_vec = concat(affinity, dense)                               [N, 8]

    item_price [N, 1]        one ONNX input per struct field (the manifest's field_tensors)
    item_popularity [N, 1]
    item_category [N, 4]
      item_x = concat(log(1 + price), popularity, category)          [N, 6]
      dense:    tanh(((item_x - mean) / scale) @ W_item + b_item)    [N, 4]
    item_vec = concat(category, dense)                               [N, 8]

    relevance_score [N] = sum(user_vec * item_vec)
                        = AFFINITY * (activity . category) + (dense_user . dense_item)

Every op is a standard ONNX op (ai.onnx opset 20) run by onnxruntime's CPU provider. Run
``python configs/reranking/build_model.py`` to rebuild the file beside this script; the output is
deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_FILE = "reranker.onnx"
DENSE = 4  # dense dims per tower (the affinity part is 4 more)
AFFINITY = 3.0  # weight of activity . category in the score
SEED = 1
OPSET = 20
IR_VERSION = 10  # ONNX 1.16+; onnxruntime 1.32 accepts it

# Fixed standardisation, (x - mean) / scale, per feature in the order of each tower's input.
USER_MEAN = np.array([35.0, 365.0, 0.25, 0.25, 0.25, 0.25], np.float32)  # age, tenure_days, activity[4]
USER_SCALE = np.array([12.0, 300.0, 0.2, 0.2, 0.2, 0.2], np.float32)
ITEM_MEAN = np.array([3.0, 0.5, 0.0, 0.0, 0.0, 0.0], np.float32)  # log(1 + price), popularity, category[4]
ITEM_SCALE = np.array([1.0, 0.25, 1.0, 1.0, 1.0, 1.0], np.float32)


def weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """The dense layers' seeded weights: user_w, item_w [6, DENSE] and user_b, item_b [DENSE], float32."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(6.0)
    return {
        "user_w": (rng.standard_normal((6, DENSE)) * scale).astype(np.float32),
        "user_b": (rng.standard_normal(DENSE) * 0.1).astype(np.float32),
        "item_w": (rng.standard_normal((6, DENSE)) * scale).astype(np.float32),
        "item_b": (rng.standard_normal(DENSE) * 0.1).astype(np.float32),
    }


def make_model(seed: int = SEED) -> onnx.ModelProto:
    w = weights(seed)
    const = numpy_helper.from_array
    initializers = [
        const(USER_MEAN, "user_mean"), const(USER_SCALE, "user_scale"),
        const(ITEM_MEAN, "item_mean"), const(ITEM_SCALE, "item_scale"),
        const(w["user_w"], "user_w"), const(w["user_b"], "user_b"),
        const(w["item_w"], "item_w"), const(w["item_b"], "item_b"),
        const(np.array(AFFINITY, np.float32), "affinity"),
        const(np.array(1.0, np.float32), "one_f32"),
        const(np.array([1], np.int64), "axes_1"),
        const(np.array([2], np.int64), "activity_start"),
        const(np.array([6], np.int64), "activity_end"),
    ]
    node = helper.make_node
    nodes = [
        # user tower: affinity part (activity is columns 2..5 of user_x) and dense part
        node("Slice", ["user_x", "activity_start", "activity_end", "axes_1"], ["activity"], name="activity"),
        node("Mul", ["activity", "affinity"], ["user_affinity"], name="user_affinity"),
        node("Sub", ["user_x", "user_mean"], ["user_centred"], name="user_centre"),
        node("Div", ["user_centred", "user_scale"], ["user_std"], name="user_standardise"),
        node("MatMul", ["user_std", "user_w"], ["user_lin"], name="user_matmul"),
        node("Add", ["user_lin", "user_b"], ["user_pre"], name="user_bias"),
        node("Tanh", ["user_pre"], ["user_dense"], name="user_tanh"),
        node("Concat", ["user_affinity", "user_dense"], ["user_vec"], axis=1, name="user_vec"),
        # item tower: per-field preprocessing (log of the price), then the same two parts
        node("Add", ["item_price", "one_f32"], ["price_plus_one"], name="price_plus_one"),
        node("Log", ["price_plus_one"], ["log_price"], name="log_price"),
        node("Concat", ["log_price", "item_popularity", "item_category"], ["item_x"], axis=1, name="item_x"),
        node("Sub", ["item_x", "item_mean"], ["item_centred"], name="item_centre"),
        node("Div", ["item_centred", "item_scale"], ["item_std"], name="item_standardise"),
        node("MatMul", ["item_std", "item_w"], ["item_lin"], name="item_matmul"),
        node("Add", ["item_lin", "item_b"], ["item_pre"], name="item_bias"),
        node("Tanh", ["item_pre"], ["item_dense"], name="item_tanh"),
        node("Concat", ["item_category", "item_dense"], ["item_vec"], axis=1, name="item_vec"),
        # score: dot product of the two tower vectors
        node("Mul", ["user_vec", "item_vec"], ["products"], name="products"),
        node("ReduceSum", ["products", "axes_1"], ["relevance_score"], keepdims=0, name="dot"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "reranker",
        [
            helper.make_tensor_value_info("user_x", f, ["N", 6]),
            helper.make_tensor_value_info("item_price", f, ["N", 1]),
            helper.make_tensor_value_info("item_popularity", f, ["N", 1]),
            helper.make_tensor_value_info("item_category", f, ["N", 4]),
        ],
        [helper.make_tensor_value_info("relevance_score", f, ["N"])],
        initializer=initializers,
    )
    graph.doc_string = (
        f"Two-tower relevance scorer: {AFFINITY} * (activity . category) plus the dot product of two "
        f"seeded dense+tanh layers ({DENSE} dims, seed {seed}) over the standardised user and item features."
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="iskander-example-reranking")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_dir: Path | str, seed: int = SEED) -> Path:
    """Write ``reranker.onnx`` into ``out_dir`` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    onnx.save(make_model(seed), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes, affinity {AFFINITY}, dense {DENSE} dims, seed {SEED})")


if __name__ == "__main__":
    main()
