"""The configuration machinery: ``ConfigError`` naming the dotted key, ``Section`` (every config section is
type-checked and validated when it is built, in code as from YAML), YAML loading with ``key=value``
overrides, and the declaration a step mode's section carries (``StepModeDecl``).

Decided in issue 22: the plain dataclasses with validation in ``__post_init__`` (this module) rather than
pydantic v2 in strict mode. Both validate at construction; pydantic would turn every error into its own
``ValidationError`` with ``loc`` tuples that must be rendered back into "key: message" with the known keys
and the near match, and its strict mode refuses the YAML 1.1 exponents (``1e-6`` read as a string) this
schema takes. Keeping the dataclasses kept every error message and made ``validate`` run on every
construction for 70 lines here; the schema itself did not grow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

ConfigT = typing.TypeVar("ConfigT")

SAMPLE_RATE_HZ = 16_000  # the one rate of shards, batches and models (every SSL backbone here is 16 kHz)

# a number like 1e-6 or 5E+3, which YAML 1.1 (PyYAML) leaves a string because it has no dot
YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


class ConfigError(ValueError):
    """A configuration problem at a dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def require_choice(value: Any, key: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, key, f"must be one of {choices}, got {value!r}")


class Section:
    """Base of every config section: built in code (``SamConfig(rho=-1)``) or from YAML, its fields are
    type-checked and ``validate`` runs before anyone can use it. Errors name the field; built from YAML
    (``from_dict``) they name the whole dotted key."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name, _coerce(getattr(self, spec.name), hints[spec.name], spec.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field rules of the section (``ConfigError`` naming the field)."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class Conflict:
    """A setting a step mode cannot run with: ``key`` is blamed when ``applies(config)``."""

    key: str
    applies: Callable[[Any], bool]
    reason: str


@dataclass(frozen=True)
class StepModeDecl:
    """What a step mode declares, on the config section that turns it on (``section.enabled``): its name
    (``posttrain.train.step.register_step_mode``), the module that registers it (imported on first use),
    whether it edits ZeRO partitions in place (the DeepSpeed config must keep parameters where those
    edits reach: ``posttrain.optim.partitions.check_zero_section``), whether it reads gradients while a
    backward still runs (``overlap_comm``), whether LayerDrop breaks it (its passes must run the same
    layers), and every other setting it conflicts with. The config's cross-mode guards, the trainer's
    ZeRO checks and the LayerDrop rule are all derived from these declarations."""

    name: str
    module: str
    edits_partitions: bool = False
    overlap_comm_safe: bool = True
    breaks_layerdrop: bool = False
    conflicts: tuple[Conflict, ...] = ()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (building nested dataclasses from mappings; a section
    given built is taken as it is: it validated itself)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(error.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        require_choice(value, key, typing.get_args(tp))
        return value
    if origin is list:
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and YAML11_EXPONENT.fullmatch(value):
            return float(value)  # 1e-6: YAML 1.1 reads an exponent without a dot as a string
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, os.PathLike):  # a path given from Python (the config stores paths as text)
            return os.fspath(value)
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")


def unknown_key_hint(key: str, names) -> str:
    """"unknown key (did you mean 'max_steps'?)", or the known keys when none is near."""
    import difflib

    near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"unknown key (did you mean {near[0]!r}?)" if near else f"unknown key (known: {sorted(names)})"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(_join(prefix, key), unknown_key_hint(str(key), names))
    kwargs = {name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)  # a Section checks and validates itself as it is built
    except ConfigError as error:
        raise ConfigError(_join(prefix, error.key), error.message) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The YAML a run saves (checkpoints, run folder): ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(override, "override must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(key, f"the value in the command line override {override!r} is not valid YAML "
                                   "(quote it, e.g. key='[a, b]')") from None
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError("", f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping")
    return data


def blamed_override(key: str, overrides: typing.Iterable[str]) -> str | None:
    """The last ``key=value`` override that set ``key``, a value inside it, or a section on its path."""
    for override in reversed(list(overrides)):
        set_key = override.partition("=")[0].strip()
        inside = key.startswith((f"{set_key}.", f"{set_key}["))  # a value inside what it set
        if set_key and (key == set_key or set_key.startswith(f"{key}.") or inside):
            return override
    return None


def resolved(cfg: ConfigT, values: typing.Mapping[str, Any]) -> ConfigT:
    """A new, validated copy of ``cfg`` with the dotted keys of ``values`` set: what a run learns once its
    config is valid (the ZeRO stage accelerate chose, the preset and normalisation of the model a
    fine-tune starts from). ``cfg`` itself is never changed after validation."""
    data = to_dict(cfg)
    for key, value in values.items():
        node = data
        *sections, name = key.split(".")
        for section in sections:
            node = node[section]
        if name not in node:
            raise ConfigError(key, "unknown key")
        node[name] = value
    return from_dict(type(cfg), data)
