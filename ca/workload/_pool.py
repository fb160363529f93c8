"""The private descriptor pool the generated Workload API module registers into.

See scripts/gen-workload-proto.sh for why: the standard proto has no package, so its
message names would collide in the default pool with py-spiffe's bundled copy.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool, struct_pb2

__all__ = ["POOL"]

POOL = descriptor_pool.DescriptorPool()
# workload.proto imports google/protobuf/struct.proto; the private pool needs it too.
POOL.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
