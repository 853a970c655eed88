"""Building a shard dataset: plan (bins and parts of the ingest records) → parts (decode, resize, encode,
write) → finalize (manifest, samples table, rejects) → verify, publish; ``config`` holds ``BuildConfig``."""
