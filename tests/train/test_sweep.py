"""One optimizer config, one schedule builder, one no-decay rule and one sweep for every training task."""

from __future__ import annotations

import pytest
import torch

from radstream.core.config import ConfigError, load_config
from radstream.train.config import PretrainConfig
from radstream.train.finetune import FinetuneConfig
from radstream.train.optim import make_schedule, no_weight_decay, param_groups
from radstream.train.supervised import SupervisedConfig
from radstream.train.sweep import STUDY_LR_GRID, sweep_configs

BASE = ["shards=s", "run_dir=runs/x"]


def test_the_study_grid_is_one_name_for_every_task():
    for cls, extra in ((SupervisedConfig, []), (FinetuneConfig, ["model.init=m"]), (PretrainConfig, [])):
        cfg = load_config(cls, None, [*BASE, *extra, "optim.lr_grid=study"])
        runs = sweep_configs(cfg)
        assert [r.optim.lr for r in runs] == list(STUDY_LR_GRID)
        assert runs[4].run_dir == "runs/x/lr-0.00013" and runs[4].optim.lr_grid is None
        assert runs[4].optim.lr_rule == cfg.optim.lr_rule  # a rate is read by the recipe's rule
    one = load_config(SupervisedConfig, None, BASE)
    assert sweep_configs(one) == [one]
    with pytest.raises(ConfigError, match="lr_grid"):
        load_config(SupervisedConfig, None, [*BASE, "optim.lr_grid=[1e-3,-1]"])
    with pytest.raises(ConfigError, match="lr_grid"):
        load_config(SupervisedConfig, None, [*BASE, "optim.lr_grid=studies"])


def test_one_lr_rule_and_a_warmup_never_longer_than_the_run():
    sup = load_config(
        SupervisedConfig, None, [*BASE, "optim.lr=1e-3", "optim.warmup_epochs=50", "run.epochs=3"]
    )
    sched = make_schedule(sup.optim, sup.run.epochs, 16, loader_batches=4, num_processes=2)
    assert sched.peak_lr == 1e-3 and sched.warmup_steps == sched.total_steps == 12  # capped (was 200)
    ft = load_config(FinetuneConfig, None, [*BASE, "model.init=m"])
    assert ft.optim.lr_rule == "per_256"  # the reference's rule: 5e-4 per 256 images
    assert make_schedule(ft.optim, 1, 32, 4, 1).peak_lr == pytest.approx(5e-4 * 32 / 256)
    with pytest.raises(ConfigError, match="lr_rule"):
        load_config(SupervisedConfig, None, [*BASE, "optim.lr_rule=sqrt"])


def test_one_no_weight_decay_rule_for_every_task():
    names = {"encoder.pos_embed": 3, "mask_token": 3, "head.weight": 2, "blocks.0.norm1.weight": 1,
             "decoder_embed.weight": 2, "encoder.cls_token": 3}  # fmt: skip
    skipped = {
        n for n, ndim in names.items() if no_weight_decay(n, torch.nn.Parameter(torch.zeros([1] * ndim)))
    }
    assert skipped == {"encoder.pos_embed", "mask_token", "blocks.0.norm1.weight", "encoder.cls_token"}
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.ndim for p in decay["params"]] == [2] and len(no_decay["params"]) == 3


def test_finetuning_trains_every_rate_of_its_grid(monkeypatch):
    """``radstream.train.finetune`` sweeps ``optim.lr_grid`` as the baselines do (it inherited the field and ignored it)."""
    import radstream.train.finetune as finetune

    ran = []
    monkeypatch.setattr(finetune.trainer, "run", lambda task: ran.append(task.cfg) or 0)
    cfg = load_config(FinetuneConfig, None, [*BASE, "model.init=m", "optim.lr_grid=[1e-4,5e-4]"])
    assert finetune.run(cfg) == 0
    assert [(c.run_dir, c.optim.lr, c.optim.lr_rule) for c in ran] == [
        ("runs/x/lr-0.0001", 1e-4, "per_256"),
        ("runs/x/lr-0.0005", 5e-4, "per_256"),
    ]
