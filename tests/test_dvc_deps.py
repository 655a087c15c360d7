"""Every module a DVC stage runs that can change its outputs is one of its `dvc.yaml` deps:
a change to it re-runs the stage. The modules are found from the stage's own module by
following every import (those inside functions too, and `mae`'s names imported on first
use) within the project."""

import ast
from pathlib import Path

import pytest
import yaml

import mae
from tests.factory import ROOT

# Modules every stage imports that cannot change what it writes to its DVC outputs.
CANNOT_CHANGE_OUTPUTS = {
    "pipeline/__init__.py": "empty",
    "pipeline/stages/__init__.py": "the list of stages: names and where their code lives",
    "pipeline/data/__init__.py": "empty",
    "pipeline/train/__init__.py": "empty",
    "pipeline/errors.py": "the error classes and how an error reads",
    "pipeline/progress.py": "progress bars at a terminal",
    "pipeline/kept.py": "links the outputs aside once written, for a failed run to put back",
    "pipeline/trainable.py": "refuses values that cannot train; changes none",
    "pipeline/tracking/": "MLflow: records the runs; no DVC output is read from it",
    "pipeline/settings.py": "what a run changes from the committed params: its MLflow run name",
    "pipeline/mlflow_model.py": "the MLflow model (an MLflow artifact, not a DVC output)",
    "mae/__init__.py": "names imported on first use: followed where they are imported",
}
# ... and what one stage runs without using it for its outputs.
STAGE_CANNOT_CHANGE = {"shard": {"mae/config.py": "params.yaml's model name is checked only"}}


def _file(module: str, root: Path = ROOT) -> Path | None:
    path = root / module.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """The project modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"  # the project has none
            base = node.module
            found.add(base)
            for alias in node.names:
                found.add(f"{base}.{alias.name}")  # a submodule, or a name in `base`
                if base == "mae" and alias.name in mae._HOME:  # imported on first use
                    found.add(mae._HOME[alias.name])
    return {m for m in found if m.split(".")[0] in ("mae", "pipeline") and _file(m, root)}


def _exempt(rel: str, exempt: dict[str, str]) -> bool:
    """`rel` is in `exempt`, or in a folder of it (a key ending in "/")."""
    return rel in exempt or any(k.endswith("/") and rel.startswith(k) for k in exempt)


def _closure(module: str, root: Path = ROOT) -> set[str]:
    todo, seen = [module], set()
    while todo:
        m = todo.pop()
        path = _file(m, root)
        rel = str(path.relative_to(root))
        if rel in seen:
            continue
        seen.add(rel)
        parts = m.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ too
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if not _exempt(rel, CANNOT_CHANGE_OUTPUTS):  # what those import serves them alone
            todo += sorted(_imports(path, root))
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def missing_deps(stage: str, module: str, deps: list[str], root: Path = ROOT) -> list[str]:
    """The files `module` (stage `stage`'s) runs that can change its outputs and that none
    of its `dvc.yaml` deps covers."""
    deps = [d for d in deps if not d.startswith("$")]
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    exempt = CANNOT_CHANGE_OUTPUTS | STAGE_CANNOT_CHANGE.get(stage, {})
    return sorted(f for f in _closure(module, root) if not _exempt(f, exempt) and not covered(f))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_dvc_deps_hold_every_module_it_runs_that_can_change_its_outputs(stage):
    missing = missing_deps(stage, f"pipeline.stages.{stage}", STAGES[stage]["deps"])
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not list them"


def test_the_search_sees_imports_inside_functions_and_mae_names_imported_on_first_use():
    runs = _closure("pipeline.stages.pretrain")
    assert "pipeline/artifacts.py" in runs  # the case: it writes the model folder
    assert "mae/model.py" in runs and "mae/knn.py" in runs
    assert "pipeline/params.py" in _closure("pipeline.stages.shard")


def _stages_reading(key: str) -> set[str]:
    """The stages whose `dvc.yaml` params cover `key` (itself or its whole section)."""
    section = key.split(".")[0]
    return {s for s, v in STAGES.items() if {key, section} & set(v.get("params", []))}


@pytest.mark.parametrize(
    "key, stages",
    [
        ("finetune.trainable_blocks", {"finetune"}),  # not scratch: it trains every block
        ("finetune.epochs", {"finetune", "scratch"}),
        ("pretrain.mask_type", {"pretrain"}),
        ("model.decoder_depth", {"pretrain"}),  # scratch builds the preset's decoder
        ("model.decoder_embed_dim", {"pretrain"}),
        ("model.name", {"pretrain", "scratch", "pixels"}),
        ("linprobe.pool", {"linprobe"}),  # not pixels: the pixels are the feature
        ("linprobe.blr", {"linprobe", "pixels"}),
        # proven not to change results (pipeline/train/runtime.py, RESULTS_NEUTRAL)
        ("runtime.num_workers", set()),
        # few labels: the classifiers, never shard or pretrain (pipeline/data/labels.py)
        ("data.labels", {"finetune", "scratch", "linprobe", "pixels"}),
        ("data.labels_seed", {"finetune", "scratch", "linprobe", "pixels"}),
        ("finetune.min_steps", {"finetune", "scratch"}),
        ("runtime.device", {"pretrain", "finetune", "scratch", "linprobe", "pixels", "evaluate"}),
    ],
)
def test_a_param_reruns_the_stages_that_read_it_and_no_other(key, stages):
    """DVC re-runs the stages listing a changed key, and those downstream of their outputs
    (evaluate after finetune): the key's readers are listed, and none that ignores it."""
    assert _stages_reading(key) == stages


def test_the_scratch_stage_lists_every_finetune_key_it_reads():
    from pipeline.params import FinetuneParams

    listed = {k.removeprefix("finetune.") for k in STAGES["scratch"]["params"]}
    assert set(FinetuneParams.model_fields) - listed == {"trainable_blocks"}
