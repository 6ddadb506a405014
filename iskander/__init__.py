"""Iskander: an Arrow-native ONNX inference server (Arrow Flight + KServe OIP v2 gRPC)."""
