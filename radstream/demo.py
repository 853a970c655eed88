"""`radstream demo OUT`: the whole study on the embedded synthetic corpus, reusing finished stages.

synthetic radiographs → the stages of `radstream study` (``radstream.stages``) with a tiny protocol: shards in
smart bins → MAE pretraining → embeddings → linear probes, supervised ViT / ResNet50 baselines and MAE
fine-tuning at 1%, 10% and 100% labels (one learning rate and seed per trained model) → the study's tables,
plus pictures. Accelerate puts the training stages on the GPU when there is one and on the CPU otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from radstream.stages import Protocol, header, run_stages

RECIPES = {
    "pretrain": "configs/demo/pretrain.yaml",
    "probe": "configs/demo/probe.yaml",
    "vit": "configs/demo/supervised_vit.yaml",
    "resnet50": "configs/demo/supervised_resnet50.yaml",
    "finetune": "configs/demo/finetune.yaml",
}
"""The demo's recipes: small models that learn something in CPU minutes."""


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the defaults fit in about 15 minutes on 2 CPU cores."""

    images: int = 700
    max_side: int = 1024
    max_tokens: int = 64
    """Token cap of the smart bins (64 = 128x128 at patch 16): small images keep CPU training short."""
    pretrain_epochs: int = 40
    supervised_epochs: tuple[int, int] = (25, 6)
    """Epochs of the ViT and the ResNet50 baselines."""
    finetune_epochs: int = 8
    seeds: int = 3
    """Seeds of the probes (the trained models run one seed each)."""

    def protocol(self) -> Protocol:
        """The demo's protocol: its recipes, each one LR, the probes' seeds, early stopping after 10."""
        epochs = {"pretrain": self.pretrain_epochs, "vit": self.supervised_epochs[0],
                  "resnet50": self.supervised_epochs[1], "finetune": self.finetune_epochs}  # fmt: skip
        return Protocol(RECIPES, lrs=None, seeds=self.seeds, train_seeds=1, epochs=epochs)


TINY = DemoSize(
    images=80, max_side=256, max_tokens=16, pretrain_epochs=3, supervised_epochs=(2, 1), finetune_epochs=2,
    seeds=2,
)  # fmt: skip


def run_demo(out: str | Path, size: DemoSize = DemoSize(), seed: int = 0, workers: int = 2) -> int:
    """Run every demo stage into ``out``; finished stages are reused on a rerun."""
    from ingest.synth import synthesize

    out = Path(out)
    start = time.perf_counter()
    header("demo", 1, 6, "synthetic radiographs")
    src = out / "synth"
    synthesize(src, n=size.images, seed=seed, max_side=size.max_side, workers=workers)
    build = [f"ingest.manifest_csv={src / 'manifest.csv'}", "ingest.labels=irma",
             f"binning.max_tokens={size.max_tokens}"]  # fmt: skip
    tables = run_stages(out, src, size.protocol(), build_overrides=build, seed=seed, workers=workers,
                        prefix="demo", first=2)  # fmt: skip
    print(tables)
    summary = json.loads((out / "runs" / "mae" / "summary.json").read_text())
    print(f"MAE: {json.dumps({k: summary[k] for k in summary if 'loss' in k or 'mse' in k})}")
    print(
        f"demo: done in {time.perf_counter() - start:.0f} s; results in {out / 'results'}, "
        f"pictures in {out / 'pictures'}"
    )
    return 0
