"""``radstream gpu-check``: prove the GPU path and measure it, in one command, into one report.

- ``check``: runs each part in its own process under a time limit and writes the report after every part.
- ``bench`` (``python -m radstream.gpu.bench PART``) and ``data``: the measurements. The MAE part times the
  training step itself, ``radstream.train.mae_step.train_step``, on the model, optimizer and accelerator the
  trainer builds from the ViT-B/16 recipe: what is timed is what trains.
- ``measure``: the one copy of device sync, timing, FLOPs of a step and peak memory, which
  ``benchmarks/train_step.py`` uses too.
- ``report``: pure functions (junit and pytest parsing, MFU, the targets, the Markdown report).
"""
