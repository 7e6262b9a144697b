"""Errors that mean "the input was wrong", and their one-line form for the command line.

The command line (:func:`lorax_cil.cli.main`) prints one line ``lorax-cil <command>: error: ...``
and exits with status 2 for every *user error*: a bad option, file, folder, configuration or
model file, a full disk, a missing permission. Anything else is a defect of lorax-cil: one line
too, exit status 1, with a hint to rerun with ``--debug`` for the traceback.

User errors are :class:`UserError` (raise it, or a subclass, for any refusal of an input) plus
the standard exceptions library code raises for bad input (:data:`USER_ERROR_TYPES`).
"""

from __future__ import annotations

import errno
import os

__all__ = ["UserError", "USER_ERROR_TYPES", "is_user_error", "one_line", "display_path", "printable"]


class UserError(ValueError):
    """An input was refused; the message names the file, option or key and what to do."""


#: exception types reported as user errors (exit status 2). ValueError covers the configuration,
#: option, checkpoint (CheckpointError) and data-layout refusals of the library; OSError covers
#: missing files, permissions, full disks and other refusals of the operating system;
#: MemoryError (and torch's OutOfMemoryError, by name) a job too large for the machine.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, MemoryError)

#: further user errors recognised by name, so that checking for them imports nothing heavy
#: (PIL refuses a "decompression bomb" image with its own exception type).
_USER_ERROR_NAMES = frozenset({"DecompressionBombError", "OutOfMemoryError"})


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is reported as a user error (exit status 2)."""
    return isinstance(exc, USER_ERROR_TYPES) or any(
        c.__name__ in _USER_ERROR_NAMES for c in type(exc).__mro__)


def display_path(path: str | os.PathLike | bytes) -> str:
    """A path as printable text: bytes that are not UTF-8 (file names from other systems) are
    shown as ``\\xNN`` escapes instead of making output encoders fail."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def _os_error_text(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        what = "no space left on device (free some space and rerun; files written earlier are intact)"
    names = [display_path(n) if isinstance(n, (str, bytes, os.PathLike)) else str(n)
             for n in (exc.filename, exc.filename2) if n is not None]
    if names and exc.strerror:
        return f"{what}: {' -> '.join(names)}"
    return str(exc) if not exc.strerror else what


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (OS errors name the file; no chained causes)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = _os_error_text(exc)
    elif isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        text = ("out of memory" + (f" ({exc})" if str(exc) else "") + ": lower the batch size, "
                "the image size or the number of workers, or use a machine with more memory")
    elif isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(printable(text).split())


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")
