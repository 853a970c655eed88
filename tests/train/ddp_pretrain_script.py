"""``radstream.train.pretrain`` under ``accelerate launch`` for tests/train/test_pretrain_ddp.py, with per-rank reports.

    accelerate launch --multi_gpu --num_processes 2 ... tests/train/ddp_pretrain_script.py \
        --report DIR [--signal-rank R --signal-step S] --config RECIPE key=value ...

Runs ``radstream.train.pretrain.main`` unchanged, except that every rank writes ``DIR/rank-<i>.json`` when training
stops (why, at which step and epoch, a hash of its weights) and, with ``--signal-rank``, that rank sends
itself SIGTERM while computing step ``--signal-step``: the other ranks must stop at the same step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path


def weights_hash(model) -> str:
    """sha1 of every parameter's bytes, in name order: equal on all ranks when DDP keeps them in sync."""
    digest = hashlib.sha1()
    for _, param in sorted(model.named_parameters()):
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    parser.add_argument("--signal-rank", type=int)
    parser.add_argument("--signal-step", type=int)
    args, rest = parser.parse_known_args()

    import radstream.train.pretrain as pretrain
    import radstream.train.trainer as trainer

    report_dir = Path(args.report)
    train_step, train_loop = pretrain.train_step, trainer._train

    def signalling_step(accelerator, *a, **kw):
        if accelerator.process_index == args.signal_rank and kw["step"] == args.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(accelerator, *a, **kw)

    def reporting_train(s):
        reason = train_loop(s)
        rank = s.accelerator.process_index
        model = s.accelerator.unwrap_model(s.model)
        report = {"rank": rank, "reason": reason, "step": s.state.step, "epoch": s.state.epoch,
                  "weights": weights_hash(model), "world": s.accelerator.num_processes}  # fmt: skip
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / f"rank-{rank}.json").write_text(json.dumps(report))
        return reason

    pretrain.train_step, trainer._train = signalling_step, reporting_train
    return pretrain.main(rest)


if __name__ == "__main__":
    sys.exit(main())
