"""Results: the study's tables and figures (``report``), the exported encoder and its card (``export``, ``model_card``)."""
