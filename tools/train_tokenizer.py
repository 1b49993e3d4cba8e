#!/usr/bin/env python
"""Train a SentencePiece tokenizer on captions from shards, text files or CSV/TSV tables; same as
`clipalign-train-tokenizer`.

    python tools/train_tokenizer.py --data "/data/cc3m/{00000..00331}.tar" --output tok.model
    python tools/train_tokenizer.py --data captions.tsv --caption-key title --output tok.model --model-type bpe
"""

from clipalign.train_tokenizer import main

if __name__ == "__main__":
    main()
