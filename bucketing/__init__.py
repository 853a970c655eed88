"""Bin planning, assignment, fit geometry and the batch schedule: pure logic (numpy only, no torch, no I/O)."""

from bucketing.bins import (
    STRATEGIES,
    BinningConfig,
    assign_bins,
    assign_strict,
    assign_with_config,
    capped_shapes,
    plan_bins,
    plan_fixed,
    plan_smart,
    plan_strict,
)
from bucketing.elastic import remaining_padding_masks, remaining_schedule
from bucketing.geometry import FIT_MODES, Bin, FitGeometry, as_sizes, fit_geometry, fit_sizes, parse_bins
from bucketing.report import BinReport, BinStats, plan_report
from bucketing.schedule import (
    Step,
    bin_order,
    bin_sequence,
    bin_total,
    epoch_schedule,
    mean_batch_size,
    mean_step_tokens,
    schedule_stats,
    steps_per_epoch,
    token_budget_batch_sizes,
)

__all__ = [
    "FIT_MODES",
    "STRATEGIES",
    "Bin",
    "BinReport",
    "BinStats",
    "BinningConfig",
    "FitGeometry",
    "Step",
    "as_sizes",
    "bin_order",
    "bin_sequence",
    "bin_total",
    "assign_bins",
    "assign_strict",
    "assign_with_config",
    "capped_shapes",
    "epoch_schedule",
    "fit_geometry",
    "fit_sizes",
    "parse_bins",
    "plan_bins",
    "plan_fixed",
    "plan_report",
    "plan_smart",
    "plan_strict",
    "remaining_padding_masks",
    "remaining_schedule",
    "schedule_stats",
    "steps_per_epoch",
    "mean_batch_size",
    "mean_step_tokens",
    "token_budget_batch_sizes",
]
