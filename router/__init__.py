"""The router: picks a model variant per request, tokenizes, and streams tokens from Triton."""
