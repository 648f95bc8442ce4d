"""Prometheus conventions shared by every llmesh service.

- Each service owns one `CollectorRegistry` (built in its server.py and passed to whatever records metrics), and
  serves it on its own `/metrics` HTTP port (`metrics_port` setting; 0 = off).
- Names: `llmesh_<service>_<what>_<unit>`, counters end in `_total`, durations are `_seconds` histograms.
- Labels, where they apply: `tier` (free|paid|enterprise), `variant` (model variant), `replica` (host:port of a
  Triton), `code` (gRPC status name, e.g. OK, INVALID_ARGUMENT). Never a key, user or request id (cardinality).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

# Latency buckets from 1 ms to 2 minutes: cache hits live at the bottom, long generations at the top.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
# Inter-token gaps: 1 ms to 2 s.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> None:
    """Expose `registry` at http://host:port/metrics from a background thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host, registry=registry)
