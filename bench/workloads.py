"""Benchmark workloads: one model file, one request shape, identical on every system.

Every system receives the same tensors under the same names: two_tower takes user_features and
item_features FP32 [N,16] and answers score; tabular takes numeric FP32 [N,4] and category INT64
[N,1] (Triton's convention for one value per row) and answers probability. The demo manifests add
passthrough id columns and a second output; the bench manifests written here leave them out so
Iskander does exactly the work the baselines do (no BYTES columns, one output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_DIR = Path(__file__).resolve().parent.parent / "iskander" / "demo"

# onnxruntime settings every system uses (Iskander config keys; the baselines mirror them).
ORT_SETTINGS = {"intra_op": 1, "inter_op": 1, "optimization": "all"}


@dataclass(frozen=True)
class Tensor:
    name: str  # Arrow column = OIP tensor = ONNX input/output name
    dtype: str  # numpy dtype name
    width: int  # values per row
    scalar: bool = False  # one value per row: Arrow primitive column, OIP [N,1], ONNX [N]

    @property
    def oip_datatype(self) -> str:
        return {"float32": "FP32", "int64": "INT64"}[self.dtype]

    @property
    def arrow_type(self) -> str:
        return self.dtype if self.scalar else f"fixed_size_list<{self.dtype}>[{self.width}]"


@dataclass(frozen=True)
class Model:
    name: str
    onnx_file: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    int_high: int = 10  # exclusive upper bound for integer inputs (category ids)

    def manifest_toml(self) -> str:
        lines = [f"# bench-only contract for {self.name}: the tensors every system is sent, no passthrough\n"]
        for section, cols in (("inputs", self.inputs), ("outputs", self.outputs)):
            for t in cols:
                lines.append(f'[[{section}]]\nname = "{t.name}"\ntype = "{t.arrow_type}"\n')
        return "\n".join(lines)


GENERATED_DIR = Path(__file__).resolve().parent / "models"  # bench-only models, built on first use


def wide_mlp_file() -> Path:
    """A model whose per-call cost dominates: x [N, 1024] -> 4096 -> 4096 -> score [N, 1], ~21M
    float32 weights. At batch 1 every call streams all weights for one row; merged calls share
    that cost, which is what dynamic batching is for."""
    path = GENERATED_DIR / "wide_mlp.onnx"
    if path.is_file():
        return path
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    dims = [1024, 4096, 4096, 1]
    inits, nodes, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        out = "score" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out if out == "score" else f"m{i}"]))
        if out != "score":
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


MODELS = {
    "two_tower": Model(
        "two_tower", DEMO_DIR / "two_tower.onnx",
        inputs=(Tensor("user_features", "float32", 16), Tensor("item_features", "float32", 16)),
        outputs=(Tensor("score", "float32", 1, scalar=True),),
    ),
    "tabular": Model(
        "tabular", DEMO_DIR / "tabular.onnx",
        inputs=(Tensor("numeric", "float32", 4), Tensor("category", "int64", 1, scalar=True)),
        outputs=(Tensor("probability", "float32", 1, scalar=True),),
    ),
    "wide_mlp": Model(
        "wide_mlp", GENERATED_DIR / "wide_mlp.onnx",
        inputs=(Tensor("x", "float32", 1024),),
        outputs=(Tensor("score", "float32", 1, scalar=True),),
    ),
}


# Python models (backend = "python"), served by Iskander only: bench/python_workers.py writes the
# model file into its run's temp dir (``onnx_file`` is not used for them). Not in MODELS, which the
# baselines serve.
PYTHON_MODELS = {
    "gil_loop": Model(
        "gil_loop", Path("gil_loop.py"),
        inputs=(Tensor("x", "float32", 1, scalar=True),),
        outputs=(Tensor("score", "float32", 1, scalar=True),),
    ),
}


@dataclass(frozen=True)
class Workload:
    model_name: str
    batch: int

    @property
    def model(self) -> Model:
        return MODELS[self.model_name] if self.model_name in MODELS else PYTHON_MODELS[self.model_name]

    @property
    def key(self) -> str:
        return f"{self.model_name}_b{self.batch}"

    def wire_arrays(self) -> dict[str, np.ndarray]:
        """The request as OIP shapes ([N,k]; scalars [N,1]); deterministic so every system sees the same bytes."""
        rng = np.random.default_rng(1234 + self.batch)
        out = {}
        for t in self.model.inputs:
            if t.dtype == "int64":
                out[t.name] = rng.integers(0, self.model.int_high, size=(self.batch, t.width), dtype=np.int64)
            else:
                out[t.name] = rng.standard_normal((self.batch, t.width)).astype(t.dtype)
        return out

    def ort_feeds(self) -> dict[str, np.ndarray]:
        return {t.name: (a.reshape(-1) if t.scalar else a) for t, a in zip(self.model.inputs, self.wire_arrays().values())}

    def arrow_batch(self):
        import pyarrow as pa  # imported lazily: the ORT-only worker does not need it

        cols = {}
        for t, a in zip(self.model.inputs, self.wire_arrays().values()):
            flat = pa.array(np.ascontiguousarray(a).reshape(-1))
            cols[t.name] = flat if t.scalar else pa.FixedSizeListArray.from_arrays(flat, t.width)
        return pa.record_batch(cols)


def parse(spec: str) -> Workload:
    """'two_tower:128' or 'tabular:128' (batch defaults to 128)."""
    name, _, batch = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return Workload(name, int(batch) if batch else 128)


def write_iskander_config(
    folder: Path, models: list[str], dynamic_batching: dict | None = None, instances: int = 1
) -> Path:
    """An Iskander config + bench manifests for `models`, in `folder` (a temp dir), with the shared ORT settings."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = ["# generated by bench/workloads.py for one benchmark run\n"]
    for name in models:
        m = MODELS[name]
        manifest = folder / f"{name}.bench.manifest.toml"
        manifest.write_text(m.manifest_toml())
        parts.append(
            f'[[models]]\nname = "{name}"\nbackend = "onnx"\npath = "{m.onnx_file}"\nmanifest = "{manifest}"\n'
            f'execution_providers = ["cpu"]\nintra_threads = {ORT_SETTINGS["intra_op"]}\n'
            f'inter_threads = {ORT_SETTINGS["inter_op"]}\noptimization_level = "{ORT_SETTINGS["optimization"]}"\n'
            f"parallel_execution = false\nmemory_pattern = true\ninstances = {instances}\n"
        )
        if dynamic_batching:
            inner = ", ".join(f"{k} = {v}" for k, v in dynamic_batching.items())
            parts.append(f"dynamic_batching = {{ {inner} }}\n")
    path = folder / ("iskander-dynbatch.toml" if dynamic_batching else "iskander.toml")
    path.write_text("\n".join(parts))
    return path


def ort_session(onnx_file: Path):
    """An InferenceSession with the shared settings (in-process floor and the minimal servers)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_SETTINGS["intra_op"]
    opts.inter_op_num_threads = ORT_SETTINGS["inter_op"]
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_mem_pattern = True
    return ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
