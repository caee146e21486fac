"""Test set-up: the repository root is importable, and torch uses the machine's cores without oversubscribing."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
