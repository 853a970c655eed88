"""Reading radiographs of every format into [0, 1] with labels, patients and splits: the ingest stage
(``radstream.ingest.pipeline``, configured by ``radstream.ingest.config``) and its parts."""
