"""Response cache in Redis: exact and semantic layers, tenant scopes, single flight.

Contract: protos/llmesh/v1/cache.proto.
"""
