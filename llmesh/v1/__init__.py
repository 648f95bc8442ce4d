"""Generated protobuf and gRPC stubs of llmesh.v1 (see protos/). Do not edit."""
