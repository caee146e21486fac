"""The user-facing error type, in a module without heavy imports (the ONNX runtime path runs without torch)."""

import importlib
from types import ModuleType


class UserError(Exception):
    """A problem the user can fix: printed as one line (what is wrong, what to do), exit code 2, no traceback."""


def import_optional(module: str, requirements: str, purpose: str) -> ModuleType:
    """Import an optional dependency; when it is missing, a :class:`UserError` that says which file installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{purpose} needs the package '{err.name or module}', which is not installed; "
                        f"pip install -r {requirements}") from None
