"""The Model that ``backend = "sklearn"`` runs in each worker process (docs/python_models.md).

Loads the operator's joblib file (a fitted estimator or Pipeline) and answers with the manifest's
output tensors: ``label`` from ``predict``, ``probabilities`` from ``predict_proba``. Features are
the manifest's input tensors in manifest order, each contributing its values per row (a scalar
column one feature, a fixed_size_list<T>[k] column k), stacked into one [rows, features] matrix.
Everything the model cannot serve is refused at load, not at the first request.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

OUTPUTS = ("label", "probabilities")  # manifest output tensor names this model answers


class Model:
    def load(self, context) -> None:
        import joblib  # only in the worker: the server process never unpickles a model

        where = f"model '{context.name}'"
        # Pickle runs code: this is only ever the operator-configured path, never client data.
        self.estimator = joblib.load(context.path)
        self.inputs = [(t["name"], t["width"]) for t in context.inputs]
        self.outputs = {t["name"]: t for t in context.outputs}
        unknown = sorted(set(self.outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"{where}: output tensor '{unknown[0]}' is not one an sklearn model answers; "
                             f"name outputs {' and/or '.join(map(repr, OUTPUTS))} (predict / predict_proba)")
        if any(width is None for _, width in self.inputs):
            raise ValueError(f"{where}: every input needs a fixed number of features per row")
        features = sum(width for _, width in self.inputs)
        fitted = getattr(self.estimator, "n_features_in_", None)
        if fitted is not None and fitted != features:
            raise ValueError(f"{where}: the manifest's inputs give {features} features per row but the estimator "
                             f"was fitted on {fitted} (n_features_in_)")
        # Fitted on a DataFrame: the matrix is handed over as one, its columns named in the fitted order.
        names = getattr(self.estimator, "feature_names_in_", None)
        self.feature_names = None if names is None else [str(n) for n in names]
        if self.feature_names is not None and all(width == 1 for _, width in self.inputs):
            manifest_names = [name for name, _ in self.inputs]
            if manifest_names != self.feature_names:
                raise ValueError(f"{where}: the manifest's inputs {manifest_names} are not the estimator's "
                                 f"features in fitted order {self.feature_names} (feature_names_in_)")
        classes = getattr(self.estimator, "classes_", None)
        if "probabilities" in self.outputs:
            if not hasattr(self.estimator, "predict_proba"):
                raise ValueError(f"{where}: output 'probabilities' needs predict_proba, which "
                                 f"{type(self.estimator).__name__} does not have")
            width = self.outputs["probabilities"]["shape"]
            if len(width) != 1 or width[0] is None or (classes is not None and width != [len(classes)]):
                n = "n_classes" if classes is None else len(classes)
                raise ValueError(f"{where}: output 'probabilities' must be declared fixed_size_list<float32>[{n}] "
                                 f"(one value per class of the estimator)")
        if "label" in self.outputs and self.outputs["label"]["shape"]:
            raise ValueError(f"{where}: output 'label' must be a scalar column (one class per row)")
        self.types = {name: _arrow_type(t) for name, t in self.outputs.items()}
        if "label" in self.outputs and classes is not None:
            try:
                pa.array(np.asarray(classes)).cast(self.types["label"])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"{where}: the estimator's classes {list(classes)[:5]} cannot be output 'label' "
                                 f"of type {self.types['label']}: {exc}") from None

    def predict(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        rows = batch.num_rows
        if rows == 0:  # estimators refuse empty input
            return pa.RecordBatch.from_arrays([pa.array([], t) for t in self.types.values()], names=list(self.types))
        columns: list[np.ndarray] = []
        for name, width in self.inputs:
            values = batch.column(name)
            for _ in range(_depth(values.type)):
                values = values.flatten()
            columns.extend(values.to_numpy(zero_copy_only=False).reshape(rows, width).T)
        if self.feature_names is not None:
            import pandas as pd

            x = pd.DataFrame(dict(zip(self.feature_names, columns)))
        else:
            x = np.column_stack(columns)
        arrays = []
        for name, t in self.types.items():
            if name == "label":
                arrays.append(pa.array(np.asarray(self.estimator.predict(x))).cast(t))
            else:
                proba = np.asarray(self.estimator.predict_proba(x))
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(proba.reshape(-1)).cast(t.value_type),
                                                                proba.shape[1]))
        return pa.RecordBatch.from_arrays(arrays, names=list(self.types))


def _depth(t: pa.DataType) -> int:
    depth = 0
    while pa.types.is_fixed_size_list(t):
        t, depth = t.value_type, depth + 1
    return depth


def _arrow_type(tensor: dict) -> pa.DataType:
    t = pa.type_for_alias(tensor["element"])
    for d in reversed(tensor["shape"]):
        t = pa.list_(t, d)
    return t
