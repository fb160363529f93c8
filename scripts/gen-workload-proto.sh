#!/usr/bin/env bash
# Regenerate ca/workload/workload_pb2{.py,.pyi,_grpc.py} from ca/workload/workload.proto.
#
# Needs grpcio-tools (a test dependency). Run from anywhere: `scripts/gen-workload-proto.sh`.
#
# One post-processing step, and why: the standard Workload API proto has no `package`, so
# its messages are top-level names (X509SVIDRequest, ...). py-spiffe bundles its own copy of
# the same proto; two files defining the same top-level names cannot both live in
# protobuf's default descriptor pool ("duplicate symbol 'X509SVIDRequest'"), so a process
# that imports py-spiffe and Trellis's Workload API code would fail at import time. The
# generated module is therefore rewritten to register into a private descriptor pool
# (ca/workload/_pool.py). Message names never travel on the wire, so this changes nothing
# for interoperability: the gRPC paths stay /SpiffeWorkloadAPI/<Method>.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  ca/workload/workload.proto

pb2=ca/workload/workload_pb2.py
grep -q '_descriptor_pool.Default().AddSerializedFile' "$pb2" || {
  echo "gen-workload-proto: protoc output changed shape; update the pool rewrite" >&2
  exit 1
}
sed -i \
  -e 's/_descriptor_pool\.Default()\.AddSerializedFile/_pool.POOL.AddSerializedFile/' \
  -e 's/^from google\.protobuf\.internal import builder as _builder$/&\nfrom ca.workload import _pool/' \
  "$pb2"
# protoc's stubs use bare Mapping in __init__ signatures; mypy --strict would flag them.
sed -i '1i # mypy: disable-error-code="type-arg"' ca/workload/workload_pb2.pyi
echo "regenerated $pb2 (private descriptor pool), workload_pb2.pyi, workload_pb2_grpc.py"
