"""Example G, scientific data: float64 measurements served by a float32 model through declared casts.

    python configs/scientific/build_model.py [--out DIR]

The model computes the mechanical energy of particles: kinetic 0.5 * m * |v|^2 and potential
m * g * h, and their sum. Instruments and simulations write float64; the model runs in float32.
The manifest declares `cast_from = ["float64"]` per column so such batches are cast on the server
(Arrow's safe cast) instead of being rejected, and a missing height is filled with 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

G = 9.80665


def build(out_dir: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["velocity", "velocity"], ["v2"]),
        helper.make_node("ReduceSum", ["v2", "axis1"], ["speed2"], keepdims=0),
        helper.make_node("Mul", ["mass", "speed2"], ["m_v2"]),
        helper.make_node("Mul", ["m_v2", "half"], ["kinetic_energy"]),
        helper.make_node("Mul", ["mass", "height"], ["m_h"]),
        helper.make_node("Mul", ["m_h", "g"], ["potential_energy"]),
        helper.make_node("Add", ["kinetic_energy", "potential_energy"], ["total_energy"]),
    ]
    graph = helper.make_graph(
        nodes, "mechanical_energy",
        inputs=[
            helper.make_tensor_value_info("mass", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("height", TensorProto.FLOAT, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"])
            for name in ("kinetic_energy", "potential_energy", "total_energy")
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(G, np.float32), "g"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "energy.onnx"
    onnx.save(model, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    print(f"wrote {build(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
