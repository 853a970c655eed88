"""Frozen-encoder evaluation: embeddings of a trained encoder in a zarr store (``embed``), linear probes over a grid of rates and aggregations (``probe``, ``probe_grid``) and kNN beside them."""
