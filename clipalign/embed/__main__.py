"""`python -m clipalign.embed ...`: the same as `clipalign-embed ...`."""

from clipalign.embed.run import main

raise SystemExit(main())  # as the console script does: a value returned would be the exit status
