"""Figures for docs/SCALING.md, as counts and CPU-seconds (robust on a shared machine), not wall time.

.venv/bin/python -m benchmarks.scaling.redis_ops     # Redis commands per request, by kind and by part
.venv/bin/python -m benchmarks.scaling.redis_cpu     # redis-server CPU per operation of our scripts
.venv/bin/python -m benchmarks.scaling.service_cpu   # CPU-seconds per request of each mesh process
"""
