"""Validation on real processes; run by tests/test_validation.py under `accelerate launch`.

Every rank builds the same tiny dual encoder (seed 0) and validates it on the same shards with `--batch-size` rows
per process, first as it is (DDP's case: every process holds the whole model), then sharded with FSDP2
(`train.sharding=fsdp`'s case: every forward needs every process). Rank 0 writes both results as JSON:

    accelerate launch --multi_gpu --num_processes 2 tests/dist_val_check.py --shards 'val-{000000..000002}.tar' \
        --batch-size 8 --samples 32 --out result.json

On a machine without GPUs this script passes `cpu=True` to the Accelerator (gloo).
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator

from clipalign.config import LossConfig, ModelConfig
from clipalign.loss import build_loss
from clipalign.model import create_model
from clipalign.sharding import shard_model
from clipalign.validate import validate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--batch-size", type=int, required=True, help="rows per process of a global batch")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON file that rank 0 writes")
    args = p.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64")).to(accelerator.device)
    loss_fn = build_loss(LossConfig())
    results = {"whole": validate(model, loss_fn, accelerator, args.shards, args.batch_size, args.samples)}
    shard_model(model, accelerator.device)
    results["fsdp"] = validate(model, loss_fn, accelerator, args.shards, args.batch_size, args.samples)
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump({"processes": accelerator.num_processes, **results}, f)
    # both processes leave together and drop the sharded model before the group goes: a gloo process that exits
    # while its peer still holds the group can abort ("terminate called without an active exception")
    del model
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
