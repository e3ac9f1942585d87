"""``ftkit board``: a web page to watch, compare and launch runs, over the files the runs already write.

Read in this order: ``runs`` (finding runs under the root, their status, logs and configs) -> ``launcher``
(``ftkit train`` as a subprocess: launch, stop, resume) -> ``data_view`` and ``tryout`` (the Data and Try
tabs) -> ``app`` (the routes) ; the page itself is ``static/`` (plain HTML and JavaScript, no build step,
with uPlot vendored for the charts: MIT licence in ``static/vendor/uplot/LICENSE``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ftkit.errors import FtkitError
from ftkit.http_server import is_loopback

console = Console(stderr=True, highlight=False)
TOKEN_ENV = "FTKIT_BOARD_TOKEN"


def _say(message: str) -> None:
    console.print(f"[bold cyan]ftkit[/] {escape(message)}", soft_wrap=True)


def build_board(root: str | Path, *, host: str = "127.0.0.1", token: str | None = None,
                dataset_dir: str | Path = "data", configs_dir: str | Path | None = "configs",
                workdir: str | Path | None = None):
    """The board's state for ``root``: checked (the folder, the token off loopback), nothing served yet."""
    from ftkit.board.app import BoardState
    from ftkit.board.data_view import DataView
    from ftkit.board.launcher import Launcher

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise FtkitError(f"--host {host} lets other machines reach the board, which can launch and stop runs; "
                         f"pass --token SECRET (or set {TOKEN_ENV}), or keep the default --host 127.0.0.1.")
    if token is not None and len(token) < 8:
        raise FtkitError("--token is shorter than 8 characters; use a longer secret (for example the output of "
                         "`python -c 'import secrets; print(secrets.token_urlsafe())'`).")
    workdir = Path(workdir or Path.cwd()).resolve()
    root_path = (workdir / Path(root).expanduser())
    if root_path.exists() and not root_path.is_dir():
        raise FtkitError(f"--root {root} is a file; give the folder your runs' output_dirs are under (for example "
                         "saves).")
    root_path.mkdir(parents=True, exist_ok=True)
    root_path = root_path.resolve()
    configs = (workdir / configs_dir) if configs_dir else None
    return BoardState(root=root_path, launcher=Launcher(root_path, workdir), data=DataView(workdir / dataset_dir),
                      configs_dir=configs, token=token)


def run_board(root: str, *, host: str, port: int, token: str | None, dataset_dir: str, configs_dir: str) -> None:
    """Serve the board until SIGTERM or SIGINT; runs it launched keep running."""
    from ftkit.board.app import create_app
    from ftkit.http_server import HttpServer, bind_socket

    started = time.monotonic()
    state = build_board(root, host=host, token=token, dataset_dir=dataset_dir, configs_dir=configs_dir)
    sock = bind_socket(host, port)
    try:
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        suffix = "/?token=…" if state.token else "/"
        _say(f"board over {state.root} ready in {time.monotonic() - started:.1f} s: http://{url_host}:{bound_port}"
             f"{suffix} ; Ctrl-C stops it (runs it launched keep training)")
        HttpServer(create_app(state), shutdown_timeout=1).serve(sock)
    finally:
        sock.close()
    _say("stopped")
