"""A recipe (a partial params file) as `dvc exp run -S` arguments, checked first.

    python -m pipeline.tools.recipe recipes/fashion-mnist-gpu.yaml
    -> -S model.name=mae_vit_s_patch4_28 -S pretrain.epochs=400 ...

The recipe is merged into params.yaml and validated like it, so an unknown key or a bad
value fails here, naming the key, before DVC starts anything.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from pipeline.errors import UserError
from pipeline.params import merge, parse_params
from pipeline.params_yaml import read_yaml


def _leaves(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overrides(recipe: Path, params: Path = Path("params.yaml")) -> list[str]:
    """-> ["section.key=value", ...] for every leaf of the recipe."""
    raw = read_yaml(recipe) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{recipe}: expected sections of keys, like params.yaml")
    try:
        parse_params(merge(read_yaml(params), raw))
    except UserError as err:
        raise UserError(f"{recipe}: {err}") from None
    dump = lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()  # noqa: E731
    return [f"{k}={dump(v)}" for k, v in _leaves(raw).items()]


def main() -> None:
    try:
        args = overrides(Path(sys.argv[1]))
    except (IndexError, UserError) as err:
        print(
            f"recipe: error: {err or 'usage: python -m pipeline.tools.recipe RECIPE.yaml'}",
            file=sys.stderr,
        )
        sys.exit(1)
    print(" ".join(f"-S {shlex.quote(a)}" for a in args))


if __name__ == "__main__":
    main()
