#!/usr/bin/env python
"""WiSE-FT: mix a fine-tuned model with its starting weights, score each mix, export the chosen one; same as
`clipalign-wiseft`.

    python tools/wiseft.py --finetuned runs/ft --data domain=path/to/test --export exports/ft-wise
"""

from clipalign.wiseft import main

if __name__ == "__main__":
    main()
