"""Command-line tools, each run as ``python tools/NAME.py`` from the repository root; the library code they use lives
in packages (``analysis``, ``data``, ``predictor``)."""
