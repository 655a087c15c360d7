"""`mae-cli ui`: the MLflow UI for a project's store on 127.0.0.1, and the pages it opens."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.tracking.store import connect, resolve_uri

HOST = "127.0.0.1"


def ui_command(p: Params, port: int) -> tuple[list[str], list[str]]:
    """The store's experiment made if missing, the port checked free; -> (the lines to print:
    the store and the pages of the experiment's runs, the `mlflow ui` command to run).
    Raises UserError for a port in use (`check_port`) or a store that does not answer."""
    check_port(port)
    uri, experiment_id = resolve_uri(p.tracking), connect(p.tracking)
    base = f"http://{HOST}:{port}"
    lines = [
        f"MLflow UI for {uri} at {base}",
        f"experiment {p.tracking.experiment!r}, its training runs: "
        f"{runs_address(base, experiment_id)}",
        "the pretrain runs (one per mask ratio) side by side in charts: "
        f"{runs_address(base, experiment_id, stage='pretrain', charts=True)}",
    ]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return lines, [mlflow, "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]


def check_port(port: int, host: str = HOST) -> None:
    """UserError when something listens on `host:port` already (another `mae-cli ui`, an
    `mlflow server`), naming the nearest free port above it. `mlflow ui` itself logs
    "Address already in use" among its start-up lines and exits 0, and the addresses printed
    before it would open whatever answers there."""
    if _bindable(host, port):
        return
    spare = next((q for q in range(port + 1, min(port + 100, 65536)) if _bindable(host, q)), None)
    what = f"take a free one, e.g. --port {spare}" if spare else "pick another with --port"
    raise UserError(
        f"port {port} on {host} is in use (another `mae-cli ui` or MLflow server?): stop it "
        f"or {what}"
    )


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # as uvicorn binds for `mlflow ui`: a port whose last connection is in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def runs_address(base: str, experiment_id: str, stage: str | None = None, charts=False) -> str:
    """The MLflow UI's page of an experiment's training runs (its table, or its chart view,
    of the runs of one `stage`). MLflow 3's UI opens an experiment on a GenAI "Overview" of
    traces (seen in Chromium with MLflow 3.17, whatever the experiment's tags)."""
    from urllib.parse import quote, urlencode

    query = {"compareRunsMode": "CHART"} if charts else {}
    query |= {"searchFilter": f"tags.stage = '{stage}'"} if stage else {}
    address = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{address}?{urlencode(query, quote_via=quote)}" if query else address
