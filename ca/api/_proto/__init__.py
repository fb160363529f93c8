"""Generated protobuf code for trellis.ca.v1 (scripts/gen-protos.sh)."""
