"""Per-image masking, padding, losses and metrics of the MAE: tiny encoder, CPU, seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from radstream.train.mae import build_mae
from radstream.train.mae_step import train_step
from radstream.train.masking import (
    attention_mask,
    background_patches,
    patchify,
    random_masking,
    visible_counts,
)
from tests.train.tiny_mae import TINY, tiny_mae


def tiny(**changes) -> torch.nn.Module:
    return tiny_mae(**changes).eval()


def with_foreground(n_patches: int, seed: int) -> torch.Tensor:
    """A [1, 1, 128, 128] image (8x8 = 64 patches) whose first ``n_patches`` patches (row-major) are bright."""
    img = torch.zeros(1, 1, 128, 128)
    noise = 0.2 + 0.8 * torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(seed))
    for i in range(n_patches):
        r, c = divmod(i, 8)
        img[..., r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = noise[
            ..., r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16
        ]
    return img


def test_every_image_keeps_its_own_ratio():
    imgs = torch.cat([with_foreground(2, 0), with_foreground(20, 1), with_foreground(64, 2)])
    bg = background_patches(imgs, 16, 0.0)
    assert (~bg).sum(dim=1).tolist() == [2, 20, 64]
    keep_bias = torch.zeros(3, 64).masked_fill(bg, float("inf"))
    visible, hidden, _ = random_masking(torch.randn(3, 64, 4), 0.75, keep_bias=keep_bias)
    # int(F * (1 - r)) of each image's foreground, at least one
    assert visible_counts(hidden).tolist() == [1, 5, 16]
    assert visible.shape == (3, 16, 4)  # padded to keep_width(64, 0.75), whatever the batch's widest
    narrow, _, _ = random_masking(torch.randn(2, 64, 4), 0.75, keep_bias=keep_bias[:2])
    assert narrow.shape == (2, 16, 4)  # widest row 5: still the grid's static width
    assert ((hidden == 0) & bg).sum() == 0  # every visible patch is foreground
    out = tiny(border_aware=True)(imgs, noise=torch.rand(3, 64))
    assert out.mask.sum(dim=1).tolist() == [1, 15, 48]  # the rest of the foreground is scored
    assert out.stats["encoder_tokens"].item() == pytest.approx((2 + 6 + 17) / 3)


def test_ratio_other_than_three_quarters_matches_python_int():
    keep_bias = torch.zeros(4, 50)
    keep_bias[0, 7:] = keep_bias[1, 13:] = keep_bias[2, 31:] = float("inf")
    _, hidden, _ = random_masking(torch.randn(4, 50, 2), 0.6, keep_bias=keep_bias)
    assert visible_counts(hidden).tolist() == [max(1, int(f * (1 - 0.6))) for f in (7, 13, 31, 50)]


@pytest.mark.parametrize("other_foreground", [2, 0])
def test_an_image_does_not_depend_on_its_batch_neighbour(other_foreground):
    model = tiny(border_aware=True)
    full, sparse = with_foreground(64, 3), with_foreground(other_foreground, 4)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(5))
    both = torch.cat([full, sparse])
    bg = background_patches(both, 16, 0.0)
    keep_bias = torch.zeros(2, 64).masked_fill(bg, float("inf"))
    with torch.no_grad():
        latent, hidden, _ = model.forward_encoder(both, 0.75, keep_bias, noise)
        for i, img in enumerate((full, sparse)):
            alone, hidden_alone, _ = model.forward_encoder(img, 0.75, keep_bias[i : i + 1], noise[i : i + 1])
            width = alone.shape[1]  # this image's own tokens; the rest of its batched row is padding
            assert torch.allclose(latent[i : i + 1, :width], alone, atol=1e-5), i
            assert torch.equal(hidden[i : i + 1], hidden_alone)
        batched = model(both, noise=noise, valid=torch.tensor([True, False]))
        alone = model(full, noise=noise[:1])
        assert batched.loss.item() == pytest.approx(alone.loss.item(), rel=1e-5)
        assert torch.allclose(batched.pred[:1], alone.pred, atol=1e-5)


def test_without_background_border_aware_is_the_standard_mae():
    imgs = torch.rand(3, 1, 64, 96, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    noise = torch.rand(3, 24)
    plain, aware = tiny(), tiny(border_aware=True)
    a, b = plain(imgs, noise=noise), aware(imgs, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred) and torch.equal(a.mask, b.mask)
    assert attention_mask(torch.tensor([6, 6, 6]), 6).all()  # no padding: the mask lets every slot attend
    # the decoder's unshuffle is models_mae.py's: visible tokens, then mask tokens, gathered by ids_restore
    latent, hidden, ids_restore = plain.forward_encoder(imgs, 0.75, None, noise)
    x = plain.decoder_embed(latent)
    tokens = torch.cat([x[:, 1:], plain.mask_token.expand(3, 24 - 6, -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    tokens = torch.cat([x[:, :1], tokens + plain.decoder_pos((4, 6), x.device)], dim=1)
    reference = plain.decoder_pred(plain.decoder_norm(plain.decoder_blocks(tokens)))[:, 1:]
    assert torch.allclose(plain.forward_decoder(latent, ids_restore, (4, 6)), reference, atol=1e-6)


def test_padding_repeats_are_left_out_of_the_loss():
    model = tiny()
    imgs = torch.rand(3, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(3, 6)
    out = model(imgs, noise=noise, valid=torch.tensor([True, True, False]))
    first_two = model(imgs[:2], noise=noise[:2])
    assert out.loss.item() == pytest.approx(first_two.loss.item(), rel=1e-6)
    assert model(imgs, noise=noise).loss.item() != pytest.approx(out.loss.item(), rel=1e-6)


def test_train_step_passes_valid_to_the_loss():
    def one_step(batch: dict) -> torch.Tensor:
        model = tiny().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(Accelerator(cpu=True), model, optimizer, [batch], seed=0, step=0)
        return model.decoder_pred.weight.detach().clone()

    imgs = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    repeat = torch.cat([imgs[:1], imgs[:1]])
    only = one_step({"image": imgs[:1], "valid": torch.tensor([True]), "key": ["a"]})
    padded = one_step({"image": repeat, "valid": torch.tensor([True, False]), "key": ["a", "a"]})
    counted = one_step({"image": repeat, "valid": torch.tensor([True, True]), "key": ["a", "a"]})
    # the repeat (valid False) changes nothing; counted, its own mask (other noise row) would
    assert torch.allclose(padded, only, atol=1e-6)
    assert not torch.allclose(counted, only, atol=1e-6)


def test_eval_metrics_name_what_they_measure():
    model = tiny(border_aware=True)
    imgs = torch.cat([with_foreground(20, 0), with_foreground(64, 1), with_foreground(64, 2)])
    out = model(imgs, noise=torch.rand(3, 64))
    valid = torch.tensor([True, True, False])
    means = model.eval_means(model.eval_sums(imgs, out, valid))
    err = (out.pred - patchify(imgs, 16)).pow(2).mean(-1)[:2]
    hidden, scored = out.hidden[:2].bool(), out.mask[:2].bool()
    assert hidden.sum() > scored.sum()  # hidden background of image 0 counts in the study's MSE only
    assert means["mse_masked"] == pytest.approx(err[hidden].mean().item(), rel=1e-5)
    assert means["mse_foreground"] == pytest.approx(err[scored].mean().item(), rel=1e-5)
    assert means["loss"] == pytest.approx(err[scored].mean().item(), rel=1e-5)
    assert means["images"] == 2


def test_init_follows_the_reference():
    model = build_mae(dataclasses.replace(TINY, embed_dim=64, num_heads=4, decoder_dim=64, decoder_heads=4))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert module.weight.abs().max() <= bound, name
            assert module.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.15), name
            assert module.bias is None or (module.bias == 0).all(), name
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all(), name
    conv = model.encoder.patch_embed.proj.weight  # a Linear over the flattened 16x16 kernel
    bound = (6 / (conv[0].numel() + conv.shape[0])) ** 0.5
    assert conv.abs().max() <= bound and conv.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
    for token in (model.encoder.cls_token, model.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.35)


class ListLoader(list):
    """Batches as a loader: ``study_mse`` resets the epoch and iterates."""

    def set_epoch(self, epoch: int) -> None:
        pass


def test_the_study_mse_is_one_uniform_mask_for_every_model():
    """The study MSE hides a uniform random 75% of ALL patches by image key, whatever the model's own masking
    (border-aware or not) and however the images are batched; padding repeats count nowhere."""
    from radstream.train.mae_step import STUDY_MASK_SEED, key_noise, objective_name, study_mse

    imgs = torch.cat([with_foreground(20, 0), with_foreground(64, 1), with_foreground(10, 2)])
    keys = ["a", "b", "c"]
    batch = {"image": imgs, "valid": torch.tensor([True, True, True]), "key": keys}
    split = [{"image": imgs[:1], "valid": torch.tensor([True]), "key": keys[:1]},
             {"image": torch.cat([imgs[1:], imgs[:1]]), "valid": torch.tensor([True, True, False]),
              "key": keys[1:] + keys[:1]}]  # fmt: skip
    accelerator = Accelerator(cpu=True)
    border, plain = tiny(border_aware=True), tiny(border_aware=False)
    assert objective_name(border) == "pixel MSE, masked foreground patches"
    mse = study_mse(accelerator, border, ListLoader([batch]))
    assert mse == pytest.approx(study_mse(accelerator, plain, ListLoader([batch])), rel=1e-6)  # same weights
    assert mse == pytest.approx(study_mse(accelerator, border, ListLoader(split)), rel=1e-6)
    noise = key_noise(STUDY_MASK_SEED, keys, 64)
    hidden = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, noise.argsort(dim=1)[:, 16:], True)
    out = plain(imgs, mask_ratio=0.75, noise=noise)
    err = (out.pred - patchify(imgs, 16)).pow(2).mean(-1)
    assert mse == pytest.approx(err[hidden].mean().item(), rel=1e-5)
    assert study_mse(accelerator, tiny(norm_pix_loss=True), ListLoader([batch])) is None
