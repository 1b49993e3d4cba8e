#!/usr/bin/env python
"""Draw a run's loss, logit scale, learning rate, throughput and zero-shot curves to a PNG; same as `clipalign-plot`.

    python tools/plot.py runs/quickstart                  # writes runs/quickstart/curves.png
"""

from clipalign.plot import main

if __name__ == "__main__":
    main()
