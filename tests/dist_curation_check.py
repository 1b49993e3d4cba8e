"""Curation over real processes and DataLoader workers; run by tests/test_curation.py under `accelerate launch`.

Every process reads the exact-pass training stream (`make_train_loader`, batches of one sample) of the same shards
with the same curation settings, until each of its streams has delivered a batch of pass `--passes`; rank 0 writes,
as JSON, every batch of every process: (stream, pass, emitted, key, filtered counts).

    accelerate launch --multi_gpu --num_processes 2 tests/dist_curation_check.py --shards 'DIR/c-{0..7}.tar' \
        --keep DIR/keep.npy --keep-probability DIR/probability.npy --workers 2 --out result.json
"""

from __future__ import annotations

import argparse

from accelerate import Accelerator
from accelerate.utils import gather_object
from dist_common import run_and_report

from clipalign.data.curation import SampleFilter
from clipalign.data.shards import expand_sources, make_train_loader
from clipalign.tokenizer import build_tokenizer


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard pattern, as data.train")
    p.add_argument("--keep", default="")
    p.add_argument("--keep-id", default="uid")
    p.add_argument("--keep-probability", default="")
    p.add_argument("--min-score", default="")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=2, help="read until every stream reached this pass")
    p.add_argument("--out", required=True, help="JSON file that rank 0 writes")
    return p.parse_args()


def main() -> None:
    args = _parse_args()

    def check(accelerator: Accelerator) -> dict:
        sample_filter = SampleFilter(args.keep, args.keep_id, args.keep_probability, args.min_score)
        loader = make_train_loader(expand_sources(args.shards), build_tokenizer("tiny-vit-64"), 16, batch_size=1,
                                   workers=args.workers, seed=args.seed, resampled=False, shuffle_buffer=8,
                                   batch_timeout=120, sample_filter=sample_filter)
        mine = {accelerator.process_index * args.workers + w for w in range(args.workers)}
        done: set[int] = set()
        batches = []
        for batch in loader:
            stream, epoch, emitted = batch["position"]
            batches.append([stream, epoch, emitted, batch["keys"][0], batch["filtered"]])
            if epoch >= args.passes:
                done.add(stream)
                if done == mine:
                    break
        every = [b for part in gather_object([batches]) for b in part]
        return {"batches": every, "streams": len(mine) * accelerator.num_processes}

    run_and_report(args.out, check)


if __name__ == "__main__":
    main()
