"""Worked example: a scikit-learn churn Pipeline served with ``backend = "sklearn"``.

    python configs/churn-sklearn/build_model.py [--out DIR]

Trains StandardScaler + LogisticRegression on a seeded synthetic churn data set (five numeric
features per customer, labels "stay" / "churn"), prints held-out accuracy and ROC AUC, and writes
churn.joblib and churn.manifest.toml beside this script (or into --out). The joblib file is not
committed: it is a pickle, and this script rebuilds it in a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FEATURES = ("tenure_months", "monthly_spend", "support_calls", "days_since_login", "discount_rate")
CLASSES = ("churn", "stay")  # sklearn sorts classes_: probabilities are [P(churn), P(stay)]
N_CUSTOMERS = 4000
SEED = 23

MANIFEST = '''\
# Arrow contract of churn.joblib (StandardScaler + LogisticRegression), written by build_model.py.
# The five feature columns are the estimator's features in training order (docs/python_models.md).

[[passthrough]]
name = "customer_id"
type = "utf8"
description = "returned unchanged"
''' + "".join(f'''
[[inputs]]
name = "{name}"
type = "float64"
cast_from = ["float32", "int64", "int32"]
''' for name in FEATURES) + '''
[[outputs]]
name = "label"
type = "utf8"
description = "predict: 'churn' or 'stay'"

[[outputs]]
name = "probabilities"
type = "fixed_size_list<float32>[2]"
description = "predict_proba: [P(churn), P(stay)] (classes in sorted order)"
'''


def make_data(n: int = N_CUSTOMERS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic customers; churn is likelier with short tenure, many support calls, long absence."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([
        rng.gamma(2.0, 12.0, n),      # tenure_months
        rng.normal(45.0, 15.0, n),    # monthly_spend
        rng.poisson(1.5, n),          # support_calls
        rng.exponential(10.0, n),     # days_since_login
        rng.uniform(0.0, 0.3, n),     # discount_rate
    ])
    logit = -0.06 * x[:, 0] + 0.01 * x[:, 1] + 0.6 * x[:, 2] + 0.08 * x[:, 3] - 4.0 * x[:, 4] - 0.8
    churned = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))
    return x, np.where(churned, "churn", "stay")


def train(seed: int = SEED):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_data(seed=seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x_train, y_train)
    metrics = {
        "churn_rate": float((y == "churn").mean()),
        "accuracy": float(accuracy_score(y_test, pipeline.predict(x_test))),
        "roc_auc": float(roc_auc_score(y_test == "churn", pipeline.predict_proba(x_test)[:, 0])),
    }
    return pipeline, metrics


def build(out_dir: Path, seed: int = SEED) -> Path:
    import joblib

    pipeline, metrics = train(seed)
    print(f"churn rate {metrics['churn_rate']:.3f}; held-out accuracy {metrics['accuracy']:.3f}, "
          f"ROC AUC {metrics['roc_auc']:.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "churn.joblib"
    joblib.dump(pipeline, path)
    (out_dir / "churn.manifest.toml").write_text(MANIFEST)
    print(f"wrote {path} and churn.manifest.toml")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
