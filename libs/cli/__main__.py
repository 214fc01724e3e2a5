"""`python -m libs.cli`: the `weir` command without the console script."""

from libs.cli.app import main

main()
