"""In-process cost of one OIP ModelInfer, without gRPC: Iskander's servicer against the minimal one.

    python bench/oip_inprocess.py [--batch 128] [--requests 3000] [--profile]

Both handle the same ModelInferRequest (two_tower, FP32 [N, 16] x 2 -> score) with the same
onnxruntime settings; the difference is Iskander's per-request Python (decode and validation,
contract, statistics, response). --profile prints where Iskander's time goes (cProfile).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from minimal_oip import MinimalOip  # noqa: E402
from workloads import MODELS  # noqa: E402

from iskander._proto import grpc_service_pb2 as pb  # noqa: E402
from iskander.config.loader import load_config  # noqa: E402
from iskander.core.control import ControlPlane  # noqa: E402
from iskander.core.dataplane import Dataplane, Inflight  # noqa: E402
from iskander.core.registry import ModelRegistry  # noqa: E402
from iskander.frontends.oip import OipServicer  # noqa: E402
from iskander.observability.observer import Observer  # noqa: E402


class _Context:
    """The three ServicerContext methods the handlers call."""

    def time_remaining(self) -> None:
        return None

    def abort(self, code: object, message: str) -> None:
        raise RuntimeError(message)

    def invocation_metadata(self) -> tuple:
        return ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    model = MODELS["two_tower"]
    tmp = Path(tempfile.mkdtemp())
    (tmp / "bench.manifest.toml").write_text(model.manifest_toml())
    (tmp / "config.toml").write_text(
        f'[[models]]\nname = "two_tower"\npath = "{model.onnx_file}"\nmanifest = "{tmp / "bench.manifest.toml"}"\n'
        "intra_threads = 1\ninter_threads = 1\n"
    )
    registry = ModelRegistry(load_config(tmp / "config.toml").models)
    registry.load_all()
    iskander = OipServicer(Dataplane(registry, Observer(), Inflight()), ControlPlane(registry))
    minimal = MinimalOip(["two_tower"])

    request = pb.ModelInferRequest(model_name="two_tower")
    rng = np.random.default_rng(0)
    for name in ("user_features", "item_features"):
        request.inputs.add(name=name, datatype="FP32", shape=[args.batch, 16])
        request.raw_input_contents.append(rng.standard_normal((args.batch, 16)).astype(np.float32).tobytes())
    request.outputs.add(name="score")
    context = _Context()

    def iskander_infer(request: pb.ModelInferRequest, context: _Context) -> pb.ModelInferResponse:
        return iskander.ModelInfer(request)  # the servicer has no gRPC context (see AioOip)

    for label, handler in (("minimal", minimal.ModelInfer), ("iskander", iskander_infer)) * 2:
        for _ in range(300):
            handler(request, context)
        start = time.perf_counter()
        for _ in range(args.requests):
            handler(request, context)
        print(f"{label:9} {(time.perf_counter() - start) / args.requests * 1e6:7.1f} us per ModelInfer")
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(lambda: [iskander.ModelInfer(request) for _ in range(args.requests)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
