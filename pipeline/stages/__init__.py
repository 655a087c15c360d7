"""The DVC stages, listed once here: `mae-cli` has a command for each training stage below,
and `evaluate` tests the model of each one marked `classifier`. Each module holds only what
its stage does differently (`pipeline.train.stage` runs them all). The README's
"Adding a stage" says what else a new stage needs (its params section, its `dvc.yaml`
stanza)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class TrainingStage:
    name: str  # the command, the MLflow tag `stage`, the folder under models/, metrics/, plots/
    stage_class: str  # "module:Class": its `train.stage.Stage`, imported when it runs
    help: str  # the command's help: what it reads and writes
    classifier: bool = False  # writes a classifier (models/<name>) that `evaluate` tests


TRAINING_STAGES = (
    TrainingStage(
        "pretrain",
        "pipeline.stages.pretrain:Pretrainer",
        "MAE pretraining on the train shards -> models/pretrain/, metrics, MLflow run.",
    ),
    TrainingStage(
        "finetune",
        "pipeline.stages.finetune:Finetuner",
        "Fine-tune the pretrained encoder as a classifier -> models/finetune/, MLflow child run.",
        classifier=True,
    ),
    TrainingStage(
        "linprobe",
        "pipeline.stages.linprobe:LinearProber",
        "Linear probe on the frozen encoder -> models/linprobe/, MLflow child run.",
        classifier=True,
    ),
    TrainingStage(
        "scratch",
        "pipeline.stages.scratch:ScratchFinetuner",
        "The control: finetune's recipe from a random encoder -> models/scratch/, MLflow run.",
        classifier=True,
    ),
    TrainingStage(
        "pixels",
        "pipeline.stages.pixels:PixelProber",
        "The probe's control: linprobe's head and recipe on raw pixels -> models/pixels/.",
        classifier=True,
    ),
)
CLASSIFIER_STAGES = tuple(s.name for s in TRAINING_STAGES if s.classifier)


def stage_class(name: str) -> type:
    """The `Stage` subclass of training stage `name`; KeyError if there is none."""
    for entry in TRAINING_STAGES:
        if entry.name == name:
            module, cls = entry.stage_class.split(":")
            return getattr(import_module(module), cls)
    raise KeyError(f"no training stage {name!r}")


def run_training(name: str, p) -> str:
    """Train stage `name` with params `p` (`pipeline.params.Params`) here; -> its MLflow run
    id (None on ranks other than 0)."""
    from pipeline.train.stage import run_stage

    return run_stage(stage_class(name), p)
