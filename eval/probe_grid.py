"""The batched engine of ``radstream.eval.probe``: every linear head of the grid stepped at once.

A head is ``BatchNorm1d(affine=False) + Linear`` trained with SGD + momentum. A *data group* is one
(label fraction, seed): its training rows and its batch order. Per aggregation all heads are stacked into
``weight [S, D, L, C]`` (S data groups, L learning rates, C classes): one step gathers every group's next batch
``[S, B, D]``, normalises each group with its own batch statistics and runs one batched matmul for all
learning rates. Each group counts its own epochs (its subset's size); when a group's epoch ends, its heads are
scored on validation, each keeps its best weights and stops on its own (early stopping).

Exactly what ``torch.nn.BatchNorm1d`` + ``nn.Linear`` + ``torch.optim.SGD`` would do head by head (the tests
check it), only batched. The BatchNorm's evaluation statistics are by default the exact mean and variance of
the group's whole training subset (the features are frozen, so they never change): a running average with
momentum 0.1 is far from them after the few steps of a small fraction (at 1% an epoch can be one step).
``bn_momentum`` set to a number gives torch's running average instead.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radstream.core.progress import progress as progress_bar
from radstream.eval.probe_config import ProbeConfig, ProbeData
from radstream.train.optim import lr_at


@dataclass(frozen=True)
class Group:
    """A data group: the training rows of one label fraction, batched in the order of one seed."""

    fraction: float
    seed: int
    rows: np.ndarray
    """int64, indices into the training split."""

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch: ceil(n / batch_size), fewer when a batch would hold a single row."""
        n = len(self.rows)
        return max(1, min(math.ceil(n / batch_size), n // 2))


def epoch_batches(group: Group, batch_size: int, epoch: int) -> list[np.ndarray]:
    """The batches (training-split row indices) of one epoch: a seeded permutation cut into near-equal parts.

    Near-equal parts instead of a short last batch: BatchNorm needs more than one sample per batch. The
    data groups of one fraction have the same part sizes at every step, so they step together unpadded.
    """
    rng = np.random.default_rng([group.seed, round(group.fraction * 1_000_000), epoch])
    order = group.rows[rng.permutation(len(group.rows))]
    return np.array_split(order, group.steps_per_epoch(batch_size))


def init_seed(seed: int, aggregation: str, fraction: float) -> int:
    """Seed of a head's initial weights: one per (seed, aggregation, fraction), shared by its learning rates."""
    words = [seed, zlib.crc32(aggregation.encode()), round(fraction * 1_000_000)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def head_init(dim: int, num_classes: int, seed: int) -> torch.Tensor:
    """Initial Linear weight [C, D] (MAE's head init: truncated normal, std 0.01); the bias starts at 0."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.init.trunc_normal_(torch.empty(num_classes, dim), std=0.01, generator=gen)


Selector = slice | torch.Tensor
"""Which data groups a step touches: a slice (a contiguous run: views, updated in place) or an index tensor."""


def selector(groups: Sequence[int], device: torch.device) -> Selector:
    """A slice when ``groups`` (ascending) is a contiguous run, the usual case; else an index tensor."""
    if list(groups) == list(range(groups[0], groups[-1] + 1)):
        return slice(groups[0], groups[-1] + 1)
    return torch.tensor(list(groups), device=device)


def _write_back(sel: Selector, *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Store updated copies back into their full tensors; a slice gave views, already updated in place."""
    if isinstance(sel, slice):
        return
    for full, part in pairs:
        full[sel] = part


class HeadGrid:
    """All heads of one aggregation: S data groups × L learning rates, each BatchNorm1d(affine=False) + Linear.

    Tensors: ``weight [S, D, L, C]`` (head (s, l) is ``weight[s, :, l].T`` as an ``nn.Linear`` weight),
    ``bias [S, L, C]``, BatchNorm running statistics ``[S, D]`` (per data group: heads that see the same
    batches have the same statistics), early-stopping state ``[S, L]``, and per head its best weights with
    the BatchNorm folded in (``best_weight [S, D, L, C]``, ``best_bias [S, L, C]``): logits = x @ W + b.
    """

    def __init__(
        self,
        aggregation: str,
        dim: int,
        num_classes: int,
        groups: Sequence[Group],
        lrs: Sequence[float],
        cfg: ProbeConfig,
        device: torch.device,
    ) -> None:
        self.aggregation, self.cfg = aggregation, cfg
        s, n_lr, c = len(groups), len(lrs), num_classes
        inits = [head_init(dim, c, init_seed(g.seed, aggregation, g.fraction)) for g in groups]
        self.weight = (
            torch.stack([w.T[:, None, :].expand(dim, n_lr, c) for w in inits]).contiguous().to(device)
        )
        self.bias = torch.zeros(s, n_lr, c, device=device)
        self.momentum_weight = torch.zeros_like(self.weight)
        self.momentum_bias = torch.zeros_like(self.bias)
        self.running_mean = torch.zeros(s, dim, device=device)
        self.running_var = torch.ones(s, dim, device=device)
        self.lrs = torch.tensor(list(lrs), dtype=torch.float32, device=device)
        self.best_acc = torch.full((s, n_lr), -1.0, dtype=torch.float64, device=device)
        self.best_epoch = torch.full((s, n_lr), -1, dtype=torch.long, device=device)
        self.bad_epochs = torch.zeros(s, n_lr, dtype=torch.long, device=device)
        self.epochs = torch.zeros(s, n_lr, dtype=torch.long, device=device)
        self.stopped = torch.zeros(s, n_lr, dtype=torch.bool, device=device)
        self.best_weight = torch.zeros_like(self.weight)
        self.best_bias = torch.zeros_like(self.bias)
        self._buffers = [torch.empty(0), torch.empty(0)]

    def _scratch(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of ``shape``: fresh large tensors every step would cost page faults, not math."""
        numel = math.prod(shape)
        if self._buffers[slot].numel() < numel:
            self._buffers[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self._buffers[slot][:numel].view(shape)

    def _batch_stats(self, x: torch.Tensor, sel: Selector) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's batch mean and biased variance [G, D] (what BatchNorm normalises with), and the
        update of its running statistics (whose variance is unbiased, as BatchNorm's)."""
        n, mom = x.shape[1], self.cfg.bn_momentum
        mean = x.sum(dim=1).div_(n)
        centred = torch.sub(x, mean[:, None], out=self._scratch(1, x.shape, x))
        var = centred.square_().sum(dim=1).div_(n)
        if mom is None:  # exact statistics, set once by ``set_exact_statistics``
            return mean, var
        running_mean, running_var = self.running_mean[sel], self.running_var[sel]
        running_mean.mul_(1 - mom).add_(mean, alpha=mom)
        running_var.mul_(1 - mom).add_(var, alpha=mom * n / max(n - 1, 1))
        _write_back(sel, (self.running_mean, running_mean), (self.running_var, running_var))
        return mean, var

    def set_exact_statistics(
        self, features: torch.Tensor, groups: Sequence[Group], chunk: int = 4096
    ) -> None:
        """Each group's BatchNorm evaluation statistics: mean and unbiased variance of ``features [N, D]``
        over its training rows (float64 sums, ``chunk`` rows at a time)."""
        for s, group in enumerate(groups):
            rows = torch.from_numpy(group.rows).to(features.device)
            total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
            squares = torch.zeros_like(total)
            for lo in range(0, len(rows), chunk):
                x = features[rows[lo : lo + chunk]].double()
                total += x.sum(dim=0)
                squares += x.square().sum(dim=0)
            n = len(rows)
            mean = total / n
            self.running_mean[s] = mean.to(self.running_mean.dtype)
            self.running_var[s] = (
                ((squares - n * mean.square()) / max(n - 1, 1)).clamp_min(0).to(self.running_var.dtype)
            )

    def train_step(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        idx: torch.Tensor,
        sel: Selector,
        lr_factor: torch.Tensor,
    ) -> torch.Tensor:
        """One SGD step of the heads of the groups ``sel``, each on its own batch.

        The BatchNorm is folded into the weights (``xn @ W = x @ (s*W) - (mean*s) @ W`` with
        ``s = 1/sqrt(var + eps)``), so the normalised batch is never materialised: fewer passes over the
        batch, which for the flattened aggregation is the biggest tensor of the step.

        Args:
            features: [N, D] training embeddings of this aggregation. labels: [N].
            idx: [G, B] the rows of each group's batch (one batch size for all of them).
            sel: the groups (``selector``). lr_factor: [G] schedule factor of each group's current step.

        Returns:
            [G, L] mean cross-entropy of each head before the step.
        """
        g, b = idx.shape
        lrs = self._active_window(sel)  # late in training only a few learning rates still run: skip the rest
        if lrs.stop == lrs.start:  # every head of these groups has stopped (other aggregations still train)
            return torch.zeros(g, 0, device=features.device)
        d = features.shape[1]
        x = torch.index_select(features, 0, idx.reshape(-1), out=self._scratch(0, (g * b, d), features))
        x, y = x.view(g, b, d), labels[idx]
        c = self.bias.shape[2]
        mean, var = self._batch_stats(x, sel)
        scale = torch.rsqrt(var + self.cfg.bn_eps)  # [G, D]
        weight, bias = self.weight[sel], self.bias[sel]
        n_lr = lrs.stop - lrs.start
        w = weight[:, :, lrs].reshape(g, d, n_lr * c)  # a view when every rate is active, else a small copy
        shift = torch.bmm((mean * scale)[:, None], w)  # [G, 1, L*C]
        logits = torch.baddbmm(bias[:, lrs].reshape(g, 1, n_lr * c) - shift, x, w * scale[..., None])
        logp = logits.view(g, b, n_lr, c).log_softmax(dim=-1)
        target = y[:, :, None, None].expand(g, b, n_lr, 1)
        loss = -logp.gather(-1, target).squeeze(-1).mean(dim=1)  # [G, L]
        # gradient of each head's mean cross-entropy w.r.t. its logits: (softmax - onehot) / B
        grad = logp.exp_()
        grad.scatter_add_(-1, target, torch.full_like(target, -1, dtype=grad.dtype))
        grad = grad.div_(b).view(g, b, n_lr * c)
        grad_b = grad.sum(dim=1)  # [G, L*C]
        grad_w = (
            torch.bmm(x.transpose(1, 2), grad).sub_(mean[..., None] * grad_b[:, None]).mul_(scale[..., None])
        )
        lr = self.lrs[lrs][None] * lr_factor[:, None] * (~self.stopped[sel][:, lrs])  # stopped heads stay put
        self._sgd(sel, lrs, weight, bias, grad_w.view(g, d, n_lr, c), grad_b.view(g, n_lr, c), lr)
        return loss

    def _active_window(self, sel: Selector) -> slice:
        """The smallest run of learning rates that holds every head of ``sel`` still training (maybe empty)."""
        running = (~self.stopped[sel]).any(dim=0).nonzero().flatten().tolist()
        return slice(running[0], running[-1] + 1) if running else slice(0, 0)

    def _sgd(
        self,
        sel: Selector,
        lrs: slice,
        weight: torch.Tensor,
        bias: torch.Tensor,
        grad_w: torch.Tensor,
        grad_b: torch.Tensor,
        lr: torch.Tensor,
    ) -> None:
        """torch.optim.SGD's update (momentum, no dampening, L2 decay) with a learning rate per head, in place,
        for the learning rates ``lrs`` of the groups ``sel`` (``weight``, ``bias``: those groups' heads)."""
        cfg = self.cfg
        full_w, full_b = self.momentum_weight[sel], self.momentum_bias[sel]
        buf_w, buf_b = full_w[:, :, lrs], full_b[:, lrs]
        w, b = weight[:, :, lrs], bias[:, lrs]
        buf_w.mul_(cfg.momentum).add_(grad_w)
        buf_b.mul_(cfg.momentum).add_(grad_b)
        if cfg.weight_decay:
            buf_w.add_(w, alpha=cfg.weight_decay)
            buf_b.add_(b, alpha=cfg.weight_decay)
        w.addcmul_(buf_w, lr[:, None, :, None], value=-1.0)
        b.addcmul_(buf_b, lr[..., None], value=-1.0)
        _write_back(
            sel,
            (self.momentum_weight, full_w),
            (self.momentum_bias, full_b),
            (self.weight, weight),
            (self.bias, bias),
        )

    def folded(self, groups: Selector) -> tuple[torch.Tensor, torch.Tensor]:
        """The current heads of ``groups`` in eval mode as one linear map: ([G, D, L, C], [G, L, C])."""
        scale = torch.rsqrt(self.running_var[groups] + self.cfg.bn_eps)  # [G, D]
        w = self.weight[groups]
        folded_w = w * scale[:, :, None, None]
        folded_b = self.bias[groups] - torch.einsum("gd,gdlc->glc", self.running_mean[groups] * scale, w)
        return folded_w, folded_b

    def end_epoch(
        self,
        groups: Selector,
        acc: torch.Tensor,
        epochs: torch.Tensor,
        least: torch.Tensor | None = None,
        cap: torch.Tensor | None = None,
    ) -> None:
        """Record the validation accuracy ``acc [G, L]`` of the epoch that just ended for ``groups``.

        ``epochs [G]`` is each group's 0-based epoch (groups of different sizes end epochs at different steps);
        ``least [G]`` the epochs before early stopping may stop its heads (``min_steps``; default 0), ``cap
        [G]`` its last epoch count (default ``max_epochs``): see ``group_epochs``.
        """
        least = torch.zeros_like(epochs) if least is None else least
        cap = torch.full_like(epochs, self.cfg.max_epochs) if cap is None else cap
        active = ~self.stopped[groups]
        improved = active & (acc > self.best_acc[groups])
        folded_w, folded_b = self.folded(groups)
        self.best_weight[groups] = torch.where(improved[:, None, :, None], folded_w, self.best_weight[groups])
        self.best_bias[groups] = torch.where(improved[..., None], folded_b, self.best_bias[groups])
        self.best_acc[groups] = torch.where(improved, acc, self.best_acc[groups])
        self.best_epoch[groups] = torch.where(improved, epochs[:, None], self.best_epoch[groups])
        bad = torch.where(improved, 0, self.bad_epochs[groups] + active.long())
        self.bad_epochs[groups] = bad
        self.epochs[groups] += active.long()
        out_of_patience = (bad >= self.cfg.patience) if self.cfg.patience > 0 else torch.zeros_like(active)
        out_of_patience = out_of_patience & (epochs + 1 >= least)[:, None]  # never before min_steps
        last = (epochs + 1 >= cap)[:, None]
        self.stopped[groups] = self.stopped[groups] | out_of_patience | last


def predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
    """Class predictions [G, L, N] of folded heads ``weight [G, D, L, C]``, ``bias [G, L, C]`` for x [N, D]."""
    g, d, n_lr, c = weight.shape
    flat_w = weight.permute(1, 0, 2, 3).reshape(d, g * n_lr * c)
    preds = []
    for lo in range(0, x.shape[0], chunk):
        logits = (x[lo : lo + chunk] @ flat_w).view(-1, g, n_lr, c) + bias[None]
        preds.append(logits.argmax(dim=-1).permute(1, 2, 0))
    return torch.cat(preds, dim=-1)


def _lr_factor(cfg: ProbeConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant":
        return 1.0
    return lr_at(step, peak_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=total)


def _by_batch_size(groups: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """The groups split by their current batch size (ascending group order in each), so each part stacks."""
    buckets: dict[int, list[int]] = {}
    for s, size in zip(groups, sizes, strict=True):
        buckets.setdefault(size, []).append(s)
    return list(buckets.values())


def group_epochs(cfg: ProbeConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs before early stopping may stop a group's heads, the group's epoch cap): ``min_steps`` steps
    at least, as every trained model of a study (``run.min_steps``), whatever the fraction's epoch length
    (at 1% an epoch can be one step); the cap is ``max_epochs`` raised to cover them."""
    least = -(-cfg.min_steps // steps_per_epoch)
    return least, max(cfg.max_epochs, least)


def _validate(
    grids: dict[str, HeadGrid], data: ProbeData, ended: Sequence[int], epochs: Sequence[int], cfg: ProbeConfig,
    spans: Sequence[tuple[int, int]],
) -> None:  # fmt: skip
    """Score the current heads of the ``ended`` groups on val and update their early stopping."""
    y, device = data.labels["val"], data.labels["val"].device
    sel = selector(ended, device)
    least, cap = [spans[s][0] for s in ended], [spans[s][1] for s in ended]
    tensors = [torch.tensor(v, device=device) for v in (list(epochs), least, cap)]
    for agg, grid in grids.items():
        preds = predict(data.features["val"][agg], *grid.folded(sel), cfg.eval_batch_size)
        grid.end_epoch(sel, (preds == y).double().mean(dim=-1), *tensors)


def train_grids(
    grids: dict[str, HeadGrid],
    data: ProbeData,
    groups: Sequence[Group],
    cfg: ProbeConfig,
    progress: bool = True,
) -> int:
    """Train every head of ``grids`` in one pass until each has stopped; returns the steps taken.

    Every step advances each unfinished data group by one batch. A group is finished when all its heads
    (every aggregation and learning rate) have stopped, early or after ``max_epochs``.
    """
    device = data.labels["train"].device
    b = cfg.batch_size
    if cfg.bn_momentum is None:
        for agg, grid in grids.items():
            grid.set_exact_statistics(data.features["train"][agg], groups)
    spe = [g.steps_per_epoch(b) for g in groups]
    spans = [group_epochs(cfg, n) for n in spe]
    epoch, pos, done = [0] * len(groups), [0] * len(groups), [False] * len(groups)
    plans = [epoch_batches(g, b, 0) for g in groups]
    bar = progress_bar(
        total=max(cap * n for (_, cap), n in zip(spans, spe, strict=True)), desc="probe grid", unit="step",
        main_process=progress,
    )  # fmt: skip
    steps = 0
    while not all(done):
        act = [s for s in range(len(groups)) if not done[s]]
        for bucket in _by_batch_size(act, [len(plans[s][pos[s]]) for s in act]):
            idx = torch.from_numpy(np.stack([plans[s][pos[s]] for s in bucket])).to(device)
            factor = [_lr_factor(cfg, epoch[s] * spe[s] + pos[s], spans[s][1] * spe[s]) for s in bucket]
            sel, factor_t = selector(bucket, device), torch.tensor(factor, device=device)
            for agg, grid in grids.items():
                grid.train_step(data.features["train"][agg], data.labels["train"], idx, sel, factor_t)
        ended = []
        for s in act:
            pos[s] += 1
            if pos[s] == spe[s]:
                ended.append(s)
        if ended:
            _validate(grids, data, ended, [epoch[s] for s in ended], cfg, spans)
            for s in ended:
                epoch[s], pos[s] = epoch[s] + 1, 0
                done[s] = all(bool(grid.stopped[s].all()) for grid in grids.values())
                if not done[s]:
                    plans[s] = epoch_batches(groups[s], b, epoch[s])
        steps += 1
        bar.update(1)
    bar.close()
    return steps
