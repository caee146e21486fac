"""The user-facing error type, the scripts' error handling (:func:`run_cli`) and numeric flag checks
(:class:`NumberRange`), in a module without heavy imports: a cached ONNX run starts without torch."""

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any


class UserError(Exception):
    """A problem the user can fix: printed as one line (what is wrong, what to do), exit code 2, no traceback."""


def import_optional(module: str, requirements: str, purpose: str) -> ModuleType:
    """Import an optional dependency; when it is missing, a :class:`UserError` that says which file installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{purpose} needs the package '{err.name or module}', which is not installed; "
                        f"pip install -r {requirements}") from None


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main`` and turn :class:`UserError`, running out of memory and Ctrl-C into a one-line
    message and exit code; a closed standard output (``script | head``) ends the script quietly."""
    try:
        main()
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as err:
        print(f"error: not enough memory: {str(err) or 'an allocation failed'}; lower the batch size, the number of "
              "images or vectors, or the input size (see the script's --help), or free memory", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # Whatever is still buffered cannot be written: point stdout at devnull so the exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@dataclass(frozen=True)
class NumberRange:
    """A numeric flag's allowed values: an argparse ``type`` (``type=NumberRange(int, 1)``) that also checks values
    from elsewhere (:meth:`problem`). ``low_open`` / ``high_open`` exclude the bound; NaN and infinity are refused."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed ("must be at least 1, got 0"), or None."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (self.kind is int and not isinstance(value, int)):
            return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}, got {value}" if below or above else None

    def describe(self) -> str:
        """``at least 1``, ``above 0``, ``in [0, 1)``..."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"{'below' if self.high_open else 'at most'} {self.high:g}"

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if self.kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
