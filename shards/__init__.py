"""Shard datasets: writing them (``radstream.shards.builder``) and streaming them (everything else here).

Two rooms with one wall between them:

- ``radstream.shards.builder`` (plan, parts, resample, writer, finalize, verify, binreport, publish, config) turns the
  ingest stage's records into tars, indexes, manifest and samples table. It may use the streaming side's
  tools (transport, layout).
- The streaming side (loader, loader_config, loader_data, dali_backend, torch_backend, store, remote, cache,
  transport, manifest) reads a finished dataset, local or remote. It never imports ``radstream.shards.builder``,
  ``ingest`` or ``pydicom`` (``tests/test_layout.py`` checks it).

Shared by both: ``layout`` (the manifest and samples table on disk), ``codecs`` and ``index`` (the tar
members and their DALI index).
"""
