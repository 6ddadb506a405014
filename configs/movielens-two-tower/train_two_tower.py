"""Train the quickstart MovieLens-shaped two-tower model in numpy and export it as ONNX + manifest.

    python configs/movielens-two-tower/train_two_tower.py [--out DIR] [--epochs E] [--seed S] [--dim D]

Needs numpy and onnx (``pip install -e .[dev]``); onnxruntime is used to check the export.

The data is SYNTHETIC. The real MovieLens files cannot be downloaded where this example is built,
so ``generate_ratings`` draws a seeded dataset with MovieLens-100K's shape: 943 users, 1682 items,
100,000 ratings from 1 to 5, every user with at least 20 ratings, skewed item popularity. Ratings
come from a hidden latent-factor model (user and item factors, biases, Gaussian noise, rounded and
clipped to 1..5), so there is real structure for the model to learn and the held-out RMSE can be
compared with the baseline of always predicting the global mean.

Model (user ids and item ids are 0-based):

    user_embedding = tanh(U[user_id] @ Wu + cu)          user tower, [N, dim]
    item_embedding = tanh(V[item_id] @ Wi + ci)          item tower, [N, dim]
    score = <user_embedding, item_embedding> + bu[user_id] + bi[item_id] + global_mean

trained with mini-batch Adam on the squared error of the predicted rating, with an L2 penalty on
the two tower outputs and the biases of each rating (as in classic matrix factorisation) and a
smaller one on the embedding rows. Everything is seeded: the same arguments give the same bytes.

The ONNX graph refuses ids outside [0, n_users) and [0, n_items): a plain ONNX Gather would accept
negative ids and silently wrap them (-1 would be the last user), so each id first goes through two
range-check Gathers whose node names say the valid range; an out-of-range id fails the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N_USERS = 943
N_ITEMS = 1682
N_RATINGS = 100_000
OPSET = 17
IR_VERSION = 9
MODEL_FILE = "movielens_two_tower.onnx"
MANIFEST_FILE = "movielens_two_tower.manifest.toml"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "iskander" / "demo"


# --- data -------------------------------------------------------------------------------------------


def generate_ratings(
    seed: int = 0,
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_ratings: int = N_RATINGS,
    rank: int = 8,
    min_per_user: int = 20,
) -> dict[str, Any]:
    """A seeded synthetic rating set with MovieLens-100K's shape.

    Returns ``{"user_id": int64[R], "item_id": int64[R], "rating": float32[R], ...}``; each
    (user, item) pair appears at most once. Item popularity is Zipf-like (a few items get hundreds
    of ratings, many get a handful) and popular items are rated a little higher, as in MovieLens;
    user activity is log-normal with a floor of ``min_per_user``. A user never rates more than
    ``n_items`` items, so a small variant may hold slightly fewer than ``n_ratings`` ratings.
    """
    rng = np.random.default_rng(seed)
    # Item popularity: Zipf-like over a random order of the items.
    pop_rank = rng.permutation(n_items)
    log_pop = -1.15 * np.log(pop_rank + 30.0)
    # Ratings per user: min_per_user + a log-normal share of the rest, summing to n_ratings.
    activity = rng.lognormal(0.0, 0.95, n_users)
    extra = activity / activity.sum() * (n_ratings - min_per_user * n_users)
    per_user = min_per_user + np.floor(extra).astype(np.int64)
    short = n_ratings - int(per_user.sum())
    per_user[np.argsort(-(extra - np.floor(extra)), kind="stable")[:short]] += 1
    per_user = np.minimum(per_user, n_items)
    # Each user's items: weighted sampling without replacement (Gumbel top-k), all users at once.
    keys = log_pop[None, :] + rng.gumbel(size=(n_users, n_items))
    order = np.argsort(-keys, axis=1, kind="stable")
    items = order[np.arange(n_items)[None, :] < per_user[:, None]]
    users = np.repeat(np.arange(n_users), per_user)
    # The hidden model the ratings come from.
    u_fac = rng.normal(0.0, 1.0, (n_users, rank))
    i_fac = rng.normal(0.0, 1.0, (n_items, rank))
    affinity = (u_fac[users] * i_fac[items]).sum(axis=1) * (0.75 / np.sqrt(rank))
    user_bias = rng.normal(0.0, 0.4, n_users)
    pop_z = (log_pop - log_pop.mean()) / log_pop.std()
    item_bias = rng.normal(0.0, 0.4, n_items) + 0.25 * pop_z
    noise = rng.normal(0.0, 0.65, users.size)
    raw = 3.3 + user_bias[users] + item_bias[items] + affinity + noise
    rating = np.clip(np.rint(raw), 1, 5).astype(np.float32)
    return {
        "user_id": users.astype(np.int64),
        "item_id": items.astype(np.int64),
        "rating": rating,
        "n_users": n_users,
        "n_items": n_items,
        "seed": seed,
    }


# --- model ------------------------------------------------------------------------------------------


def _tower(table: np.ndarray, w: np.ndarray, c: np.ndarray, ids: np.ndarray):
    e = table[ids]
    z = np.tanh(e @ w + c)
    return e, z


def predict(weights: dict[str, np.ndarray], user_id: np.ndarray, item_id: np.ndarray) -> dict[str, np.ndarray]:
    """The model's forward pass in numpy (the same arithmetic as the exported ONNX graph)."""
    _, zu = _tower(weights["user_table"], weights["user_w"], weights["user_c"], user_id)
    _, zi = _tower(weights["item_table"], weights["item_w"], weights["item_c"], item_id)
    score = (zu * zi).sum(axis=1) + weights["user_bias"][user_id] + weights["item_bias"][item_id]
    return {"score": score + weights["global_mean"], "user_embedding": zu, "item_embedding": zi}


