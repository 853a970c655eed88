"""Reading radiographs of every format into [0, 1] with labels, patients and splits: the ingest stage
(``ingest.stage``, configured by ``ingest.config``) and its parts."""
