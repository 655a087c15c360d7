"""`mae-cli`: one sub-command per DVC stage, plus tools around them.

Heavy imports (torch, timm, mlflow) happen inside command bodies so `mae-cli --help`
stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from pipeline.errors import UserError, os_error_text
from pipeline.stages import TRAINING_STAGES
from pipeline.tools.bench_cli import bench_app

app = typer.Typer(
    help="Masked Autoencoder pipeline: shard, pretrain, finetune, linprobe, scratch, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain, one-line errors
)


@app.callback()
def _root() -> None:
    """Masked Autoencoder pipeline: shard, pretrain, finetune, linprobe, scratch, evaluate.

    Each stage reads params.yaml and is run by `dvc repro`; see the README.
    """
    # A callback keeps sub-commands as sub-commands even while there is only one.
    # MLflow's download bars would fill the logs of every stage and command.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


PARAMS = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")


@app.command()
def shard(params: Path = PARAMS) -> None:
    """Raw source (data.source) -> WebDataset shards + manifest.json (data.shards)."""
    from pipeline.data.manifest import skipped_count
    from pipeline.params import load_params
    from pipeline.stages.shard import run_shard_stage

    p = load_params(params)
    manifest = run_shard_stage(p)
    counts = ", ".join(
        f"{s} {v['count']:,} ({len(v['shards'])} shards)" for s, v in manifest["splits"].items()
    )
    typer.echo(f"wrote {p.data.shards}: {counts}; {skipped_count(manifest)} skipped")


@app.command("list-images")
def list_images(
    root: Path = typer.Argument(..., help="The ImageFolder: root/<class>/<image>."),
    output: Path = typer.Argument(..., help="The listing to write, e.g. data/raw.listing.json."),
) -> None:
    """List an ImageFolder for `data.root`: DVC then hashes this small file, not the
    folder (cheap `dvc status` and queued experiments); the shard stage refuses an image
    changed since. Re-run it after changing the folder (docs/data.md)."""
    from pipeline.data.listing import write_listing

    counts = write_listing(root, output)
    summary = ", ".join(f"{split} {n:,}" for split, n in counts.items())
    typer.echo(f"wrote {output}: {summary} images; set data.root: {output}")


def _train(stage: str, params: Path) -> None:
    """Run a training stage: here, or as `runtime.nproc` ranks when that is above 1 and
    this process is not already one rank of a torchrun launch."""
    from pipeline.params import load_params
    from pipeline.stages import run_training
    from pipeline.train import distributed

    p = load_params(params)
    nproc = distributed.resolve_nproc(p.runtime.nproc, p.runtime.device)
    if nproc > 1 and not distributed.launched():
        from pipeline.tracking import connect

        connect(p.tracking)  # an unreachable store fails once, here, not on every rank
        code = distributed.launch(nproc, [stage, "--params", str(params)])
        if code:
            raise typer.Exit(code)
        return
    try:
        run_id = run_training(stage, p)
    finally:
        distributed.shutdown()
    if run_id:  # rank 0
        typer.echo(f"{stage} done: MLflow run {run_id}")


def _training_command(stage: str):
    def command(params: Path = PARAMS) -> None:
        _train(stage, params)

    return command


for _stage in TRAINING_STAGES:  # one command per training stage, in the registry's order
    app.command(name=_stage.name, help=_stage.help)(_training_command(_stage.name))


@app.command()
def evaluate(
    params: Path = PARAMS,
    run_id: str = typer.Option(
        None,
        "--run-id",
        help="A finetune, linprobe, scratch or pretrain run; "
        "default: this workspace's finetune, linprobe and scratch models.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    predictions: Path = typer.Option(
        None,
        "--predictions",
        help="A folder: write each test image's class probabilities to <run id>.csv there.",
    ),
) -> None:
    """Test-split top-1/top-5, per-class accuracy and confusion matrix of a tracked model."""
    if run_id is not None and not run_id.strip():
        raise typer.BadParameter("--run-id is empty; leave it out to evaluate this workspace")
    import json

    from pipeline import reports
    from pipeline.params import load_params
    from pipeline.stages.evaluate import evaluate_run, evaluate_stage, format_result

    p = load_params(params)
    per_image = predictions is not None
    results = (
        evaluate_run(p, run_id, per_image=per_image) if run_id else evaluate_stage(p, per_image)
    )
    if per_image:
        for r in results:
            path = predictions / f"{r['run_id']}.csv"
            reports.write_predictions(path, r.pop("images"), r["classes"])
            typer.echo(
                f"{r['stage']} run {r['run_id']}: per-image probabilities in {path}", err=True
            )
    if as_json:
        typer.echo(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        typer.echo("\n\n".join(format_result(r) for r in results))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them."),
    run_id: str = typer.Option(None, "--run-id", help="A finetune, linprobe or scratch run."),
    model_uri: str = typer.Option(
        None, "--model-uri", help="An MLflow model, e.g. models:/<name>@champion."
    ),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Classes per image, most likely first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    params: Path = PARAMS,
) -> None:
    """Classify images (any size and mode) with a tracked classifier: one line per image."""
    if (run_id is None) == (model_uri is None):
        raise typer.BadParameter("give one of --run-id and --model-uri")
    import json

    from pipeline.params import load_params
    from pipeline.predict import format_row, image_files, load_model, predict, read_image

    p = load_params(params)
    files = image_files(images)
    data = [read_image(f) for f in files]
    model = load_model(p, run_id, model_uri)
    rows = predict(model, files, data, top_k)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo("\n".join(format_row(r) for r in rows))


@app.command()
def compare(
    params: Path = PARAMS,
    by: str = typer.Option(
        None,
        "--by",
        help="The key compared, e.g. pretrain.mask_type, finetune.trainable_blocks; "
        "default: pretrain.mask_ratio, or the one key that varies.",
    ),
    experiment: str = typer.Option(
        None, "--experiment", help="The MLflow experiment; default: tracking.experiment."
    ),
    out: Path = typer.Option(Path("plots/compare.png"), help="Where to write the plot."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """A setting (the mask ratio, or --by KEY) vs finetune/linprobe/scratch test top-1,
    mae_gain and k-NN across the tracked pretrain runs; runs that differ in more than
    that key form separate series."""
    import json

    from pipeline.params import load_params
    from pipeline.tools.compare import compare_rows
    from pipeline.tools.compare_report import format_rows, plot_rows

    rows = compare_rows(load_params(params), by, experiment)
    plot_rows(rows, out)
    if as_json:
        nan_free = [{k: (None if v != v else v) for k, v in r.items()} for r in rows]
        typer.echo(json.dumps(nan_free, indent=2))
    else:
        typer.echo(format_rows(rows))
        typer.echo(f"plot: {out}")


@app.command()
def ui(
    params: Path = PARAMS,
    port: int = typer.Option(5000, min=1, max=65535, help="Port on 127.0.0.1."),
) -> None:
    """The MLflow UI for this project's tracking store, on 127.0.0.1."""
    import os

    from pipeline.params import load_params
    from pipeline.tracking import ui_command

    lines, command = ui_command(load_params(params), port)
    for line in lines:
        typer.echo(line)
    os.execv(command[0], command)


