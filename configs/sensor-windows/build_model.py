"""Build ``sensor_anomaly.onnx``: an anomaly score per window of 3-axis accelerometer readings.

A window is T = 64 time steps x C = 3 channels (x, y, z acceleration in g) from one device. The
model compares every reading with a fixed baseline: a device at rest reads about (0, 0, 1) g with
noise of about 0.02 g on each axis. There are no learned weights; the scores can be checked by hand:

    window [N, 64, 3] float32
      deviation      = (window - BASELINE_MEAN) / BASELINE_STD      [N, 64, 3]  z-score of each reading
      channel_scores = mean over time of deviation^2                [N, 3]      one per axis
      anomaly_score  = mean of channel_scores                       [N]         about 1.0 for baseline noise
      is_anomaly     = not (anomaly_score <= THRESHOLD)  (int64)    [N]         class index 0 / 1

So the anomaly score is the mean squared z-score of the window. Readings that match the baseline
(Gaussian noise of the baseline's size around the baseline's mean) score about 1. Vibration (more
noise), a tilt (gravity moves to another axis) or a stuck offset all raise it. It grows with the
square of the deviation: a steady offset of k standard deviations on one axis adds k^2 / 3. A NaN
reading makes the score NaN, and ``is_anomaly`` is written so that a NaN score is class 1 (anomaly).

Every op is a standard ONNX op (ai.onnx opset 20) run by onnxruntime's CPU provider. Run
``python configs/sensor-windows/build_model.py`` to rebuild the file beside this script; the output
is deterministic (it has no random parts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_FILE = "sensor_anomaly.onnx"
STEPS = 64  # T: readings per window
CHANNELS = 3  # C: x, y, z
BASELINE_MEAN = np.array([0.0, 0.0, 1.0], np.float32)  # g, device at rest, z axis up
BASELINE_STD = np.array([0.02, 0.02, 0.02], np.float32)  # g, sensor noise at rest
THRESHOLD = 4.0  # anomaly_score above this (RMS deviation above 2 standard deviations) is an anomaly
OPSET = 20
IR_VERSION = 10  # ONNX 1.16+; onnxruntime 1.32 accepts it


def make_model(steps: int = STEPS) -> onnx.ModelProto:
    const = numpy_helper.from_array
    initializers = [
        const(BASELINE_MEAN.reshape(1, 1, CHANNELS), "baseline_mean"),
        const(BASELINE_STD.reshape(1, 1, CHANNELS), "baseline_std"),
        const(np.array(THRESHOLD, np.float32), "threshold"),
        const(np.array([1], np.int64), "axes_1"),
    ]
    node = helper.make_node
    nodes = [
        node("Sub", ["window", "baseline_mean"], ["centred"], name="centre"),
        node("Div", ["centred", "baseline_std"], ["deviation"], name="z_score"),
        node("Mul", ["deviation", "deviation"], ["squared"], name="square"),
        node("ReduceMean", ["squared", "axes_1"], ["channel_scores"], keepdims=0, name="mean_over_time"),
        node("ReduceMean", ["channel_scores", "axes_1"], ["anomaly_score"], keepdims=0, name="mean_over_channels"),
        # not (score <= threshold): a NaN score (a NaN reading in the window) counts as an anomaly
        node("LessOrEqual", ["anomaly_score", "threshold"], ["within"], name="within_threshold"),
        node("Not", ["within"], ["above"], name="above_threshold"),
        node("Cast", ["above"], ["is_anomaly"], to=TensorProto.INT64, name="class_index"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "sensor_anomaly",
        [helper.make_tensor_value_info("window", f, ["N", steps, CHANNELS])],
        [
            helper.make_tensor_value_info("anomaly_score", f, ["N"]),
            helper.make_tensor_value_info("is_anomaly", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("channel_scores", f, ["N", CHANNELS]),
            helper.make_tensor_value_info("deviation", f, ["N", steps, CHANNELS]),
        ],
        initializer=initializers,
    )
    graph.doc_string = (
        f"Mean squared z-score of a [{steps}, {CHANNELS}] accelerometer window against a fixed baseline "
        f"(mean {BASELINE_MEAN.tolist()} g, std {BASELINE_STD.tolist()} g); anomaly above {THRESHOLD}."
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="iskander-example-sensor-windows")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_dir: Path | str) -> Path:
    """Write ``sensor_anomaly.onnx`` into ``out_dir`` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    onnx.save(make_model(), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes, windows of {STEPS} x {CHANNELS}, threshold {THRESHOLD})")


if __name__ == "__main__":
    main()
