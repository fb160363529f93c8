"""Generated protobuf code for csi.v1 v1.11.0 (scripts/gen-protos.sh)."""
