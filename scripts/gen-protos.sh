#!/usr/bin/env bash
# Regenerate the Python code for Trellis's own protos (commit the output).
#
# Needs grpcio-tools (a test dependency). Run from anywhere: `scripts/gen-protos.sh`.
#
# The proto keeps its canonical path under ca/api/proto (trellis/ca/v1/ca.proto, package
# trellis.ca.v1), so the generated gRPC module would import `trellis.ca.v1.ca_pb2` --
# which collides with the `trellis` CLI package. The import is rewritten to the module's
# real home, ca/api/_proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PYTHON" -m grpc_tools.protoc -I ca/api/proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    ca/api/proto/trellis/ca/v1/ca.proto
dest=ca/api/_proto
mkdir -p "$dest"
for f in ca_pb2.py ca_pb2.pyi ca_pb2_grpc.py; do
    sed -e 's/^from trellis\.ca\.v1 import ca_pb2/from ca.api._proto import ca_pb2/' \
        "$out/trellis/ca/v1/$f" > "$dest/$f"
done
# protoc's stubs use bare Mapping in __init__ signatures; mypy --strict would flag them.
sed -i '1i # mypy: disable-error-code="type-arg"' "$dest/ca_pb2.pyi"
[ -f "$dest/__init__.py" ] || printf '"""Generated protobuf code for trellis.ca.v1 (scripts/gen-protos.sh)."""\n' > "$dest/__init__.py"
echo "generated $dest/ca_pb2.py ca_pb2.pyi ca_pb2_grpc.py"

# trellis.workload.v1 (the agent's SessionKeys service beside the SPIFFE Workload API), into
# the same package and with the same import rewrite.
"$PYTHON" -m grpc_tools.protoc -I ca/api/proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    ca/api/proto/trellis/workload/v1/session_keys.proto
for f in session_keys_pb2.py session_keys_pb2.pyi session_keys_pb2_grpc.py; do
    sed -e 's/^from trellis\.workload\.v1 import session_keys_pb2/from ca.api._proto import session_keys_pb2/' \
        "$out/trellis/workload/v1/$f" > "$dest/$f"
done
sed -i '1i # mypy: disable-error-code="type-arg"' "$dest/session_keys_pb2.pyi"
echo "generated $dest/session_keys_pb2.py session_keys_pb2.pyi session_keys_pb2_grpc.py"

# The CSI spec's proto (csi.v1), for the agent's CSI node plugin (ca/agent/csi.py). It is
# not vendored: the Go module proxy serves the spec repository, so the proto comes from
# the module cache at a pinned version and only the generated code is committed.
CSI_SPEC_VERSION="${CSI_SPEC_VERSION:-v1.11.0}"
csi_dir="$(cd "$out" && go mod download -json "github.com/container-storage-interface/spec@$CSI_SPEC_VERSION" \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
"$PYTHON" -m grpc_tools.protoc -I "$csi_dir" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "$csi_dir/csi.proto"
dest=ca/agent/_csi_proto
mkdir -p "$dest"
for f in csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py; do
    sed -e 's/^import csi_pb2 as csi__pb2/from ca.agent._csi_proto import csi_pb2 as csi__pb2/' \
        "$out/$f" > "$dest/$f"
done
# protoc also types module-level extension numbers (csi.proto's alpha_* options) as ClassVar.
sed -i '1i # mypy: disable-error-code="type-arg,misc"' "$dest/csi_pb2.pyi"
[ -f "$dest/__init__.py" ] || printf '"""Generated protobuf code for csi.v1 %s (scripts/gen-protos.sh)."""\n' "$CSI_SPEC_VERSION" > "$dest/__init__.py"
echo "generated $dest/csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py"
