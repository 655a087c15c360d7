"""The sections of params.yaml as frozen, typed, checked pydantic models: which keys exist,
their types and their ranges (each key's value lives in params.yaml alone). Loading and the
checks across keys: `pipeline.params` (through `pipeline.trainable`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Fraction = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    # strict: YAML's 1 is no bool and "1" no int; floats take ints
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataParams(Section):
    source: Literal["fashion-mnist", "idx", "imagefolder"]
    root: str
    shards: str
    val_fraction: Fraction
    test_fraction: Fraction
    class_names: list[str] | None
    channels: Literal["auto", "1", "3"]
    shard_max_count: Count
    shard_max_mb: Positive
    on_bad_input: Literal["fail", "skip"]
    workers: Annotated[int, Field(ge=0)]
    seed: Annotated[int, Field(ge=0)]
    cache: str
    cache_max_gb: Positive
    in_memory: bool | Literal["auto"]
    labels: int | float | None  # few labels (pipeline/data/labels.py); None: every label
    labels_seed: Annotated[int, Field(ge=0)]

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value}: give images per class (1 or more), a fraction in (0, 1) "
                             "or null (every label)")  # fmt: skip
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"{value}: a fraction of the labels lies in (0, 1); every label is "
                             "null")  # fmt: skip
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and not len(set(names)) == len(names) > 0:
            raise ValueError("must be a non-empty list of distinct names")
        return names

    @field_validator("test_fraction")
    @classmethod
    def _fractions(cls, value: float, info: ValidationInfo) -> float:
        if value + info.data.get("val_fraction", 0) >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return value


def project_root() -> Path:
    """Where relative stores and caches live: `DVC_ROOT` when DVC runs us (in a `dvc exp`
    temporary copy too), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


class ModelParams(Section):
    name: str
    decoder_depth: Count | None  # None: the preset's
    decoder_embed_dim: Count | None

    def overrides(self) -> dict[str, int]:
        """The preset's config keys these params change (`mae.mae_config` overrides)."""
        keys = ("decoder_depth", "decoder_embed_dim")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @field_validator("name")
    @classmethod
    def _preset(cls, name: str) -> str:
        from mae.config import PRESETS, RENAMED

        if name in RENAMED:
            raise ValueError(f"{name!r} is now called {RENAMED[name]!r}")
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
        return name


class Schedule(Section):
    """What every training section has: epochs, warm-up + cosine, batch, base lr."""

    epochs: Count
    warmup_epochs: NonNegative
    batch_size: Count
    blr: Positive
    min_lr: NonNegative
    weight_decay: NonNegative
    log_every: Count

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup(cls, value: float, info: ValidationInfo) -> float:
        if value > info.data.get("epochs", value):
            raise ValueError("must be in [0, epochs]")
        return value


class PretrainParams(Schedule):
    mask_ratio: Fraction
    mask_type: Literal["random", "block", "grid"]  # mae.masking.MASK_TYPES
    norm_pix_loss: bool
    accum_iter: Count
    clip_grad: Positive | None
    recon_every: Count
    probe_every: Annotated[int, Field(ge=0)]
    knn_bank: Count | None
    knn_k: Count
    knn_t: Positive


class FinetuneParams(Schedule):
    min_steps: Annotated[int, Field(ge=0)]  # epochs raised to reach it (`Stage.schedule_for`)
    accum_iter: Count
    layer_decay: Annotated[float, Field(gt=0, le=1)]
    drop_path: Fraction
    smoothing: Fraction
    mixup: NonNegative
    cutmix: NonNegative
    randaugment: bool
    reprob: Fraction
    scale_min: Annotated[float, Field(gt=0, le=1)]
    clip_grad: Positive | None
    trainable_blocks: Annotated[int, Field(ge=0)] | None  # None: every block trains


class LinprobeParams(Schedule):
    min_steps: Annotated[int, Field(ge=0)]
    optimizer: Literal["lars", "sgd"]
    pool: Literal["cls", "avg"]
    augment: bool
    # the values the probe and the pixels control choose lr and weight decay from, on val
    # (`LinearProber.search`); None: blr / weight_decay as set
    grid_blr: list[Positive] | None
    grid_weight_decay: list[NonNegative] | None

    @field_validator("grid_blr", "grid_weight_decay")
    @classmethod
    def _grid(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and (not values or len(set(values)) != len(values)):
            raise ValueError("must be a non-empty list of distinct values, or null")
        return values


class RuntimeParams(Section):
    seed: Annotated[int, Field(ge=0)]
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"]
    num_workers: Annotated[int, Field(ge=0)]
    nproc: Count | Literal["auto"]


# `register` is also the name of ABCMeta.register, a method of the class (not of its
# instances, which read the field): pydantic's warning about it is silenced here alone.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", 'Field name "register"', UserWarning)

    class TrackingParams(Section):
        experiment: str
        uri: str | None
        system_metrics: bool
        register: str | None

        @field_validator("experiment", "register")
        @classmethod
        def _named(cls, name: str | None) -> str | None:
            if name is not None and not name.strip():
                raise ValueError("must not be empty")
            return name

        @field_validator("register")
        @classmethod
        def _model_name(cls, name: str | None) -> str | None:
            """MLflow's rule for registered model names (checked before any work, not
            after training): no '/' or ':', and no name a path would change."""
            if name is not None and ("/" in name or ":" in name):
                raise ValueError(f"{name!r}: MLflow's model names cannot contain '/' or ':'")
            if name is not None and (name in (".", "..") or name.startswith("..")):
                raise ValueError(f"{name!r}: MLflow refuses model names that read as a path")
            return name


class PathsParams(Section):
    models: str  # DVC's outputs: in the workspace DVC runs the stage in (cwd)
    metrics: str
    plots: str
    checkpoints: str  # state outside DVC's outputs: see `checkpoints_dir`

    def checkpoints_dir(self) -> Path:
        """Where checkpoints live: `checkpoints` as given when absolute, else under the
        project root (`project_root`), not the working directory: a queued or `--temp`
        DVC experiment runs in a copy that DVC deletes when the run fails or is stopped
        (treeverse/dvc#8612), and its checkpoints must outlive it to resume."""
        path = Path(self.checkpoints)
        return path if path.is_absolute() else project_root() / path


class Params(Section):
    data: DataParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    linprobe: LinprobeParams
    runtime: RuntimeParams
    tracking: TrackingParams
    paths: PathsParams
