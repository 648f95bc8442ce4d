"""Request and token quotas in Redis, exact under concurrency (see core.py, lua/, policy.toml).

Contract: protos/llmesh/v1/limiter.proto, plus Envoy's envoy.service.ratelimit.v3.RateLimitService for the edge.
"""
