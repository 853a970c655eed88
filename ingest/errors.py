"""Errors raised for inputs that cannot be used."""


class RejectError(Exception):
    """An input that cannot be used; ``str(err)`` is the one-line reason recorded in ``rejects.jsonl``."""
