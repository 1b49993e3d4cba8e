"""clipalign-embed: a corpus embedded with a trained model, in the layout other tools read (numpy, pandas, faiss).

    clipalign-embed --model EXPORT_CHECKPOINT_OR_RUN (--shards PATTERN | --folder DIR | --table FILE) --out DIR

The input is WebDataset shards (the `data.train` patterns, `::` between sources), a folder of images (captions from
`x.txt` / `x.json` beside `x.jpg`), or a CSV/TSV/parquet table of image paths and captions; the output an embedding
directory in clip-retrieval's layout (names in `clipalign.layout`), which autofaiss builds an index from:

    embed.json                        what made it (written last: a directory without it is unfinished)
    img_emb/img_emb_NNNNN.npy         float16 (n, D), L2-normalised image embeddings of part N
    text_emb/text_emb_NNNNN.npy       float16 (n, D), L2-normalised text embeddings of part N; zeros where a row
                                      has no caption (only when both modalities are embedded)
    metadata/metadata_NNNNN.parquet   the n rows of part N, in the arrays' order
    parts/plan.json, parts/part_NNNNN.json   what a resume reads: the run's plan, a marker per finished part

Part N is the N-th shard of the pattern, or the N-th slice of `--part-size` files (sorted by relative path) or table
rows (in order). Metadata columns:

    key          shards: the sample's key (unique within its shard); folders: the image's path relative to the
                 folder; tables: the `--key-column` cell, else the row number from 0 (as a string)
    caption      the caption the row's text embedding embeds (its first by the caption rule), null where none
    shard        shards: the URL of the shard the sample came from
    image_path   folders and tables: the image file's absolute path (null for a table row without one)
    row          tables: the row number in the table, from 0

embed.json: `clipalign_version`; `model` (`path`, `name`, `embed_dim`, `fingerprint`: a SHA-256 of its weights,
`logit_scale`); `source` (the input and how it was read); `modalities`; `embed_dim`; `dtype` (float16);
`normalization` (l2); `rows` (of every array, over all parts); `embedded` (per modality, the rows that hold an
embedding); `zero_rows` (text rows left as zeros, by reason); `samples` (read); `skipped` (samples without a row, by
reason); `columns`; `folders`; `settings` (precision, decode, max_image_pixels, image_size); `parts` (part, source,
rows, and any skips, zero rows or read errors of each).

Which samples become rows, and the skip reasons: `clipalign.embed.corpus`. Reading it back: `load_embeddings`,
`load_metadata`, or numpy and pyarrow/pandas directly (docs/embed.md).
"""

from clipalign.embed.corpus import (
           DEFAULT_PART_SIZE,
           MODALITIES,
           Corpus,
           EmbedInputError,
           plan_folder,
           plan_shards,
           plan_table,
)
from clipalign.embed.run import embed_corpus, main
from clipalign.embed.store import EmbedDirError, load_embeddings, load_metadata, read_embed_config

__all__ = ["DEFAULT_PART_SIZE", "MODALITIES", "Corpus", "EmbedDirError", "EmbedInputError", "embed_corpus",
           "load_embeddings", "load_metadata", "main", "plan_folder", "plan_shards", "plan_table",
           "read_embed_config"]
