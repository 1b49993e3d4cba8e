#!/usr/bin/env python
"""Export a checkpoint as an open_clip `local-dir:` directory (optionally with ONNX towers); same as `clipalign-export`.

    python tools/export.py --checkpoint runs/quickstart --out exports/quickstart --onnx
"""

from clipalign.export import main

if __name__ == "__main__":
    main()
