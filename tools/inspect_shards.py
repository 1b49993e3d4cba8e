#!/usr/bin/env python
"""Report on WebDataset shards (counts, keys, image sizes, captions, bad samples); same as `clipalign-inspect-shards`.

    python tools/inspect_shards.py 'shards/train-{000000..000099}.tar' --limit 10000 --json report.json
"""

from clipalign.data.inspect_shards import main

if __name__ == "__main__":
    main()
