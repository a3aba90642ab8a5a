"""The one logging set-up of the package: what reaches the console, for every command and the service.

Three levels, chosen on the command line (``posttrain -q|-v COMMAND ...``, anywhere before ``--``):
``--quiet`` posttrain's warnings and errors only; the default, posttrain's own progress lines too;
``--verbose`` everything, third-party chatter included (DeepSpeed's accelerator notice, transformers'
weight-loading bars, MLflow's and alembic's INFO lines), at DEBUG for posttrain. Libraries that read their
settings from the environment at import time get them here, before they are imported; their children
(torchrun ranks, DataLoader workers) inherit them.
"""

from __future__ import annotations

import logging
import os
import sys

QUIET, NORMAL, VERBOSE = -1, 0, 1
QUIET_FLAGS, VERBOSE_FLAGS = ("-q", "--quiet"), ("-v", "--verbose")
# loggers of the libraries we run, silenced below ERROR unless --verbose
THIRD_PARTY_LOGGERS = ("DeepSpeed", "deepspeed", "transformers", "accelerate", "mlflow", "alembic", "urllib3",
                       "httpx", "filelock", "huggingface_hub", "torch.distributed", "matplotlib", "PIL",
                       "numexpr", "torch.onnx", "torch._dynamo", "torch.export", "onnx_ir", "onnxscript")
_QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                      "MLFLOW_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test harness or a redirect may have
    replaced it since the set-up), never to a stream closed since."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _BelowError(logging.Filter):
    """Drops a library's records below ERROR. Set on its logger before the library creates it: DeepSpeed
    sets its logger's level itself when imported, but keeps filters already attached."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_current: int | None = None  # what configure() set last (None: not yet)


def current() -> int:
    """The verbosity in force."""
    return NORMAL if _current is None else _current


def verbosity_requested(argv: list[str]) -> tuple[int | None, list[str]]:
    """(the verbosity asked for, None when no flag; ``argv`` without the flags); before ``--`` only; the
    last flag wins."""
    end = argv.index("--") if "--" in argv else len(argv)
    verbosity, rest = None, []
    for i, arg in enumerate(argv):
        if i < end and arg in QUIET_FLAGS + VERBOSE_FLAGS:
            verbosity = QUIET if arg in QUIET_FLAGS else VERBOSE
        else:
            rest.append(arg)
    return verbosity, rest


def configure(verbosity: int | None = None) -> None:
    """Set up logging for ``verbosity`` (``QUIET``, ``NORMAL`` or ``VERBOSE``; None keeps what an outer
    command set, e.g. the demo's stages, else ``NORMAL``)."""
    global _current
    verbosity = current() if verbosity is None else verbosity
    _current = verbosity
    level = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[verbosity]
    root = logging.getLogger()
    if not any(isinstance(handler, _CurrentStderr) for handler in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity == VERBOSE else logging.WARNING)
    logging.getLogger("posttrain").setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, _BelowError)]:
            logger.removeFilter(existing)
        if verbosity != VERBOSE:
            logger.addFilter(_BelowError())
            logger.setLevel(logging.ERROR)
        else:
            logger.setLevel(logging.NOTSET)
    if verbosity != VERBOSE:
        for key, value in _QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
