#!/usr/bin/env bash
# Regenerate iskander/_proto from proto/*.proto (the `make proto` target).
#
# Usage: scripts/gen_proto.sh [PYTHON]   (PYTHON defaults to python3)
# PYTHON must have grpcio-tools==1.81.1 installed (see pyproject.toml).
set -euo pipefail

PYTHON="${1:-python3}"

# Always run from the repository root, wherever we were called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=iskander/_proto
mkdir -p "$OUT"

"$PYTHON" -m grpc_tools.protoc -Iproto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/model_config.proto proto/grpc_service.proto

# protoc emits top-level imports (`import model_config_pb2 as ...`); make them
# package-relative so the modules work as iskander._proto.*.
sed -E -i.bak 's/^import (model_config_pb2|grpc_service_pb2) as /from . import \1 as /' \
  "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi "$OUT"/*_pb2_grpc.py
rm -f "$OUT"/*.bak
