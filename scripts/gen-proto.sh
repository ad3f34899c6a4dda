#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf stubs from src/kleidi/_proto/**/*.proto.
# Usage: scripts/gen-proto.sh [OUTPUT_ROOT]   (default: src; tests generate into a temp dir and compare)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/src}
py=${PYTHON:-$here/.venv/bin/python}
cd "$here/src"
protos=$(find kleidi/_proto -name '*.proto' | sort)
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" $protos
# Only files with a service get a useful _grpc module; drop the empty ones protoc writes for the rest.
find "$out/kleidi/_proto" -name '*_pb2_grpc.py' -exec grep -L 'Servicer' {} + | xargs -r rm -f
