"""``radstream.train.pretrain`` under ``accelerate launch`` for tests/train/test_elastic_ddp.py, logging what it trains.

    accelerate launch [--multi_gpu --num_processes N] ... tests/train/ddp_elastic_script.py \
        --keys DIR --config RECIPE key=value ...

Runs ``radstream.train.pretrain.main`` unchanged, except that every rank appends one line per optimizer step to
``DIR/keys-rank-<i>.jsonl``: the epoch, the step, the world size and the keys it trained (padded repeats, which
the loader flags invalid, left out), so a test can check the exact samples of an epoch across a stop and an
elastic resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", required=True)
    args, rest = parser.parse_known_args()

    import radstream.train.pretrain as pretrain
    import radstream.train.trainer as trainer

    folder = Path(args.keys)
    train_step, train_epoch = pretrain.train_step, trainer._train_epoch
    epoch = {}

    def logging_epoch(s):
        epoch["now"] = s.state.epoch
        return train_epoch(s)

    def logging_step(accelerator, model, optimizer, batches, **kw):
        keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
        line = {"epoch": epoch["now"], "step": kw["step"], "world": accelerator.num_processes, "keys": keys}
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"keys-rank-{accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return train_step(accelerator, model, optimizer, batches, **kw)

    pretrain.train_step, trainer._train_epoch = logging_step, logging_epoch
    return pretrain.main(rest)


if __name__ == "__main__":
    sys.exit(main())
