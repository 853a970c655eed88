"""MAE model: tiny encoder (32 wide, 2 blocks), CPU, seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from radstream.core.config import load_config
from radstream.train.mae import MAEConfig, background_patches, build_mae, patchify, random_masking, unpatchify
from radstream.train.optim import param_groups
from radstream.train.pos_embed import resample_learned, sincos_2d
from radstream.train.weights import load_init
from tests.train.tiny_mae import TINY, tiny_mae


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


def test_patchify_roundtrip_non_square():
    imgs = images(2, 32, 48)
    x = patchify(imgs, 16)
    assert x.shape == (2, 6, 256)
    assert torch.equal(unpatchify(x, 16, (2, 3)), imgs)
    # patch order is row-major over the 2x3 grid: pixel values encode the patch index
    coded = (
        torch.arange(6, dtype=torch.float)
        .reshape(1, 1, 2, 3)
        .repeat_interleave(16, 2)
        .repeat_interleave(16, 3)
    )
    assert torch.equal(patchify(coded, 16)[0, :, 0], torch.arange(6, dtype=torch.float))


def test_unpatchify_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.zeros(1, 6, 256), 16, (2, 2))


def test_random_masking_ratio_and_shapes():
    x = torch.randn(3, 24, 8)
    visible, mask, ids_restore = random_masking(x, 0.75)
    assert visible.shape == (3, 6, 8)
    assert mask.shape == ids_restore.shape == (3, 24)
    assert torch.equal(mask.sum(dim=1), torch.full((3,), 18.0))


def test_ids_restore_restores_order():
    x = torch.arange(24, dtype=torch.float).reshape(1, 24, 1).repeat(2, 1, 4)
    visible, mask, ids_restore = random_masking(x, 0.5)
    # visible tokens are the unmasked ones
    for i in range(2):
        kept = set(visible[i, :, 0].long().tolist())
        assert kept == set(torch.nonzero(mask[i] == 0).flatten().tolist())
    # append placeholders for the hidden tokens and unshuffle: visible tokens land at their own index
    full = torch.cat([visible, torch.full((2, 12, 4), -1.0)], dim=1)
    restored = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 4))
    seen = mask == 0
    assert torch.equal(restored[seen][:, 0], x[seen][:, 0])
    assert (restored[~seen] == -1).all()


def test_masking_is_reproducible_from_noise():
    x = torch.randn(2, 24, 8)
    noise = torch.rand(2, 24)
    a = random_masking(x, 0.75, noise=noise)
    b = random_masking(x, 0.75, noise=noise)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_loss_only_on_masked_patches():
    model = tiny_mae()
    imgs = images(2, 32, 48)
    out = model(imgs, noise=torch.rand(2, 6))
    target = imgs.clone().requires_grad_(True)
    loss = model.forward_loss(target, out.pred.detach(), out.mask)
    loss.backward()
    grad = patchify(target.grad, 16).abs().sum(dim=-1)  # [N, L]
    assert (grad[out.mask == 0] == 0).all()
    assert (grad[out.mask == 1] > 0).all()


def test_forward_output_and_stats():
    model = tiny_mae()
    out = model(images(2, 64, 96))  # 4x6 = 24 patches
    assert out.pred.shape == (2, 24, 256)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.equal(out.mask.sum(dim=1), torch.full((2,), 18.0))
    assert out.stats["encoder_tokens"].item() == 7  # 6 visible + CLS
    assert out.stats["background_frac"].item() == 0
    assert out.stats["scored_patches"].item() == 18


def test_background_patches_threshold_and_boxes():
    imgs = torch.zeros(2, 1, 32, 48)
    imgs[:, :, :16, 16:32] = 0.5  # patch (0, 1) is foreground
    bg = background_patches(imgs, 16, 0.0)
    assert bg.tolist() == [[True, False, True, True, True, True]] * 2
    imgs = torch.ones(2, 1, 32, 48)
    boxes = torch.tensor([[0, 0, 32, 48], [0, 20, 10, 40]])  # image 1: rows 0..9, cols 20..39
    bg = background_patches(imgs, 16, 0.0, boxes=boxes)
    assert bg[0].tolist() == [False] * 6
    assert bg[1].tolist() == [True, False, False, True, True, True]


def test_border_aware_masking():
    model = tiny_mae(border_aware=True)
    imgs = images(2, 64, 96)
    imgs[:, :, :, :64] = 0.0  # left 4 of 6 patch columns are black: 8 foreground patches per image
    imgs[1, :, 16:, :] = 0.0  # image 1: only the top row's 2 foreground patches remain
    noise = torch.rand(2, 24)
    out = model(imgs, noise=noise)
    bg = background_patches(imgs, 16, 0.0)
    assert bg.sum().item() == 16 + 22
    assert (out.mask[bg] == 0).all()  # background is never scored
    # each image keeps its own share: int(8 * 0.25) = 2 and max(1, int(2 * 0.25)) = 1, CLS added
    assert out.stats["encoder_tokens"].item() == ((2 + 1) + (1 + 1)) / 2
    assert out.stats["encoder_slots"].item() == 7  # keep_width(24, 0.75) = 6 slots for any batch + CLS
    assert out.mask.sum(dim=1).tolist() == [6, 1]  # the rest of each image's foreground is scored
    # background is never visible: the visible set is the foreground minus the scored patches
    keep_bias = torch.zeros(2, 24).masked_fill(bg, float("inf"))
    _, hidden, _ = random_masking(torch.randn(2, 24, 4), 0.75, noise=noise, keep_bias=keep_bias)
    assert (hidden[bg] == 1).all()
    assert torch.equal(hidden[~bg].sum(), out.mask.sum())
    # background pixels do not reach the loss (hidden from the encoder and not scored)
    changed = imgs.clone()
    changed[:, :, :, :16] = 0.9
    assert torch.allclose(model(changed, background=bg, noise=noise).loss, out.loss)


def test_border_aware_masking_skips_the_background_share_of_tokens():
    model = tiny_mae(border_aware=True)
    imgs = images(2, 64, 128)  # 4 x 8 = 32 patches
    imgs[:, :, :, 64:] = 0.0  # right half black: 16 foreground patches each
    out = model(imgs)
    # 75% of the 16 foreground patches hidden: 4 visible (+ CLS), against int(32 * 0.25) = 8 without the mask
    assert out.stats["encoder_tokens"].item() == 4 + 1
    plain = tiny_mae(border_aware=False)(imgs)
    assert plain.stats["encoder_tokens"].item() == 8 + 1


def test_all_background_image_keeps_one_token():
    model = tiny_mae(border_aware=True)
    out = model(torch.zeros(2, 1, 32, 48))
    assert out.stats["encoder_tokens"].item() == 2
    assert out.mask.sum().item() == 0 and out.loss.item() == 0


def _mae_reference_sincos(dim: int, size: int) -> np.ndarray:
    """facebookresearch/mae get_2d_sincos_pos_embed, for a square grid."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_matches_mae_and_handles_any_grid():
    assert np.allclose(sincos_2d(32, (4, 4)).numpy(), _mae_reference_sincos(32, 4), atol=1e-6)
    emb = sincos_2d(32, (2, 3), cls_token=True)
    assert emb.shape == (7, 32)
    assert (emb[0] == 0).all()
    grid = emb[1:].reshape(2, 3, 32)
    assert torch.equal(grid[0, :, :16], grid[1, :, :16])  # first half: column only
    assert torch.equal(grid[:, 0, 16:], grid[:, 2, 16:])  # second half: row only
    assert torch.equal(sincos_2d(32, (3, 2))[:2], sincos_2d(32, (2, 2))[:2])


