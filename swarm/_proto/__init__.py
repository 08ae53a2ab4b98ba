"""Generated protobuf/gRPC modules of proto/swarm/v1 (see proto/generate.py)."""
