"""Example B, tabular scoring: a scikit-learn churn classifier exported with skl2onnx.

    python configs/tabular-scoring/build_model.py [--out DIR]

Trains a gradient-boosted classifier on a seeded synthetic churn data set (6 numeric features per
customer), prints held-out accuracy and ROC AUC, and writes churn_model.onnx beside this script
(or into --out). The manifest (churn_model.manifest.toml) maps the six feature columns into the
model's one [N, 6] input and turns its outputs into `score` (churn probability) and `label`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FEATURES = ("tenure_months", "monthly_spend", "support_calls", "days_since_login", "discount_rate", "devices")
N_CUSTOMERS = 4000
SEED = 17


def make_data(n: int = N_CUSTOMERS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic customers; churn is more likely with short tenure, many support calls, long absence."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([
        rng.gamma(2.0, 12.0, n),          # tenure_months
        rng.normal(45.0, 15.0, n),        # monthly_spend
        rng.poisson(1.5, n),              # support_calls
        rng.exponential(10.0, n),         # days_since_login
        rng.uniform(0.0, 0.3, n),         # discount_rate
        rng.integers(1, 5, n),            # devices
    ]).astype(np.float32)
    logit = (-0.06 * x[:, 0] + 0.01 * x[:, 1] + 0.6 * x[:, 2] + 0.08 * x[:, 3] - 4.0 * x[:, 4]
             - 0.3 * x[:, 5] - 0.5)
    y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return x, y


def train(seed: int = SEED):
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    x, y = make_data(seed=seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=seed).fit(x_train, y_train)
    proba = clf.predict_proba(x_test)[:, 1]
    metrics = {
        "churn_rate": float(y.mean()),
        "accuracy": float(accuracy_score(y_test, clf.predict(x_test))),
        "roc_auc": float(roc_auc_score(y_test, proba)),
    }
    return clf, metrics


def build(out_dir: Path, seed: int = SEED) -> Path:
    from skl2onnx import to_onnx

    clf, metrics = train(seed)
    print(f"churn rate {metrics['churn_rate']:.3f}; held-out accuracy {metrics['accuracy']:.3f}, "
          f"ROC AUC {metrics['roc_auc']:.3f}")
    onx = to_onnx(
        clf, make_data(8, seed)[0], options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.ir_version = 9
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "churn_model.onnx"
    path.write_bytes(onx.SerializeToString())
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
