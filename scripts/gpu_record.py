"""The GPU recipe in one call, for a GPU machine leased for minutes (no DVC, no installs):
shard, pretrain, finetune, scratch, linprobe, pixels and evaluate as `mae-cli` runs them,
then the figures as JSON: minutes, img/s and data wait per stage, test top-1 of every
classifier, `mae_gain`, `probe_gain`, the device and the software.

    python scripts/gpu_record.py OUT [--data-root DIR] [--set section.key=value ...]
                                     [--work DIR] [--bench] [--commit SHA]

Params: params.yaml, then recipes/fashion-mnist-gpu.yaml (`--recipe`), then each `--set`
(a cut schedule for a CPU rehearsal: `tests/test_gpu_record.py`). Stage outputs, the MLflow
store and the checkpoints go to `--work` (default `.gpu-run`, recreated); OUT gets only the
figures: `record.json`, rewritten after every stage (a run cut short still says how far it
got), and each stage's log. A stage still running after `--minutes` (default 9: a GPU
lease cuts a call at 10) is stopped. `--bench` adds `mae-cli bench step` on the recipe's
model fed by the streaming loader and by the split held in memory, side by side, when a
minute and a half is left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("shard", "pretrain", "finetune", "scratch", "linprobe", "pixels", "evaluate")
NEEDED = ("torch", "torchvision", "timm", "mlflow", "pydantic", "typer", "yaml", "safetensors")


def main() -> int:
    args = _args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.minutes * 60
    record = {"what": "the GPU recipe in one call (scripts/gpu_record.py)"}
    missing = [m for m in NEEDED if not _importable(m)]
    if missing:
        return _fail(out, record, f"missing Python packages: {', '.join(missing)}", 2)
    record |= _machine(args)
    work = Path(args.work).resolve()
    if work == ROOT or work in ROOT.parents or (work / ".git").exists():
        return _fail(out, record, f"--work {work}: not a folder to empty", 2)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        record["params"] = _write_params(work / "params.yaml", args)
    except Exception as err:  # a bad --set or recipe: said in the record too
        return _fail(out, record, f"params: {err}", 2)
    record["stages"], start = {}, time.perf_counter()
    for stage in STAGES:
        ok = _run_stage(stage, work, out, record, deadline)
        record["total_minutes"] = (time.perf_counter() - start) / 60
        _save(out, record)
        if not ok:
            return 1
    record["results"] = _results(work)
    _save(out, record)
    if args.bench and deadline - time.monotonic() > 90:  # two benches: about a minute
        record["bench"] = [_bench(work, record["params"], data) for data in ("shards", "memory")]
        _save(out, record)
    print(json.dumps(record["results"], indent=1))
    return 0


def _fail(out: Path, record: dict, error: str, code: int) -> int:
    record["error"] = error
    _save(out, record)
    print(error, file=sys.stderr)
    return code


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="where record.json and the logs go")
    ap.add_argument("--data-root", help="the Fashion-MNIST files (default: params.yaml's)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/fashion-mnist-gpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--work", default=str(ROOT / ".gpu-run"))
    ap.add_argument("--bench", action="store_true", help="also the streaming vs held step")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT"), help="default: git's")
    ap.add_argument("--minutes", type=float, default=9.0, help="stop a stage past this")
    return ap.parse_args()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _machine(args: argparse.Namespace) -> dict:
    """The device and software, asked in a child process: this one holds no CUDA context."""
    probe = (
        "import os, platform, torch; c = torch.cuda.is_available(); p = c and "
        "torch.cuda.get_device_properties(0); print(f'{p.name} ({p.total_memory // 2**20} MiB)'"
        " if c else f'CPU ({platform.processor() or platform.machine()})'); "
        "print(f'python {platform.python_version()}, torch {torch.__version__}' + "
        "(f', cuda {torch.version.cuda}' if c else ''))"
    )
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    device, software = [*said.stdout.splitlines(), "unknown", "unknown"][:2]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": f"{device}, {os.cpu_count()} CPU cores",
        "software": software,
        "command": " ".join(["python", "scripts/gpu_record.py", *sys.argv[1:]]),
        "commit": args.commit or _git("rev-parse", "HEAD"),
    }


def _git(*argv: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _write_params(path: Path, args: argparse.Namespace) -> dict:
    """params.yaml + the recipe + `--set`, checked like params.yaml, written to `path`;
    every output and the MLflow store inside the work folder."""
    import yaml

    from pipeline.params import flatten, merge, parse_params
    from pipeline.params_yaml import load_yaml, read_yaml

    params = merge(read_yaml(ROOT / "params.yaml"), read_yaml(args.recipe) or {})
    sets = [f"data.root={args.data_root}"] if args.data_root else []
    for item in sets + args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        params = merge(params, {section: {name: load_yaml(value)}})
    root = params["data"]["root"]
    params["data"]["root"] = str(Path(root).resolve()) if not Path(root).is_absolute() else root
    params["tracking"]["uri"] = f"sqlite:///{path.parent / 'mlflow.db'}"
    parse_params(params)  # a bad key stops here, named
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return flatten(parse_params(params))


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip


def _run_stage(stage: str, work: Path, out: Path, record: dict, deadline: float) -> bool:
    start = time.perf_counter()
    argv = [sys.executable, "-m", "pipeline.cli", stage, "--params", "params.yaml"]
    with open(out / f"{stage}.log", "w") as log:
        try:
            code = subprocess.call(
                argv,
                cwd=work,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(deadline - time.monotonic(), 1),
            )
        except subprocess.TimeoutExpired:
            code = "timed out"  # past --minutes: the record says how far it got
    entry = {"wall_s": round(time.perf_counter() - start, 1), "exit": code}
    metrics = work / "metrics" / f"{stage}.json"
    if code == 0 and metrics.is_file():
        entry["metrics"] = json.loads(metrics.read_text())
    if code != 0:
        entry["log_tail"] = (out / f"{stage}.log").read_text().splitlines()[-5:]
    record["stages"][stage] = entry
    print(f"{stage}: exit {code} in {entry['wall_s']} s", flush=True)
    return code == 0


def _results(work: Path) -> dict:
    """The headline figures: test top-1 per classifier, both gains, k-NN, speed per stage."""
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    gains = ("mae_gain", "probe_gain")
    out = {k: v for k, v in evaluated.items() if k.endswith("_top1") or k in gains}
    for stage in ("pretrain", "finetune", "scratch", "linprobe", "pixels"):
        m = json.loads((work / "metrics" / f"{stage}.json").read_text())
        out[stage] = {k: m[k] for k in ("minutes", "img_per_s", "data_wait") if k in m}
        if "knn_top1" in m:
            out[stage]["knn_top1"] = m["knn_top1"]
    return out


def _bench(work: Path, params: dict, data: str) -> dict:
    model, batch = params["model.name"], str(params["pretrain.batch_size"])
    argv = [sys.executable, "-m", "pipeline.cli", "bench", "step", "--params", "params.yaml",
            "--model", model, "--batch-size", batch, "--steps", "20", "--warmup", "5",
            "--data", data, "--no-baseline", "--json"]  # fmt: skip
    try:
        done = subprocess.run(
            argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return {"data": data, "error": "timed out after 120 s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"data": data, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _save(out: Path, record: dict) -> None:
    tmp = out / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / "record.json")


if __name__ == "__main__":
    sys.exit(main())
