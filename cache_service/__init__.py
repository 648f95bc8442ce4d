"""Response cache in Redis (exact, then semantic). Contract: protos/llmesh/v1/cache.proto. Not built yet."""
