"""`radstream demo OUT`: the whole study on the embedded synthetic corpus, reusing finished stages.

synthetic radiographs → the stages of `radstream study` (``radstream.workflow``) with a tiny protocol: shards in
smart bins → MAE pretraining → embeddings → linear probes, supervised ViT / ResNet50 baselines and MAE
fine-tuning at 1%, 10% and 100% labels (one learning rate and two seeds per trained model) → the study's tables,
plus pictures. Accelerate puts the training stages on the GPU when there is one and on the CPU otherwise.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from radstream.core.atomic import write_text
from radstream.workflow import StudyProtocol, header, run_stages

RECIPES = {
    "pretrain": "configs/demo/pretrain.yaml",
    "probe": "configs/demo/probe.yaml",
    "vit": "configs/demo/supervised_vit.yaml",
    "cnn": "configs/demo/supervised_cnn.yaml",
    "finetune": "configs/demo/finetune.yaml",
}
"""The demo's recipes: small models that learn something in CPU minutes."""


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the defaults take about 9 minutes on 2 CPU cores (11 with `make demo`'s install;
    the budget is 15)."""

    images: int = 700
    max_side: int = 1024
    max_tokens: int = 64
    """Token cap of the smart bins (64 = 128x128 at patch 16): small images keep CPU training short."""
    pretrain_epochs: int = 40
    supervised_epochs: tuple[int, int] = (12, 3)
    """Epoch caps of the ViT and the CNN baselines (raised at small fractions to hold ``min_steps``)."""
    finetune_epochs: int = 16
    min_steps: int = 100
    """The one minimum of every trained model, probes included (``StudyProtocol.min_steps``), counted on each
    run's own schedule."""
    threads: int = 2
    """CPU threads of every stage (``StudyProtocol.threads``): the tables are the same on a machine with more
    cores (and the same CPU instruction set); the 2-core machine the demo is timed on uses them all."""
    seeds: int = 2
    """Seeds of the probes."""
    train_seeds: int = 2
    """Seeds of every trained model (baselines, fine-tuning): at least 2, so every row has a spread."""

    def protocol(self) -> StudyProtocol:
        """The demo's protocol: its recipes, each one LR, the seeds, early stopping after 10 validations."""
        epochs = {"pretrain": self.pretrain_epochs, "vit": self.supervised_epochs[0],
                  "cnn": self.supervised_epochs[1], "finetune": self.finetune_epochs}  # fmt: skip
        return StudyProtocol(RECIPES, lrs=None, seeds=self.seeds, train_seeds=self.train_seeds, epochs=epochs,
                             min_steps=self.min_steps, threads=self.threads, deterministic=True)  # fmt: skip


TINY = DemoSize(
    images=80, max_side=192, max_tokens=16, pretrain_epochs=3, supervised_epochs=(1, 1), finetune_epochs=2,
    min_steps=2, seeds=2, train_seeds=1,
)  # fmt: skip
"""The tests' demo: every stage, a minute's worth; one seed per trained model (the probes keep 2)."""


DEMO_KEY = hashlib.sha256(b"radstream demo: synthetic patients only").hexdigest()
"""The demo's privacy key: a constant, so that its synthetic patients get the same pseudonyms (and so the same
splits and tables) on every machine. Never use it for real data: anyone can compute pseudonyms under it."""


def demo_key(out: Path) -> Path:
    """``OUT/demo-privacy.key`` holding :data:`DEMO_KEY` (0600), written where missing."""
    path = out / "demo-privacy.key"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, DEMO_KEY + "\n").chmod(0o600)
    return path


def run_demo(out: str | Path, size: DemoSize = DemoSize(), seed: int = 0, workers: int = 2) -> int:
    """Run every demo stage into ``out``; finished stages are reused on a rerun."""
    from radstream.ingest.synth import synthesize

    out = Path(out)
    start = time.perf_counter()
    header("demo", 1, 6, "synthetic radiographs")
    src = out / "synth"
    synthesize(src, n=size.images, seed=seed, max_side=size.max_side, workers=workers)
    build = [f"ingest.manifest_csv={src / 'manifest.csv'}", "ingest.labels=irma",
             f"binning.max_tokens={size.max_tokens}", f"ingest.privacy.key_file={demo_key(out)}"]  # fmt: skip
    tables = run_stages(out, src, size.protocol(), build_overrides=build, seed=seed, workers=workers,
                        prefix="demo", first=2)  # fmt: skip
    from radstream.pictures import baseline_curves
    from radstream.report.report_checks import majority_rate, prior_rates

    runs = [out / "runs" / name for name in ("vit", "cnn")]
    baseline_curves(
        out / "runs", out / "pictures" / "baseline_curves.png", majority_rate(runs), prior_rates(runs)
    )
    print(tables)
    summary = json.loads((out / "runs" / "mae" / "summary.json").read_text())
    print(f"MAE: {json.dumps({k: summary[k] for k in summary if 'loss' in k or 'mse' in k})}")
    print(
        f"demo: done in {time.perf_counter() - start:.0f} s; results in {out / 'results'}, "
        f"pictures in {out / 'pictures'}"
    )
    return 0
