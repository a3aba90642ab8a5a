"""Errors a person can act on, and the exit codes every entry point uses.

Exit codes mean one thing each (README, "Exit codes"):

- ``0`` the work is done;
- ``1`` the work failed (nothing could be scored, a verification found problems, an unexpected error);
- ``2`` bad usage or input: an unknown option, key or value, a missing or malformed file, a model not
  in the offline cache, a folder posttrain will not overwrite. The user can fix it and run again.

An input error is reported as one line naming the culprit (file, key or row) and the fix, never as a
traceback. ``--debug`` on the command line or ``POSTTRAIN_DEBUG=1`` lets the exception through with its
traceback. This module sits on the bottom floor (next to ``config``) so that every floor can raise
``UserError`` without importing upward.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

DEBUG_ENV = "POSTTRAIN_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """Bad input the user can fix (a path, a key, a value, a download to make): its message is the
    one line shown, naming the culprit and the fix; the exit code is ``EXIT_USAGE``."""


# Input problems wherever they are raised: every validation error of the project is a ValueError
# (ConfigError, ProtocolError, ShardFormatError, ...), and a missing path is the user's to fix.
INPUT_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, FileExistsError)


def hf_download_hint(repo_id: str) -> str:
    """How to get a hub model into the cache an offline job reads (one wording for every caller)."""
    return (f"on a machine with internet run `hf download {repo_id}` with the same HF_HOME (then copy that "
            f"HF_HOME here or point HF_HOME at it), or download the folder anywhere and give its path")


def exit_code(error: BaseException) -> int:
    return EXIT_USAGE if isinstance(error, INPUT_ERRORS) else EXIT_FAILED


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError as ``path: reason``)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
        if isinstance(error, KeyError) and error.args:
            message = f"missing key {error.args[0]!r}"
    return " ".join(message.split())


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether a traceback is wanted, ``argv`` without ``--debug``); before ``--`` only."""
    end = argv.index("--") if "--" in argv else len(argv)
    flagged = DEBUG_FLAG in argv[:end]
    rest = [arg for i, arg in enumerate(argv) if not (i < end and arg == DEBUG_FLAG)]
    return flagged or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


def guarded(prog: str, body: Callable[[], int | None], *, debug: bool) -> int:
    """Run ``body``; an exception becomes one line on stderr and its exit code (re-raised when ``debug``)."""
    try:
        return int(body() or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place every error becomes a message and a code
        if debug:
            raise
        code = exit_code(error)
        # posttrain's own input errors and missing paths say all there is to say; anything else may be a bug
        ours = type(error).__module__.startswith("posttrain")
        explained = code == EXIT_USAGE and (ours or isinstance(error, OSError))
        hint = "" if explained else f" [{type(error).__name__}; {DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback]"
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr, flush=True)
        return code
