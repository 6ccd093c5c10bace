"""Launch helpers for clusters (batch-script templating; no Ray import)."""
