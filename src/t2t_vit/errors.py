"""The one exception type users see: the CLI prints it as one line and exits with code 2."""
from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Iterable


class T2TViTError(Exception):
    """A problem with the user's input (model name, file, data, configuration).

    The message is a complete sentence that says what is wrong and, where possible, how to fix it.
    """

    exit_code = 2


class MissingDependency(T2TViTError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise one sentence naming what to install.

    Args:
        module: the import name, e.g. ``"onnxscript"``.
        extra: the package extra that installs it, e.g. ``"export"``.
        purpose: what needs it, e.g. ``"ONNX export"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(
            f"{purpose} needs the optional package {module!r}, which is not installed; "
            f"install it with: pip install 't2t-vit[{extra}]'"
        ) from err


def check_range(flag: str, value: int | None, low: int, high: int | None = None) -> None:
    """One line for a number flag outside ``[low, high]``: argparse only checks that it is a number."""
    if value is not None and (value < low or (high is not None and value > high)):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise T2TViTError(f"{flag} must be {bound}, got {value}")


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, quote: bool = False) -> str:
    """``"; did you mean a, b?"`` for the closest of ``choices`` to ``word``, or ``""`` when none is
    close; ``quote`` writes each suggestion as ``'a'``."""
    close = difflib.get_close_matches(str(word), list(choices), n=n)
    return f"; did you mean {', '.join(map(repr, close) if quote else close)}?" if close else ""
