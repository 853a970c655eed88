"""``run.mixed_precision=bf16`` proven on the CPU (autocast to bfloat16 exists there too): the MAE of the debug
recipe, the supervised ViT and fine-tuning train a few steps with losses close to fp32, the key-padding mask
reaches attention as a boolean, and a checkpoint written in bf16 resumes exactly.

Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per operation); over three
optimizer steps of the tiny models the losses stay within ``LOSS_RTOL`` = 1% of fp32's (measured at most
0.03%: MAE 0.008%, supervised ViT 0.03%, fine-tuning 0.004%).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radstream.core.config import load_config
from radstream.shards.images import unit_float
from radstream.shards.loader import build_loader
from radstream.train.checkpoint import load_checkpoint, save_checkpoint
from radstream.train.classifier import ClassifierConfig, build_classifier
from radstream.train.config import PretrainConfig, RunConfig
from radstream.train.finetune import EncoderClassifier
from radstream.train.mae_step import train_step as mae_step
from radstream.train.optim import build_optimizer, param_groups
from radstream.train.run_layout import latest_checkpoint
from radstream.train.steps import build_accelerator
from radstream.train.supervised import SupervisedOptimConfig
from radstream.train.supervised import train_step as supervised_step
from tests.accelerate_state import reset_accelerate
from tests.train.tiny_mae import tiny_mae

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"
LOSS_RTOL = 0.01
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def batches(tiny_shards: Path) -> list[dict]:
    """The first ``STEPS`` training batches of the debug recipe's loader (several bins, augmented)."""
    cfg = load_config(PretrainConfig, RECIPE, [f"shards={tiny_shards}", "run_dir=."])
    loader = build_loader(cfg.loader, tiny_shards, "train")
    return [b for _, b in zip(range(STEPS), loader, strict=False)]


def accelerator_for(precision: str, run_dir: Path):
    """The run's accelerator as ``run.mixed_precision=<precision>`` builds it (fresh process-wide state)."""
    reset_accelerate()
    return build_accelerator(RunConfig(cpu=True, mixed_precision=precision, tensorboard=False), str(run_dir))


def model_of(task: str) -> torch.nn.Module:
    """The debug recipe's MAE, the supervised debug ViT, or the fine-tuning model (MAE encoder + head)."""
    torch.manual_seed(0)
    if task == "mae":
        return tiny_mae(border_aware=True, border_threshold=0.02)
    if task == "supervised-vit":
        vit = ClassifierConfig(kind="vit", arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)
        return build_classifier(vit, 8)
    return EncoderClassifier(tiny_mae(), 8, "cls")


def model_blocks(model: torch.nn.Module):
    return model.encoder.blocks


def train(task: str, accelerator, model, batches: list[dict], first_step: int = 0) -> list[float]:
    """Losses of one optimizer step per batch (the task's own step function)."""
    optimizer = build_optimizer(param_groups(model, 0.05), (0.9, 0.95), 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return run_steps(task, accelerator, model, optimizer, batches, first_step)


def run_steps(task, accelerator, model, optimizer, batches, first_step: int = 0) -> list[float]:
    losses = []
    for i, batch in enumerate(batches):
        step = first_step + i
        if task == "mae":
            stats = mae_step(accelerator, model, optimizer, [batch], seed=0, step=step)
        else:
            stats = supervised_step(
                accelerator, model, optimizer, [batch], step=step, optim=SupervisedOptimConfig()
            )
        losses.append(float(stats.loss))
    return losses


@pytest.mark.parametrize("task", ["mae", "supervised-vit", "finetune"])
def test_bf16_losses_follow_fp32(task: str, batches: list[dict], tmp_path: Path) -> None:
    fp32 = train(task, accelerator_for("no", tmp_path), model_of(task), batches)
    seen: list[torch.dtype] = []
    model = model_of(task)
    blocks = {"mae": model_blocks, "supervised-vit": lambda m: m.blocks}.get(
        task, lambda m: m.backbone.encoder.blocks
    )(model)
    hooks = [b.attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for b in blocks]
    bf16 = train(task, accelerator_for("bf16", tmp_path), model, batches)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran the attention matmuls in bf16
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 == pytest.approx(fp32, rel=LOSS_RTOL), (fp32, bf16)
    assert fp32 != bf16  # the two precisions did differ
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 master weights


def test_bf16_key_padding_mask_stays_boolean(batches: list[dict], tmp_path: Path) -> None:
    accelerator = accelerator_for("bf16", tmp_path)
    model = accelerator.prepare(model_of("mae"))
    masks: list[torch.Tensor] = []

    def keep(module, args, kwargs) -> None:
        masks.append(kwargs.get("attn_mask"))

    for block in model.encoder.blocks:
        block.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        out = model(unit_float(batches[0]["image"]))
    padded = [m for m in masks if m is not None]
    assert padded and all(m.dtype == torch.bool for m in padded)  # never an additive bf16 mask
    assert out.pred.dtype == torch.bfloat16 and out.loss.dtype == torch.float32  # the loss is scored in fp32


def test_bf16_checkpoint_resumes_exactly(batches: list[dict], tmp_path: Path) -> None:
    accelerator = accelerator_for("bf16", tmp_path)
    model = accelerator.prepare(model_of("mae"))
    optimizer = accelerator.prepare(build_optimizer(param_groups(model, 0.05), (0.9, 0.95), 1e-3))
    run_steps("mae", accelerator, model, optimizer, batches[:2])
    save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, "", keep_last=2)
    uninterrupted = run_steps("mae", accelerator, model, optimizer, batches[2:], first_step=2)

    accelerator = accelerator_for("bf16", tmp_path)
    fresh = model_of("mae")
    with torch.no_grad():  # other weights than the saved ones: everything must come from the checkpoint
        for p in fresh.parameters():
            p.add_(0.01)
    model = accelerator.prepare(fresh)
    optimizer = accelerator.prepare(build_optimizer(param_groups(model, 0.05), (0.9, 0.95), 1e-3))
    assert load_checkpoint(accelerator, latest_checkpoint(tmp_path)) == {"step": 2}
    resumed = run_steps("mae", accelerator, model, optimizer, batches[2:], first_step=2)
    assert resumed == uninterrupted  # bit for bit
