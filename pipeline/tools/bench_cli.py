"""`mae-cli bench`: throughput figures (img/s) of the training step, the loaders and the
shard stage (`pipeline/tools/bench.py`, `bench_data.py`). Choices come from the params
types; heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import typer

from pipeline.errors import UserError

bench_app = typer.Typer(help="Throughput figures (img/s).", no_args_is_help=True)
PARAMS = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")


def literal(section: type, key: str) -> tuple[str, ...]:
    """The string choices of a params key's type (its Literal, even inside a union)."""
    annotation = section.model_fields[key].annotation
    found = [a for arg in get_args(annotation) or (annotation,) for a in get_args(arg) or (arg,)]
    return tuple(a for a in found if isinstance(a, str))


def choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}, got {value!r}")


# `bench step`'s options that need more than a default and a bound
PRECISION = typer.Option(
    "auto",
    help="auto (bf16 on CUDA), fp32, bf16, or fp16: the official code's step (fp16 autocast, "
    "loss scaling, foreach AdamW), CUDA only.",
)
COMPILE_MODE = typer.Option(
    "default", help="With --compile: default, reduce-overhead (CUDA graphs), max-autotune."
)
STEP_DATA = typer.Option(
    "synthetic",
    help="synthetic (one batch on the device), shards (streamed from data.shards) or memory "
    "(the train split held on the device).",
)
BASELINE = typer.Option(
    True, "--baseline/--no-baseline", help="Also time mask tokens through the encoder."
)


@bench_app.command("step")
def bench_step(
    model: str = typer.Option("mae_vit_mini_patch4_28", help="A name from `mae-cli models`."),
    img_size: int = typer.Option(None, help="Image side in pixels (default: the model's)."),
    batch_size: int = typer.Option(256, min=1),
    mask_ratio: float = typer.Option(0.75, help="Fraction of patches removed, in [0, 1)."),
    steps: int = typer.Option(10, min=1, help="Timed steps."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first (compilation happens here)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    precision: str = PRECISION,
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile."),
    compile_mode: str = COMPILE_MODE,
    data: str = STEP_DATA,
    params: Path = PARAMS,
    baseline: bool = BASELINE,
    peak_tflops: float = typer.Option(None, help="The device's bf16 peak, if not in the table."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Training-step figures: img/s, data wait vs compute, peak memory, MFU, and the speed-up
    of the encoder on visible patches only over mask tokens through the encoder."""
    import json

    from pipeline.params import RuntimeParams
    from pipeline.tools.bench import StepOptions, bench_train_step, shards_loader

    choice("--precision", precision, (*literal(RuntimeParams, "precision"), "fp16"))
    choice("--data", data, ("synthetic", "shards", "memory"))
    choice("--compile-mode", compile_mode, literal(RuntimeParams, "compile"))
    compiled = compile_mode if compile else False
    try:
        loader = None
        if data != "synthetic":
            loader = shards_loader(params, model, img_size, batch_size, data == "memory", device)
        options = StepOptions(
            model, batch_size, mask_ratio=mask_ratio, steps=steps, warmup=warmup, device=device,
            precision=precision, compile=compiled, img_size=img_size, baseline=baseline,
            peak_tflops=peak_tflops,
        )  # fmt: skip
        result = bench_train_step(options, loader)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(json.dumps(result.to_dict()) if as_json else result.line())


def _counts(option: str, value: str) -> list[int]:
    try:
        return [int(w) for w in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{option} must be integers like 0,1,2, got {value!r}") from None


@bench_app.command("data")
def bench_data(
    params: Path = PARAMS,
    workers: str = typer.Option("0,1,2", help="Comma-separated worker counts to measure."),
    batch_size: int = typer.Option(256, min=1),
    augmentation: str = typer.Option("pretrain", help="pretrain, finetune or eval transforms."),
    images: int = typer.Option(20_000, min=1, help="Images to read per measurement."),
    img_size: int = typer.Option(None, min=1, help="Output size (default: the model's)."),
    reader: str = typer.Option(
        "mae",
        help="mae (this loader, streaming), memory (it, over the split held in memory), "
        "webdataset (a plain pipeline, same transform), both (mae and webdataset) or all.",
    ),
    device_crop: bool = typer.Option(
        True, help="Count the batched crop and flip that a GPU runs on the device (here: CPU)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Loader throughput on the train shards (data.shards) for each worker count."""
    from pipeline.data.plan import Augmentation

    choice("--augmentation", augmentation, get_args(Augmentation))
    choices = {"mae": ["mae"], "memory": ["memory"], "webdataset": ["webdataset"]}
    choices |= {"both": ["mae", "webdataset"], "all": ["mae", "memory", "webdataset"]}
    choice("--reader", reader, tuple(choices))
    import json

    from mae import mae_config
    from pipeline.data.store import shard_store
    from pipeline.params import load_params
    from pipeline.tools.bench_data import bench_loader

    p = load_params(params)
    size = img_size or mae_config(p.model.name).image_hw[0]
    readers = choices[reader]
    for n in _counts("--workers", workers):
        for r in readers:
            try:
                store = shard_store(p.data)
                result = bench_loader(
                    store, size, n, batch_size, augmentation, images, r, device_crop
                )
            except ValueError as err:
                raise typer.BadParameter(str(err)) from None
            typer.echo(json.dumps(result.to_dict()) if as_json else result.line())


@bench_app.command("shard")
def bench_shard(
    params: Path = PARAMS,
    root: str = typer.Option(None, help="The source to shard (default: data.root)."),
    source: str = typer.Option(
        None, help="fashion-mnist, idx or imagefolder (default: data.source)."
    ),
    workers: str = typer.Option("1,2", help="Comma-separated worker counts to measure."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """The shard stage's img/s and peak memory on a source, into a temporary folder."""
    from pipeline.params import DataParams

    if source is not None:
        choice("--source", source, literal(DataParams, "source"))
    import json

    from pipeline.params import load_params
    from pipeline.tools.bench_data import bench_shard as measure

    p = load_params(params)
    data = p.data.model_copy(
        update={"root": root or p.data.root, "source": source or p.data.source}
    )
    for n in _counts("--workers", workers):
        try:
            result = measure(data, n)
        except ValueError as err:
            raise UserError(str(err)) from None
        typer.echo(json.dumps(result.to_dict()) if as_json else result.line())
