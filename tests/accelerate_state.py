"""Accelerate keeps process-wide state (the accelerator's device, precision, gradient accumulation); tests
that build several accelerators in one process reset it between them, as accelerate's own test case does."""

from __future__ import annotations


def reset_accelerate() -> None:
    """Forget every accelerator built so far in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
