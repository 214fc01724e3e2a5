"""`weir`, the command line of the public API: a thin layer over the SDK (`libs.sdk`).

Installed as a console script by `make venv` (pyproject.toml); `python -m libs.cli` runs the
same. Commands are in `app`, what they print in `render`; see docs/cli.md.
"""
