"""params.yaml's text -> Python, as PyYAML reads it and as DVC writes it back (YAML 1.2
numbers), with a one-line error naming the file for what is not YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) that also reads the numbers YAML 1.2 writes.

    `dvc exp run -S` writes params.yaml back with a YAML 1.2 dumper (ruamel): 0.000001
    becomes `1e-06`, which YAML 1.1 has no float for (it needs a dot), so PyYAML returned
    the string '1e-06'. Plain scalars that YAML 1.2's core schema reads as numbers (floats
    without a dot, with an exponent; `0o` octals) load as those numbers here; quoted ones
    stay strings.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^0o[0-7]+$"), list("0"))


def load_yaml(text: str) -> Any:
    """YAML text -> Python, every number a YAML 1.1 or 1.2 writer may produce as a number."""
    return yaml.load(text, Loader=ParamsLoader)


def read_yaml(path: Path | str) -> Any:
    path = Path(path)
    try:
        return load_yaml(path.read_text())
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise UserError(f"{path}: not a params file (YAML text)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}") from None
