"""The user-facing error type, in a module without heavy imports (the ONNX runtime path runs without torch)."""


class UserError(Exception):
    """A problem the user can fix: printed as one line (what is wrong, what to do), exit code 2, no traceback."""
