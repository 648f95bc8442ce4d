"""The operator's tools, above the services: the `llmesh` CLI, the launcher, bench, top, the proto generator and
Envoy's config. Services never import from here (checked by `lint-imports`)."""
