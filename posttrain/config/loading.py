"""Loading a config: defaults <- a YAML file <- ``key=value`` overrides, validated, an error blaming where
its key was set."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from posttrain.config.schema import ConfigError, apply_overrides, blamed_override, from_dict, load_yaml
from posttrain.config.training import PosttrainConfig


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                cls: type = PosttrainConfig) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. An error names where its key was
    set: the command line override when one set it (a typo there is not the YAML's), else the file."""
    overrides = list(overrides)
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        override = blamed_override(error.key, overrides)
        if override is not None:
            where = f" (set on the command line by {override!r}: fix or drop that override)"
        else:
            where = f" (in {path})" if path is not None else ""
        raise ConfigError(error.key, error.message + where) from None
