"""params.yaml, read once into frozen, typed, validated dataclasses.

Every section is a dataclass; its fields are the allowed keys, their annotations the
types. An unknown key, a wrong type or a bad value raises `ParamsError` naming the full
key (e.g. `data.val_fraction`) before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ParamsError, UserError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(key, message)


@dataclass(frozen=True)
class DataParams:
    source: Literal["fashion-mnist", "idx", "imagefolder"] = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # IDX folder or ImageFolder root
    shards: str = "data/shards"  # output folder: {train,val,test}-NNNNNN.tar + manifest.json
    val_fraction: float = 0.1  # carved from train, stratified by class
    test_fraction: float = 0.1  # carved from train only when the source has no test split
    class_names: list[str] | None = None  # idx only; default "0".."9"
    channels: Literal["auto", "1", "3"] = "auto"  # imagefolder: auto = 1 if all grayscale
    shard_max_count: int = 10000  # samples per shard
    shard_max_mb: float = 256.0  # MB per shard
    on_bad_input: Literal["fail", "skip"] = "fail"
    workers: int = 2  # processes used by the shard stage
    seed: int = 0  # the split and the order of samples in the shards

    def __post_init__(self) -> None:
        _require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        _require(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        _require(
            self.val_fraction + self.test_fraction < 1,
            "val_fraction",
            "val_fraction + test_fraction must be below 1",
        )
        _require(self.shard_max_count >= 1, "shard_max_count", "must be at least 1")
        _require(self.shard_max_mb > 0, "shard_max_mb", "must be positive")
        _require(self.workers >= 0, "workers", "must be 0 or more")
        if self.class_names is not None:
            _require(
                len(set(self.class_names)) == len(self.class_names) > 0,
                "class_names",
                "must be a non-empty list of distinct names",
            )


@dataclass(frozen=True)
class ModelParams:
    name: str = "mae_vit_small_patch4_28"  # a preset from `mae-cli models`

    def __post_init__(self) -> None:
        from mae.config import PRESETS

        _require(
            self.name in PRESETS,
            "name",
            f"unknown model {self.name!r}; choose one of: {', '.join(PRESETS)}",
        )


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        type(None): "null",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or ParamsError naming `key`. Ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed or (isinstance(allowed, str) and str(value) == allowed):
                return allowed
    elif origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ParamsError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ParamsError(key, f"expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(prefix, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ParamsError(
                f"{prefix}.{key}" if prefix else str(key),
                f"unknown key; allowed: {', '.join(names)}",
            )
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**values)
    except ParamsError as err:
        if not prefix:
            raise
        raise ParamsError(f"{prefix}.{err.key}", err.message) from None


def parse_params(raw: Any) -> Params:
    """A params mapping (as from YAML) -> validated `Params`."""
    return _build(Params, raw, "")


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(err.key, f"{err.message} (in {path})") from None
