"""params.yaml, read once into frozen, typed, checked sections (`pipeline.sections`).

params.yaml is the one place the defaults live: the sections say which keys exist, their
types and their ranges, and every key must be in the file. An unknown or missing key, a
wrong type or a bad value raises `ParamsError` naming the full key (e.g.
`data.val_fraction`) before any work starts; so do values that pass one by one but cannot
train together (`pipeline.trainable`). A partial file (a recipe, a test's project) is
merged over params.yaml first: `merge`. The YAML is read as DVC writes it:
`pipeline.params_yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.errors import ParamsError, UserError
from pipeline.params_yaml import read_yaml
from pipeline.sections import (  # noqa: F401 (the sections are read from here too)
    DataParams,
    FinetuneParams,
    LinprobeParams,
    ModelParams,
    Params,
    PathsParams,
    PretrainParams,
    RuntimeParams,
    Schedule,
    Section,
    TrackingParams,
    project_root,
)
from pipeline.trainable import check_trainable


def workspace_path(key: str, value: str) -> Path:
    """A path a stage reads from the project (`data.root`): as given. Under a queued or
    `--temp` DVC experiment (the working directory is DVC's copy, not `DVC_ROOT`), a
    relative path missing from the copy but present in the project is one DVC did not
    copy (git-ignored and not DVC-tracked): refused in one line naming the key, before
    any work, since reading the project's copy would escape DVC's hashing."""
    path = Path(value)
    root = project_root()
    if path.is_absolute() or path.exists() or root == Path.cwd().resolve():
        return path
    if (root / path).exists():
        raise UserError(
            f"{key}: {value} lies in the project ({root / path}) but not in DVC's temporary "
            f"workspace ({Path.cwd()}): a queued or --temp experiment gets only git-tracked "
            f"and DVC-tracked files; `dvc add {value}` and commit the .dvc file, or give "
            "an absolute path"
        )
    return path


def flatten(obj: BaseModel, prefix: str = "") -> dict[str, Any]:
    """A params model as {"section.key": value}, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for name in type(obj).model_fields:
        value, key = getattr(obj, name), f"{prefix}{name}"
        out |= flatten(value, f"{key}.") if isinstance(value, BaseModel) else {key: value}
    return out


def _key(err: dict) -> str:
    """pydantic's error location -> the params key: the field names, not the union tags;
    an unknown key is named itself."""
    model, parts = Params, []
    for item in err["loc"]:
        fields = getattr(model, "model_fields", {})
        if item not in fields:
            if err["type"] == "extra_forbidden":
                parts.append(str(item))
            break
        parts.append(str(item))
        model = fields[item].annotation
    return ".".join(parts)


def _allowed(key: str) -> str:
    model = Params
    for part in key.split(".")[:-1]:
        model = model.model_fields[part].annotation
    return ", ".join(model.model_fields)


def parse_params(raw: Any) -> Params:
    """A params mapping (as from YAML) -> validated `Params`; the first bad key named."""
    if not isinstance(raw, dict):
        raise UserError(f"expected sections of keys (data:, model:, ...), got {raw!r}")
    try:
        p = Params.model_validate(raw)
    except ValidationError as e:  # an unknown key first: it may be a misspelt missing one
        errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
    else:
        check_trainable(p)  # combinations that cannot train, each named by a key
        return p
    first, key = errors[0], _key(errors[0])
    if first["type"] == "extra_forbidden":
        raise ParamsError(key, f"unknown key; allowed: {_allowed(key)}")
    if first["type"] == "missing":
        raise ParamsError(key, "missing (every key has its value in params.yaml)")
    if first["type"] == "value_error":  # ours: says what it needs
        raise ParamsError(key, first["msg"].removeprefix("Value error, "))
    same = dict.fromkeys(x["msg"] for x in errors if _key(x) == key)
    raise ParamsError(key, f"{' or '.join(same)}, got {first['input']!r}")


def merge(base: dict, overrides: dict) -> dict:
    """`overrides` (sections of keys) over `base`, one level deep, as a recipe applies."""
    merged = {k: dict(v or {}) for k, v in base.items()}
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise UserError(f"section {section!r} must be a mapping of keys")
        merged.setdefault(section, {}).update(values)
    return merged


def load_params(path: Path | str = "params.yaml") -> Params:
    raw = read_yaml(path)
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(err.key, f"{err.message} (in {path})") from None
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
