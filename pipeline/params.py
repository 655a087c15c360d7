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
    name: str = "mae_vit_tiny_patch7_28"  # a preset from `mae-cli models`

    def __post_init__(self) -> None:
        from mae.config import PRESETS

        _require(
            self.name in PRESETS,
            "name",
            f"unknown model {self.name!r}; choose one of: {', '.join(PRESETS)}",
        )


@dataclass(frozen=True)
class PretrainParams:
    mask_ratio: float = 0.75  # fraction of patches removed (the paper's 75%)
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (paper Table 1c)
    epochs: int = 7
    warmup_epochs: float = 1.0  # linear warm-up, then half-cycle cosine
    batch_size: int = 256  # per device and step
    accum_iter: int = 1  # gradient accumulation: effective batch = batch_size x accum x ranks
    blr: float = 1.5e-3  # base lr; lr = blr x effective batch / 256 (10x the paper's)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float | None = None  # max gradient norm; null = no clipping
    log_every: int = 10  # optimizer steps between train/loss, train/lr points
    recon_every: int = 2  # epochs between reconstruction grids (and one at the end)
    probe_every: int = 4  # epochs between k-NN probes on val (and one at the end); 0: off
    knn_bank: int | None = 10000  # train images in the bank (a fixed random subset); None: all
    knn_k: int = 20  # neighbours that vote
    knn_t: float = 0.07  # vote weight exp(cosine similarity / knn_t)

    def __post_init__(self) -> None:
        _require(0 <= self.mask_ratio < 1, "mask_ratio", "must be in [0, 1)")
        _common_checks(self)
        _require(self.recon_every >= 1, "recon_every", "must be at least 1")
        _require(self.probe_every >= 0, "probe_every", "must be 0 (off) or more")
        _require(self.knn_k >= 1, "knn_k", "must be at least 1")
        _require(self.knn_bank is None or self.knn_bank >= 1, "knn_bank", "must be null or >= 1")
        _require(self.knn_t > 0, "knn_t", "must be positive")


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = 2
    warmup_epochs: float = 0.5
    batch_size: int = 256  # per device and step
    accum_iter: int = 1
    blr: float = 2e-3  # lr = blr x effective batch / 256 (the official fine-tuning rule)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.85  # layer-wise lr decay (BEiT/MAE)
    drop_path: float = 0.1
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    randaugment: bool = False  # RandAugment(2, 9) (per-image CPU path)
    reprob: float = 0.0  # random erasing probability (per-image CPU path)
    scale_min: float = 0.6  # RandomResizedCrop scale (min, 1)
    clip_grad: float | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        _common_checks(self)
        _require(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        for key in ("drop_path", "smoothing", "reprob"):
            _require(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")
        for key in ("mixup", "cutmix"):
            _require(getattr(self, key) >= 0, key, "must be 0 or more")
        _require(0 < self.scale_min <= 1, "scale_min", "must be in (0, 1]")


@dataclass(frozen=True)
class LinprobeParams:
    epochs: int = 60  # cheap with cached features
    warmup_epochs: float = 3.0
    batch_size: int = 512
    blr: float = 3.0  # lr = blr x batch / 256 (LARS, as the paper's linear probe)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    optimizer: Literal["lars", "sgd"] = "lars"
    pool: Literal["cls", "avg"] = "avg"  # the feature: patch average or cls token (paper)
    augment: bool = False  # false: encoder features computed once and cached
    log_every: int = 10

    def __post_init__(self) -> None:
        _common_checks(self)


def _common_checks(p) -> None:
    """The schedule and optimizer keys the training sections share (those they have)."""
    _require(p.epochs >= 1, "epochs", "must be at least 1")
    _require(0 <= p.warmup_epochs <= p.epochs, "warmup_epochs", "must be in [0, epochs]")
    for key in ("batch_size", "accum_iter", "log_every"):
        _require(getattr(p, key, 1) >= 1, key, "must be at least 1")
    for key in ("min_lr", "weight_decay"):
        _require(getattr(p, key) >= 0, key, "must be 0 or more")
    _require(p.blr > 0, "blr", "must be positive")
    clip = getattr(p, "clip_grad", None)
    _require(clip is None or clip > 0, "clip_grad", "must be positive or null")


@dataclass(frozen=True)
class RuntimeParams:
    seed: int = 0  # model init, masking, data order, augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    num_workers: int = 1  # data loader processes per rank (0: load in the training process)
    nproc: int | Literal["auto"] = "auto"  # ranks on this machine (auto: one per GPU, 1 on CPU)

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "num_workers", "must be 0 or more")
        _require(self.nproc == "auto" or self.nproc >= 1, "nproc", "must be auto or at least 1")


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "mae"  # MLflow experiment
    uri: str | None = None  # null: sqlite:///<project>/mlflow.db; MLFLOW_TRACKING_URI wins

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "experiment", "must not be empty")


@dataclass(frozen=True)
class PathsParams:
    models: str = "models"  # <models>/<stage>/: weights, config, run_id
    metrics: str = "metrics"  # <metrics>/<stage>.json
    plots: str = "plots"  # <plots>/<stage>/: curves as CSV (for dvc plots) and PNG
    checkpoints: str = ".checkpoints"  # resume state, keyed by params; not a DVC output


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    linprobe: LinprobeParams = field(default_factory=LinprobeParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    paths: PathsParams = field(default_factory=PathsParams)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A params dataclass as {"section.key": value}, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


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
