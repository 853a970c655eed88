"""What every stage shares, below the stages: config loading and atomic writes.

``core`` imports nothing of radstream's own packages; ``ingest``, ``bucketing``, ``shards``, ``train`` and the
``radstream`` CLI all build on it.
"""
