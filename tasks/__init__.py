"""KoroKoro's stages: one module per stage, each a plain typed function that a Prefect task wraps."""
