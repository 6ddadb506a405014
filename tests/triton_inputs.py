"""tritonclient inputs in raw or typed-contents form (typed form is what KServe clients may send)."""

from __future__ import annotations

import tritonclient.grpc as triton


CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
    "FP16": "fp32_contents",  # not allowed by the protocol: lets a test check the server refuses it
}


class TypedInput(triton.InferInput):
    """An InferInput that carries its data in typed `contents` instead of raw bytes.

    tritonclient.grpc always sends raw_input_contents; KServe clients may send typed contents,
    so the tests write the same request with the fields filled in by hand."""

    def set_data_from_numpy(self, data, binary_data=False):
        field = getattr(self._get_tensor().contents, CONTENTS[self.datatype()])
        field.extend(data.reshape(-1).tolist())
        return self


def make_input(name, data, dtype, binary=True):
    t = (triton.InferInput if binary else TypedInput)(name, list(data.shape), dtype)
    t.set_data_from_numpy(data)
    return t
