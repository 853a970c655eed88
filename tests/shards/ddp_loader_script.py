"""Run under ``accelerate launch`` by test_loader_ddp.py: every rank iterates one epoch, in lock step.

Usage: ``ddp_loader_script.py SHARDS OUTFILE``. Each rank builds its loaders from Accelerate's process index
and count (never ``accelerator.prepare``), does an all_reduce at every step (a rank with more steps than the
others would hang there, so the process group has a short timeout) and writes ``OUTFILE.rank<N>.json``:
per backend, the train keys and the eval keys with their valid flags.
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from radstream.shards.loader import build_loader, dali_available
from radstream.shards.loader_config import LoaderConfig


def one_epoch(loader) -> dict:
    keys, valid, steps = [], [], 0
    for batch in loader:
        count = torch.tensor([len(batch["key"])], dtype=torch.int64)
        torch.distributed.all_reduce(count)  # lock step: every rank must reach every step
        keys += batch["key"]
        valid += batch["valid"].tolist()
        steps += 1
    return {"keys": keys, "valid": valid, "steps": steps, "len": len(loader)}


def main(argv: list[str]) -> int:
    root, outfile = argv
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=30))]
    )
    result = {"rank": accelerator.process_index, "world": accelerator.num_processes}
    for backend in ["torch"] + (["dali"] if dali_available() else []):
        cfg = LoaderConfig(backend=backend, batch_size=3, num_workers=1)
        where = {
            "process_index": accelerator.process_index,
            "num_processes": accelerator.num_processes,
            "device": accelerator.device,
        }
        result[backend] = {
            "train": one_epoch(build_loader(cfg, root, "train", **where)),
            "val": one_epoch(build_loader(cfg, root, "val", train=False, **where)),
        }
    with open(f"{outfile}.rank{accelerator.process_index}.json", "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