def test_one_model_many_bin_shapes():
    model = tiny_mae()
    for h, w in [(32, 48), (48, 32), (64, 64), (224, 288)]:
        out = model(images(2, h, w))
        assert out.pred.shape == (2, (h // 16) * (w // 16), 256)
        assert model.forward_features(images(1, h, w)).shape == (1, 1 + (h // 16) * (w // 16), 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images(1, 30, 48))


def test_learned_pos_embed_resampled_per_grid():
    model = tiny_mae(pos_embed="learned")
    table = model.encoder.pos_embed
    assert table.shape == (1, 1 + 14 * 14, 32)
    assert resample_learned(table, (14, 14), (14, 14), 1) is table
    assert resample_learned(table, (14, 14), (2, 3), 1).shape == (1, 7, 32)
    model(images(2, 32, 48)).loss.backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_reconstruction_pastes_the_visible_patches_back():
    model = tiny_mae().eval()
    imgs = images(2, 32, 48)
    out = model(imgs, noise=torch.rand(2, 6))
    recon = model.to_image(imgs, out.pred, out.mask)
    assert recon.shape == imgs.shape
    visible = patchify(imgs, 16)[out.mask == 0]
    assert torch.equal(patchify(recon, 16)[out.mask == 0], visible)
    assert torch.allclose(patchify(recon, 16)[out.mask == 1], out.pred[out.mask == 1])


def test_norm_pix_loss_and_pixel_mse():
    model = tiny_mae(norm_pix_loss=True)
    imgs = images(2, 32, 48)
    out = model(imgs)
    target = patchify(imgs, 16)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    # a perfect normalised prediction: zero loss
    assert model.forward_loss(imgs, normed, out.mask).item() == pytest.approx(0.0, abs=1e-10)
    # no pixel MSE from a normalised prediction: it would need the hidden patch's own mean and std
    means = model.eval_means(model.eval_sums(imgs, out, torch.ones(2, dtype=torch.bool)))
    assert means["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert means["mse_masked"] is None and means["mse_foreground"] is None
    plain = tiny_mae()
    out = plain(imgs)
    means = plain.eval_means(plain.eval_sums(imgs, out, torch.ones(2, dtype=torch.bool)))
    assert means["mse_masked"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert means["mse_foreground"] == pytest.approx(out.loss.item(), rel=1e-5)


def _tiny_timm_rgb() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        in_chans=3,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_init_from_timm_weights(tmp_path, suffix):
    vit = _tiny_timm_rgb()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(vit.state_dict(), str(path))
    else:
        torch.save(vit.state_dict(), path)
    model = tiny_mae(pos_embed="learned", init=str(path))
    enc = model.encoder.state_dict()
    ref = vit.state_dict()
    assert torch.allclose(
        enc["patch_embed.proj.weight"], ref["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    )
    assert torch.equal(enc["blocks.1.mlp.fc2.weight"], ref["blocks.1.mlp.fc2.weight"])
    assert torch.equal(enc["pos_embed"], ref["pos_embed"])
    missing, unexpected = load_init(model, path)
    assert missing == [] and unexpected == []  # head dropped, everything else used


def test_load_init_sincos_ignores_learned_table(tmp_path):
    vit = _tiny_timm_rgb()
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)  # DeiT/MAE-style wrapper
    model = tiny_mae()
    missing, unexpected = load_init(model, path)
    assert missing == [] and unexpected == []
    assert torch.equal(model.encoder.state_dict()["norm.weight"], vit.state_dict()["norm.weight"])


def test_load_init_resamples_other_grid(tmp_path):
    torch.manual_seed(1)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=384, in_chans=3, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "vit384.pth"
    torch.save(vit.state_dict(), path)
    model = tiny_mae(pos_embed="learned", init=str(path))
    assert model.encoder.pos_embed.shape == (1, 1 + 14 * 14, 32)
    assert torch.equal(model.encoder.pos_embed[0, 0], vit.pos_embed[0, 0])  # CLS row kept


def test_load_init_mae_checkpoint_roundtrip(tmp_path):
    source = tiny_mae(pos_embed="learned")
    path = tmp_path / "mae.pth"
    torch.save({"model": source.state_dict(), "step": 3}, path)
    target = build_mae(dataclasses.replace(TINY, pos_embed="learned"))
    load_init(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_init_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth.*not found"):
        tiny_mae(init=str(missing))


def test_param_groups():
    model = tiny_mae(pos_embed="learned")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    for name in (
        "encoder.pos_embed",
        "encoder.cls_token",
        "mask_token",
        "decoder_norm.weight",
        "encoder.blocks.0.attn.qkv.bias",
    ):
        assert id(model.get_parameter(name)) in ids, name
    assert id(model.get_parameter("encoder.blocks.0.attn.qkv.weight")) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_config_checks_and_overrides():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="timm model"):
        MAEConfig(encoder="not_a_vit")
    with pytest.raises(ValueError, match="pos_embed"):
        MAEConfig(pos_embed="rope")
    cfg = load_config(MAEConfig, overrides=["embed_dim=32", "depth=2", "num_heads=2", "init=/w/vit.pth"])
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.init) == (32, 2, 2, "/w/vit.pth")


def test_training_steps_reduce_loss():
    model = tiny_mae()
    imgs = images(4, 32, 48)
    noise = torch.rand(4, 6)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(imgs, noise=noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
