"""An embedding directory in clipalign-embed's layout (clipalign.layout), made from a real model and real image files.

It writes what clipalign-embed writes, without running it (faster for the index and search tests): embed.json,
float16 L2-normalised image and text embeddings in numbered parts, and a parquet table of the same rows beside each
part. Images are drawn
with the synthetic data set's `draw_sample`; part 0's are JPEG files (metadata `image_path`), part 1's live only in a
tar shard (metadata `shard`), so both ways the search page finds an image are exercised.

`CLIPALIGN_SEARCH_MODEL=DIR` embeds with a trained export (the docs' screenshot) instead of an untrained tiny model.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import clipalign
from clipalign.config import ModelConfig
from clipalign.data.synthetic import draw_sample
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.export import export_model
from clipalign.layout import EMBED_CONFIG_FILE, embedding_part, metadata_part
from clipalign.model import create_model


def tiny_export(out: Path) -> Path:
    """An export of an untrained tiny-vit-64: its towers are random, its files and code paths real."""
    torch.manual_seed(0)
    return export_model(create_model(ModelConfig(name="tiny-vit-64")), out)


def model_for_tests(root: Path) -> Path:
    """The model the fixture embeds with: $CLIPALIGN_SEARCH_MODEL, else a fresh tiny export under root."""
    given = os.environ.get("CLIPALIGN_SEARCH_MODEL")
    return Path(given).resolve() if given else tiny_export(root / "model")


@torch.no_grad()
def make_embedding_dir(root: Path, model_dir: Path, samples: int = 40, image_size: int = 128, seed: int = 0) -> Path:
    """`root/embeddings` (and the images it points at, under `root/source`) for `samples` drawn images, in two parts.

    Returns:
        The embedding directory.
    """
    model = clipalign.load(model_dir)
    rng = random.Random(seed)
    drawn = [draw_sample(rng, image_size)[:2] for _ in range(samples)]
    keys = [f"{i:06d}" for i in range(samples)]
    source, out = root / "source", root / "embeddings"
    (source / "images").mkdir(parents=True)
    half = samples // 2
    parts = [range(0, half), range(half, samples)]
    files = {}
    for i in parts[0]:
        files[i] = source / "images" / f"{keys[i]}.jpg"
        files[i].write_bytes(image_to_bytes(drawn[i][0]))
    shard = write_shards(({"__key__": keys[i], "jpg": image_to_bytes(drawn[i][0]), "txt": drawn[i][1]}
                          for i in parts[1]), source / "shards", prefix="part")[0]
    for n, rows in enumerate(parts):
        images = torch.stack([model.preprocess(drawn[i][0]) for i in rows])
        texts = model.tokenizer([drawn[i][1] for i in rows])
        for modality, vectors in (("image", model.encode_image(images)), ("text", model.encode_text(texts))):
            path = embedding_part(out, modality, n)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vectors.numpy().astype(np.float16))
        table = {"key": [keys[i] for i in rows], "caption": [drawn[i][1] for i in rows]}
        if n == 0:
            table.update(image_path=[str(files[i]) for i in rows], path=[str(files[i]) for i in rows])
        else:  # `path` says where a sample came from: here the shard, which is no image to show
            table.update(shard=[str(shard)] * len(rows), path=[str(shard)] * len(rows))
        metadata_part(out, n).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), metadata_part(out, n))
    config = {"model": {"path": str(model_dir), "name": model.name}, "embed_dim": int(vectors.shape[1]),
              "modalities": ["image", "text"], "dtype": "float16", "normalized": True,
              "rows": {"image": samples, "text": samples}, "parts": len(parts), "source": str(source)}
    (out / EMBED_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out
