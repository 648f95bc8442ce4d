"""The gateway: llmesh's public gRPC API. Auth and tier lookup, validation, then cache -> limiter -> router."""
