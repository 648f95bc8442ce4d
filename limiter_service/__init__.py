"""Request and token quotas in Redis. Contract: protos/llmesh/v1/limiter.proto. Not built yet."""