@app.command()
def models() -> None:
    """List the named model configurations and their parameter counts."""
    from mae import PRESETS, count_parameters

    header = (
        f"{'name':<26} {'image':>9} {'patch':>5} {'chans':>5} {'encoder':>13} "
        f"{'decoder':>12} {'params':>13}"
    )
    typer.echo(header)
    for name, cfg in PRESETS.items():
        h, w = cfg.image_hw
        enc = f"{cfg.embed_dim}x{cfg.depth} h{cfg.num_heads}"
        dec = f"{cfg.decoder_embed_dim}x{cfg.decoder_depth} h{cfg.decoder_num_heads}"
        typer.echo(
            f"{name:<26} {f'{h}x{w}':>9} {cfg.patch_size:>5} {cfg.in_chans:>5} "
            f"{enc:>13} {dec:>12} {count_parameters(cfg):>13,}"
        )


app.add_typer(bench_app, name="bench")


def main() -> None:
    # MLflow's usage telemetry stays off unless the user turns it on
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    try:
        app()
    except (UserError, OSError) as err:  # OSError: a read-only folder, a full disk, ...
        where = "" if rank == "0" else f" (rank {rank})"
        message = str(err) if isinstance(err, UserError) else os_error_text(err)
        typer.echo(f"mae-cli: error{where}: {message}{_put_back(rank)}", err=True)
        sys.exit(1)
    except SystemExit as done:  # click ends every command with one
        if done.code not in (0, None):
            _put_back(rank)
        raise
    except BaseException:  # Ctrl-C, or a bug: the outputs come back all the same
        _put_back(rank)
        raise


def _put_back(rank: str) -> str:
    """Under `dvc repro` / `dvc exp run`, a failed stage's outputs that DVC removed before
    it ran, put back (`pipeline.kept`); -> what the error line adds about them."""
    from pipeline import kept

    stage = os.environ.get("DVC_STAGE")
    if not stage or rank != "0":
        return ""
    back = kept.put_back()
    if back is None:
        return (
            "; dvc removes a stage's outputs before it runs: "
            f"`dvc checkout {stage}` brings back its last ones"
        )
    return (
        f"; the outputs dvc removed before the stage ran are back: {', '.join(back)}"
        if back
        else ""
    )


if __name__ == "__main__":  # `python -m pipeline.cli`: what torchrun and the launcher run
    main()
