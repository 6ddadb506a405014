"""The MLServer baseline: an MLModel that wraps onnxruntime.InferenceSession (MLServer has no ONNX runtime).

Runs inside bench/.venv-mlserver, never imported by the harness. Same ORT settings as every
other system (intra_op 1, inter_op 1, ORT_ENABLE_ALL, sequential, memory pattern on). Inputs whose
ONNX rank is 1 (one value per row) arrive as [N,1] and are flattened, as Iskander does.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_mem_pattern = True
        self.session = ort.InferenceSession(self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"])
        self.rank = {i.name: len(i.shape) for i in self.session.get_inputs()}
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for inp in payload.inputs:
            arr = NumpyCodec.decode_input(inp)
            feeds[inp.name] = arr.reshape(-1) if self.rank[inp.name] == 1 else arr
        names = [o.name for o in payload.outputs or []] or [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, out) for name, out in zip(names, outs)],
        )
