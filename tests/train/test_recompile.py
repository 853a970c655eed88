"""torch.compile over bins: one static graph per bin shape, no graph break, for the MAE step, the supervised ViT,
the fine-tuning classifier and the probe's embedding pass.

Graphs are counted with a recording dynamo backend (dynamo's own tracing, no code generation: seconds on the
CPU) on an epoch of the debug recipe's loader over the tiny shard dataset's bins; the inductor variant (real
kernels, slow to compile on two cores) is marked long.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from accelerate import Accelerator
from torch._dynamo.utils import counters

from radstream.core.config import load_config
from radstream.eval.embed import batch_features
from radstream.shards.images import unit_float
from radstream.shards.loader import build_loader
from radstream.train.classifier import ClassifierConfig, build_classifier
from radstream.train.config import PretrainConfig, RunConfig
from radstream.train.finetune import EncoderClassifier
from radstream.train.mae_step import train_step
from radstream.train.optim import build_optimizer, param_groups
from radstream.train.steps import allow_graphs, dynamo_plugin
from radstream.train.supervised import SupervisedOptimConfig
from radstream.train.supervised import train_step as supervised_step
from tests.accelerate_state import reset_accelerate
from tests.train.tiny_mae import tiny_mae

RECIPES = Path(__file__).resolve().parents[2] / "configs"


class Recorder:
    """A dynamo backend that keeps every graph's input shapes and runs the graph as traced."""

    def __init__(self) -> None:
        self.graphs: list[list[tuple]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append([tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in example_inputs])
        return gm.forward

    def static(self) -> bool:
        """Whether every input of every graph had only concrete sizes (no SymInt inputs or dimensions)."""
        return all(
            isinstance(x, tuple) and all(isinstance(d, int) for d in x) for g in self.graphs for x in g
        )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs; accelerate's process-wide state is reset as in its own tests."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    reset_accelerate()


def debug_loader(shards: Path, split: str = "train", train: bool = True):
    """The debug recipe's loader (torch backend, batch 8, augmentation on for training)."""
    cfg = load_config(PretrainConfig, RECIPES / "pretrain" / "debug.yaml", [f"shards={shards}", "run_dir=."])
    return build_loader(cfg.loader, shards, split, train=train)


def two_visits(loader):
    """The epoch's batches up to the one where every bin has come twice (a second batch of a bin must not
    recompile; its images keep other numbers of patches), or to the epoch's end."""
    seen: dict[str, int] = {}
    bins = {p.bin for p in loader.epoch_plans(loader.epoch)}
    for batch in loader:
        seen[batch["bin"]] = seen.get(batch["bin"], 0) + 1
        yield batch
        if len(seen) == len(bins) and min(seen.values()) >= 2:
            return


def compiled(fn, recorder: Recorder):
    """``fn`` compiled as a run compiles (``dynamo_plugin``: static shapes), on the recording backend."""
    plugin = dynamo_plugin(RunConfig(compile=True))
    assert plugin.dynamic is False
    return torch.compile(fn, backend=recorder, dynamic=plugin.dynamic)


def no_graph_break() -> bool:
    return not counters["graph_break"]


def test_compile_options_are_static_and_checked() -> None:
    assert dynamo_plugin(RunConfig()) is None  # eager unless run.compile
    plugin = dynamo_plugin(RunConfig(compile=True, compile_backend="aot_eager"))
    assert (plugin.backend.value.lower(), plugin.dynamic) == ("aot_eager", False)
    with pytest.raises(ValueError, match="run.compile_backend must be one of"):
        RunConfig(compile_backend="fast")


def test_mae_step_recompile_one_static_graph_per_bin(tiny_shards: Path) -> None:
    loader = debug_loader(tiny_shards)
    bins = {p.bin for p in loader.epoch_plans(0)}
    assert len(bins) >= 2  # the test is about several shapes
    allow_graphs(2 * len(bins))
    model = tiny_mae(border_aware=True, border_threshold=0.02)
    recorder = Recorder()
    run = compiled(model, recorder)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(param_groups(model, 0.05), (0.9, 0.95), 1e-3)
    steps = 0
    for step, batch in enumerate(two_visits(loader)):  # bins interleaved, foregrounds differ per image
        stats = train_step(accelerator, run, optimizer, [batch], seed=0, step=step)
        assert torch.isfinite(stats.loss)
        steps += 1
    assert steps >= 2 * len(bins)
    assert len(recorder.graphs) == len(bins), recorder.graphs  # one per bin, none for a new keep count
    assert recorder.static() and no_graph_break()  # a break would also show as a second graph per bin


@pytest.mark.long
def test_pretrain_epoch_recompile_graphs_bounded_by_bins(tiny_shards: Path, tmp_path: Path) -> None:
    """The trainer's own compile path (``run.compile``): an epoch with validation and test compiles at most
    one graph per bin for training and one per bin for evaluation, without a graph break."""
    import radstream.train.pretrain as pretrain

    cfg = load_config(
        PretrainConfig,
        RECIPES / "pretrain" / "debug.yaml",
        [f"shards={tiny_shards}", f"run_dir={tmp_path}", "run.epochs=1", "run.compile=true",
         "run.compile_backend=eager", "run.grid_images=0", "run.tensorboard=false"],
    )  # fmt: skip
    assert pretrain.run(cfg) == 0
    bins = {
        p.bin for split in ("train", "val", "test") for p in debug_loader(tiny_shards, split).epoch_plans(0)
    }
    graphs = counters["stats"]["unique_graphs"]
    assert len(bins) <= graphs <= 2 * len(bins), graphs
    assert no_graph_break(), dict(counters["graph_break"])


def classifier(name: str) -> torch.nn.Module:
    """The supervised debug ViT, or the fine-tuning model (the tiny MAE's encoder + a head), 8 classes."""
    torch.manual_seed(0)
    if name == "supervised-vit":
        return build_classifier(
            ClassifierConfig(kind="vit", arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2), 8
        )
    return EncoderClassifier(tiny_mae(), 8, "cls")


@pytest.mark.parametrize("name", ["supervised-vit", "finetune-head"])
def test_classifier_recompile_once_per_bin(tiny_shards: Path, name: str) -> None:
    loader = debug_loader(tiny_shards)
    bins = {p.bin for p in loader.epoch_plans(0)}
    allow_graphs(2 * len(bins))
    model = classifier(name)
    recorder = Recorder()
    run = compiled(model, recorder)
    optimizer = build_optimizer(param_groups(model, 0.05), (0.9, 0.999), 1e-3)
    accelerator = Accelerator(cpu=True)
    for step, batch in enumerate(two_visits(loader)):
        stats = supervised_step(
            accelerator, run, optimizer, [batch], step=step, optim=SupervisedOptimConfig()
        )
        assert torch.isfinite(stats.loss)
    assert len(recorder.graphs) == len(bins), recorder.graphs
    assert recorder.static() and no_graph_break()


def test_probe_embedding_pass_recompile_once_per_bin(tiny_shards: Path) -> None:
    loader = debug_loader(tiny_shards, "val", train=False)
    bins = {p.bin for p in loader.epoch_plans(0)}
    assert any(not p.valid.all() for p in loader.epoch_plans(0))  # padding repeats: the shape must not care
    model = tiny_mae().eval()
    recorder = Recorder()
    eager = model.forward_features
    model.forward_features = compiled(eager, recorder)
    with torch.no_grad():
        for batch in loader:
            feats = batch_features(model, batch, (2, 2))
            want = int(batch["valid"].sum())
            assert all(len(v) == want for v in feats.values())
            imgs = unit_float(batch["image"])[batch["valid"].bool()]
            assert torch.allclose(feats["cls"], eager(imgs)[:, 0], atol=1e-5)
    assert len(recorder.graphs) == len(bins), recorder.graphs
    assert recorder.static() and no_graph_break()


@pytest.mark.long
def test_mae_step_recompile_under_inductor() -> None:
    """Inductor's real kernels: two bin shapes with foregrounds varying per image, three steps each, compile
    two graphs with no break (dynamo's counters and ``torch._dynamo.explain``), and the compiled losses match
    eager."""
    model = tiny_mae(border_aware=True, border_threshold=0.02)
    run = torch.compile(model, backend="inductor", dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        h, w = ((32, 48), (48, 32))[step % 2]
        imgs = torch.rand(4, 1, h, w, generator=gen) * 0.9 + 0.1
        imgs[: step % 4, :, :16] = 0.0  # a different number of black patch rows per step
        noise = torch.rand(4, h * w // 256, generator=gen)
        got = run(imgs, noise=noise).loss
        got.backward()
        assert torch.allclose(got, model(imgs, noise=noise).loss, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2 and no_graph_break(), dict(counters["graph_break"])
    # dynamo's own account of one step: a single graph, no break
    explained = torch._dynamo.explain(model)(imgs, noise=noise)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mae_step_recompile_on_cuda_bf16_from_stored_integers() -> None:
    """The GPU path of a step: uint8 images on the device, converted there, bf16 autocast, inductor with
    static shapes over two bins and varying foregrounds: two graphs, no break, finite losses."""
    model = tiny_mae(border_aware=True, border_threshold=0.02).cuda()
    run = torch.compile(model, backend="inductor", dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator("cuda").manual_seed(0)
    for step in range(6):
        h, w = ((64, 96), (96, 64))[step % 2]
        stored = torch.randint(10, 256, (8, 1, h, w), device="cuda", dtype=torch.uint8, generator=gen)
        stored[: step % 4, :, :16] = 0  # a different number of black patch rows per step
        imgs = unit_float(stored)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(imgs, noise=torch.rand(8, h * w // 256, device="cuda", generator=gen)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    assert counters["stats"]["unique_graphs"] == 2 and no_graph_break(), dict(counters["graph_break"])
