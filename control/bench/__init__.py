"""`llmesh bench`: a load generator for the mesh or any OpenAI-compatible endpoint.

Core modules do no I/O and are unit-tested with fakes: `workload` (what each request looks like, reproducible from
a seed), `load` (fixed concurrency or Poisson arrivals, bounded by a request count and/or a duration), `stats`
(percentiles, throughput, cache hit rate, cost), `stream` (reads one SSE or JSON answer into a `RequestResult`).
The I/O lives in `client` (HTTP), `report` (JSON, Markdown, PNG, terminal table) and `command` (the CLI).
"""
