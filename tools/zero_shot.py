#!/usr/bin/env python
"""Zero-shot classification of a checkpoint, run or export directory on an ImageFolder; same as `clipalign-zeroshot`.

    python tools/zero_shot.py --model runs/quickstart --data path/to/heldout --output zeroshot.json
"""

from clipalign.evaluate import main

if __name__ == "__main__":
    main()