def _rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - target) ** 2)))


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            params[k] -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def train(
    data: dict[str, Any],
    *,
    dim: int = 32,
    epochs: int = 12,
    seed: int = 0,
    lr: float = 0.01,
    batch_size: int = 1024,
    l2: float = 0.05,
    l2_table: float = 0.01,
    init_std: float = 0.1,
    holdout: float = 0.1,
    log: Callable[[str], None] | None = print,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the two-tower model with mini-batch Adam. Returns (float32 weights, metrics).

    ``metrics`` holds ``baseline_rmse`` (predicting the training mean on the held-out ratings),
    ``train_loss`` (mean squared error over the epoch's training batches) and
    ``heldout_rmse_per_epoch`` per epoch, the final ``heldout_rmse`` of the float32 weights, and
    ``heldout`` (the held-out ids and ratings).
    """
    say = log or (lambda _msg: None)
    rng = np.random.default_rng(seed)
    users, items = data["user_id"], data["item_id"]
    ratings = data["rating"].astype(np.float64)
    n_users, n_items = data["n_users"], data["n_items"]

    perm = rng.permutation(ratings.size)
    n_held = int(round(holdout * ratings.size))
    held, tr = perm[:n_held], perm[n_held:]
    tu, ti, tr_r = users[tr], items[tr], ratings[tr]
    hu, hi, hr = users[held], items[held], ratings[held]
    mu = float(tr_r.mean())
    baseline = _rmse(np.full_like(hr, mu), hr)

    p: dict[str, np.ndarray] = {
        "user_table": rng.normal(0.0, init_std, (n_users, dim)),
        "item_table": rng.normal(0.0, init_std, (n_items, dim)),
        "user_w": rng.normal(0.0, 1.0 / np.sqrt(dim), (dim, dim)),
        "item_w": rng.normal(0.0, 1.0 / np.sqrt(dim), (dim, dim)),
        "user_c": np.zeros(dim),
        "item_c": np.zeros(dim),
        "user_bias": np.zeros(n_users),
        "item_bias": np.zeros(n_items),
    }
    opt = _Adam(p, lr)
    metrics: dict[str, Any] = {
        "n_train": int(tr.size),
        "n_heldout": int(n_held),
        "global_mean": mu,
        "baseline_rmse": baseline,
        "train_loss": [],
        "heldout_rmse_per_epoch": [],
    }
    say(
        f"data: {n_users} users, {n_items} items, {ratings.size} ratings "
        f"({tr.size} train, {n_held} held out); global mean {mu:.4f}"
    )
    say(f"baseline (predict the global mean): held-out RMSE {baseline:.4f}")
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(tr.size)
        sq_err = 0.0
        for start in range(0, order.size, batch_size):
            b = order[start : start + batch_size]
            u, i, r = tu[b], ti[b], tr_r[b]
            n = b.size
            eu, zu = _tower(p["user_table"], p["user_w"], p["user_c"], u)
            ei, zi = _tower(p["item_table"], p["item_w"], p["item_c"], i)
            pred = (zu * zi).sum(axis=1) + p["user_bias"][u] + p["item_bias"][i] + mu
            err = pred - r
            sq_err += float(err @ err)
            g = (2.0 / n) * err  # d(mean squared error)/d(pred)
            # L2 on the tower outputs (the vectors in the dot product), as classic matrix factorisation.
            dhu = (g[:, None] * zi + (2.0 * l2 / n) * zu) * (1.0 - zu * zu)
            dhi = (g[:, None] * zu + (2.0 * l2 / n) * zi) * (1.0 - zi * zi)
            grads = {
                "user_w": eu.T @ dhu,
                "item_w": ei.T @ dhi,
                "user_c": dhu.sum(axis=0),
                "item_c": dhi.sum(axis=0),
                "user_table": np.zeros_like(p["user_table"]),
                "item_table": np.zeros_like(p["item_table"]),
                "user_bias": np.bincount(u, weights=g + (2.0 * l2 / n) * p["user_bias"][u], minlength=n_users),
                "item_bias": np.bincount(i, weights=g + (2.0 * l2 / n) * p["item_bias"][i], minlength=n_items),
            }
            # Embedding rows: backprop through the dense layer, plus L2 on each row a rating touches.
            np.add.at(grads["user_table"], u, dhu @ p["user_w"].T + (2.0 * l2_table / n) * eu)
            np.add.at(grads["item_table"], i, dhi @ p["item_w"].T + (2.0 * l2_table / n) * ei)
            opt.step(p, grads)
        train_loss = sq_err / tr.size
        held_rmse = _rmse(predict({**p, "global_mean": mu}, hu, hi)["score"], hr)
        metrics["train_loss"].append(train_loss)
        metrics["heldout_rmse_per_epoch"].append(held_rmse)
        say(
            f"epoch {epoch:2d}/{epochs}  train loss (MSE) {train_loss:.4f}  "
            f"held-out RMSE {held_rmse:.4f}  ({time.perf_counter() - started:.1f}s)"
        )
    weights = {k: v.astype(np.float32) for k, v in p.items()}
    weights["global_mean"] = np.float32(mu)
    # The reported RMSE is the one of the float32 weights that are exported.
    final = _rmse(predict(weights, hu, hi)["score"].astype(np.float64), hr)
    metrics["heldout_rmse"] = final
    metrics["heldout"] = {"user_id": hu, "item_id": hi, "rating": hr}
    say(f"final held-out RMSE {final:.4f} vs baseline {baseline:.4f} ({100 * (1 - final / baseline):.1f}% lower)")
    return weights, metrics


# --- export -----------------------------------------------------------------------------------------


def _checked_ids(prefix: str, ids: str, n: int, name: str) -> tuple[list, list]:
    """Nodes that pass ``ids`` through unchanged when every id is in [0, n) and fail otherwise.

    ONNX Gather accepts indices in [-n, n), so a plain Gather would silently wrap -1 to the last
    row. Here ``ids`` is gathered from n zeros twice: once as is (fails for ids >= n) and once as
    ``ids - n`` (fails for ids < 0). ``ids`` plus the two zeros is the index every later node
    uses, so no output that depends on the id is computed from an out-of-range id. The node
    names carry the range into ONNX Runtime's error message.
    """
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.zeros(n, dtype=np.int64), f"{prefix}_zeros"),
        numpy_helper.from_array(np.array(n, dtype=np.int64), f"{prefix}_count"),
    ]
    nodes = [
        helper.make_node("Gather", [f"{prefix}_zeros", ids], [f"{prefix}_ok_hi"], axis=0,
                         name=f"{name}_must_be_below_{n}"),
        helper.make_node("Sub", [ids, f"{prefix}_count"], [f"{prefix}_shifted"]),
        helper.make_node("Gather", [f"{prefix}_zeros", f"{prefix}_shifted"], [f"{prefix}_ok_lo"], axis=0,
                         name=f"{name}_must_not_be_negative"),
        helper.make_node("Add", [ids, f"{prefix}_ok_hi"], [f"{prefix}_idx_hi"]),
        helper.make_node("Add", [f"{prefix}_idx_hi", f"{prefix}_ok_lo"], [f"{prefix}_idx"]),
    ]
    return nodes, inits


def build_onnx(weights: dict[str, np.ndarray], doc: str = ""):
    """The ONNX ModelProto (opset 17, IR 9) for ``weights``; checked with onnx.checker."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_users, dim = weights["user_table"].shape
    n_items = weights["item_table"].shape[0]
    u_nodes, u_inits = _checked_ids("u", "user_id", n_users, "user_id")
    i_nodes, i_inits = _checked_ids("i", "item_id", n_items, "item_id")
    nodes = u_nodes + i_nodes + [
        # user tower
        helper.make_node("Gather", ["user_table", "u_idx"], ["u_emb"], axis=0),
        helper.make_node("MatMul", ["u_emb", "user_w"], ["u_lin"]),
        helper.make_node("Add", ["u_lin", "user_c"], ["u_pre"]),
        helper.make_node("Tanh", ["u_pre"], ["user_embedding"]),
        # item tower
        helper.make_node("Gather", ["item_table", "i_idx"], ["i_emb"], axis=0),
        helper.make_node("MatMul", ["i_emb", "item_w"], ["i_lin"]),
        helper.make_node("Add", ["i_lin", "item_c"], ["i_pre"]),
        helper.make_node("Tanh", ["i_pre"], ["item_embedding"]),
        # score = <user, item> + user bias + item bias + global mean
        helper.make_node("Mul", ["user_embedding", "item_embedding"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axis1"], ["dot"], keepdims=0),
        helper.make_node("Gather", ["user_bias", "u_idx"], ["ub"], axis=0),
        helper.make_node("Gather", ["item_bias", "i_idx"], ["ib"], axis=0),
        helper.make_node("Add", ["dot", "ub"], ["s1"]),
        helper.make_node("Add", ["s1", "ib"], ["s2"]),
        helper.make_node("Add", ["s2", "global_mean"], ["score"]),
    ]
    f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    inits = u_inits + i_inits + [
        numpy_helper.from_array(f32["user_table"], "user_table"),
        numpy_helper.from_array(f32["user_w"], "user_w"),
        numpy_helper.from_array(f32["user_c"], "user_c"),
        numpy_helper.from_array(f32["item_table"], "item_table"),
        numpy_helper.from_array(f32["item_w"], "item_w"),
        numpy_helper.from_array(f32["item_c"], "item_c"),
        numpy_helper.from_array(f32["user_bias"], "user_bias"),
        numpy_helper.from_array(f32["item_bias"], "item_bias"),
        numpy_helper.from_array(np.array(f32["global_mean"], dtype=np.float32), "global_mean"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "movielens_two_tower",
        inputs=[
            helper.make_tensor_value_info("user_id", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("item_id", TensorProto.INT64, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["N", dim]),
            helper.make_tensor_value_info("item_embedding", TensorProto.FLOAT, ["N", dim]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="iskander-movielens-example"
    )
    model.ir_version = IR_VERSION
    model.doc_string = doc or (
        f"Two-tower rating model trained on synthetic MovieLens-100K-shaped data. "
        f"user_id in [0, {n_users}), item_id in [0, {n_items}); score is the predicted rating."
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def manifest_text(dim: int, n_users: int = N_USERS, n_items: int = N_ITEMS) -> str:
    return f"""\
# Arrow contract of the quickstart MovieLens two-tower model (see docs/manifest.md and
# configs/movielens-two-tower/README.md). Written by configs/movielens-two-tower/train_two_tower.py.
# No passthrough columns: the answer is score, user_embedding, item_embedding, row-aligned with the request.

[[inputs]]
name = "user_id"
type = "int64"
description = "0-based user id in [0, {n_users}); other values fail the request"

[[inputs]]
name = "item_id"
type = "int64"
description = "0-based item id in [0, {n_items}); other values fail the request"

[[outputs]]
name = "score"
type = "float32"
description = "predicted rating (1..5 scale): <user_embedding, item_embedding> + user bias + item bias + global mean"

[[outputs]]
name = "user_embedding"
type = "fixed_size_list<float32>[{dim}]"
description = "user tower output, tanh(user_table[user_id] @ Wu + cu)"

[[outputs]]
name = "item_embedding"
type = "fixed_size_list<float32>[{dim}]"
description = "item tower output, tanh(item_table[item_id] @ Wi + ci)"
"""


def export(weights: dict[str, np.ndarray], out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``movielens_two_tower.onnx`` and its manifest into ``out_dir``; returns both paths."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_users, dim = weights["user_table"].shape
    n_items = weights["item_table"].shape[0]
    model_path = out / MODEL_FILE
    manifest_path = out / MANIFEST_FILE
    onnx.save(build_onnx(weights), str(model_path))
    manifest_path.write_text(manifest_text(dim, n_users, n_items), encoding="utf-8")
    return model_path, manifest_path


def check_export(model_path: Path, weights: dict[str, np.ndarray], heldout: dict[str, np.ndarray]) -> float:
    """Run the exported file with onnxruntime on the held-out ratings; returns its RMSE."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"user_id": heldout["user_id"], "item_id": heldout["item_id"]})
    want = predict(weights, heldout["user_id"], heldout["item_id"])
    for value, name in zip(got, ("score", "user_embedding", "item_embedding")):
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    return _rmse(got[0].astype(np.float64), heldout["rating"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data, the split and the init (default: 0)")
    parser.add_argument("--dim", type=int, default=32, help="embedding size (default: 32)")
    args = parser.parse_args(argv)
    data = generate_ratings(args.seed)
    weights, metrics = train(data, dim=args.dim, epochs=args.epochs, seed=args.seed)
    model_path, manifest_path = export(weights, args.out)
    onnx_rmse = check_export(model_path, weights, metrics["heldout"])
    print(f"onnxruntime on the exported model: held-out RMSE {onnx_rmse:.4f}")
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes)")
    print(f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
