#!/usr/bin/env python
"""WebDataset shards from a captioned image folder, a CSV/TSV/parquet table or an ImageFolder; same as
`clipalign-make-shards`.

    python tools/make_shards.py folder photos/ --out shards/photos
    python tools/make_shards.py table captions.csv --out shards/mine --image-col filepath --caption-col title
    python tools/make_shards.py imagefolder data/val --out shards/val --templates "a photo of a {}."
"""

from clipalign.data.make_shards import main

if __name__ == "__main__":
    main()
