"""`python -m clipalign.embed ...`: the same as `clipalign-embed ...`."""

from clipalign.embed.run import main

main()
