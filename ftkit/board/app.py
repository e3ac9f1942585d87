"""The board's HTTP routes: one static page and a small JSON API over the runs' own files.

Run ids travel as a query parameter (``/api/run?id=saves/a``) so ids with slashes need no escaping.
Every refusal is ``{"error": sentence}`` with a 4xx status (a config's problems also as ``problems``);
nothing a request sends can make the board read or serve a path outside its root (``ftkit.board.runs``).

Security: with a token (required off loopback), every request, page and API alike, must carry it: an
``Authorization: Bearer`` header, the ``ftkit_board`` cookie, or ``?token=`` (which sets the cookie, so the
page's own requests and its event stream carry it). Without a token, a request must name the board by a
loopback address in its ``Host`` header (a web site that rebinds its own name to 127.0.0.1 is refused).
Requests that change something (POST) must be JSON and, when the browser sends an ``Origin``, come from the
board's own, so another web site open in the same browser cannot launch or stop runs; the page may not
be framed by another site. Responses never hold NaN or Infinity (a diverged loss reads as null).

Live updates are server-sent events (``/api/events``): the log is polled every ``POLL_S`` on the server
and each new batch of records is sent as columns, with the run's status when it changes. Each log event
carries its cursor as the event id, so a browser that reconnects continues from there, not from the start.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ftkit.board import runs
from ftkit.board.data_view import PREVIEW_TEMPLATES, DataView
from ftkit.board.launcher import Launcher, console_tail
from ftkit.board.runs import BoardError, Curves, finite
from ftkit.board.tryout import Tryout
from ftkit.config import TrainConfig
from ftkit.http_server import bearer_matches, is_loopback

STATIC = Path(__file__).parent / "static"
COOKIE = "ftkit_board"
POLL_S = 0.5
KEEPALIVE_S = 15.0
CONFIG_SUFFIXES = (".yaml", ".yml")
_MANY_IDS = Query([])
DEFAULT_MODEL_NAME = TrainConfig.model_fields["model_name_or_path"].default  # ftkit's embedded default


class SafeJSONResponse(JSONResponse):
    """JSON without NaN or Infinity (browsers refuse them): such numbers become null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@dataclass
class BoardState:
    root: Path
    launcher: Launcher
    data: DataView
    configs_dir: Path | None
    token: str | None = None
    curves: Curves | None = None
    tryout: Tryout | None = None

    def __post_init__(self) -> None:
        self.curves = self.curves or Curves()
        self.tryout = self.tryout or Tryout()


def create_app(state: BoardState) -> FastAPI:
    app = FastAPI(title="ftkit board", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=SafeJSONResponse)
    app.state.board = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        query_token = request.query_params.get("token")
        if state.token is not None and not _authorized(request, state.token):
            return _refusal(401, "This board needs its token: open it as http://HOST:PORT/?token=TOKEN (the --token "
                            "given to ftkit board or $FTKIT_BOARD_TOKEN), or send 'Authorization: Bearer TOKEN'.")
        if state.token is None and not is_loopback(_host_name(request.headers.get("host", ""))):
            return _refusal(403, "This board listens on loopback without a token: open it as http://127.0.0.1:PORT/ "
                            "or http://localhost:PORT/ (other names are refused, so a web site cannot reach it).")
        if request.method not in ("GET", "HEAD"):
            refusal = _refuse_foreign_write(request)
            if refusal is not None:
                return _refusal(403, refusal)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if state.token is not None and query_token and hmac.compare_digest(query_token.encode(), state.token.encode()):
            response.set_cookie(COOKIE, state.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(BoardError)
    async def board_error(request: Request, error: BoardError):
        body: dict[str, Any] = {"error": str(error)}
        if error.config_problems:
            body["problems"] = error.config_problems
        return JSONResponse(body, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the request"
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": "The request body is not valid JSON."}, status_code=400)
        return JSONResponse({"error": f"{where}: {first['msg']}."}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = "No such page or API route." if error.status_code == 404 else str(error.detail)
        return JSONResponse({"error": message}, status_code=error.status_code)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        rows = [runs.summary(state.root, folder) for folder in runs.find_runs(state.root)]
        known = {row["id"] for row in rows}
        for launch in state.launcher.pending():
            if launch.output_dir.exists() and runs.run_id(state.root, launch.output_dir) in known:
                continue
            rows.append({"id": launch.output_dir.relative_to(state.root).as_posix(), "pending": True,
                         "status": "starting" if launch.alive else "failed",
                         "detail": "" if launch.alive else f"ftkit train exited with status "
                                                          f"{launch.process.returncode}",
                         "console": launch.console_tail(), "started": launch.started})
        return {"root": str(state.root), "runs": rows, "time": time.time()}

    @app.get("/api/run")
    def one_run(id: str = Query("")) -> dict[str, Any]:
        folder = _run_or_pending(state, id)
        if folder is None:
            return _pending_details(state, id)
        return {**runs.details(state.root, folder), "console": _console(state, folder)}

    @app.get("/api/log")
    def log(id: str = Query(""), cursor: str | None = Query(None)) -> dict[str, Any]:
        folder = runs.run_dir(state.root, id)
        if cursor is None:
            return {**state.curves.full(folder), "reset": True}
        return runs.read_log_since(folder, cursor).as_json()

    @app.get("/api/events")
    async def events(request: Request, id: str = Query(""), cursor: str | None = Query(None)) -> StreamingResponse:
        folder = runs.run_dir(state.root, id)
        cursor = request.headers.get("last-event-id") or cursor  # a reconnecting browser continues from there
        return StreamingResponse(_event_stream(request, state, id, folder, cursor), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/compare")
    def compare(id: list[str] = _MANY_IDS) -> dict[str, Any]:
        if len(id) < 2:
            raise BoardError(400, "Compare needs at least two runs: /api/compare?id=A&id=B.")
        folders = [runs.run_dir(state.root, given) for given in id]
        curves = []
        for given, folder in zip(id, folders, strict=True):
            log = state.curves.full(folder)
            curves.append({"id": given, "step": log["train"]["step"], "loss": log["train"]["loss"],
                           "eval_step": log["eval"]["step"], "eval_loss": log["eval"]["eval_loss"]})
        return {"runs": id, "curves": curves, "config": runs.config_diff([runs.read_config(f) for f in folders])}

    @app.post("/api/validate")
    def validate(body: dict[str, Any]) -> dict[str, Any]:
        config, path, problems = state.launcher.check(_text(body))
        if path is not None:
            path.unlink(missing_ok=True)
        return {"ok": not problems, "problems": problems}

    @app.post("/api/launch")
    def launch(body: dict[str, Any]) -> JSONResponse:
        started = state.launcher.launch(_text(body))
        return JSONResponse({"id": started.output_dir.relative_to(state.root).as_posix(),
                             "pid": started.process.pid}, status_code=202)

    @app.post("/api/stop")
    def stop(body: dict[str, Any]) -> JSONResponse:
        folder = runs.run_dir(state.root, _string(body, "id"))
        return JSONResponse({"stopping": state.launcher.stop(folder)}, status_code=202)

    @app.post("/api/resume")
    def resume(body: dict[str, Any]) -> JSONResponse:
        folder = runs.run_dir(state.root, _string(body, "id"))
        started = state.launcher.resume(folder)
        return JSONResponse({"id": runs.run_id(state.root, folder), "pid": started.process.pid}, status_code=202)

    @app.post("/api/chat")
    def chat(body: dict[str, Any]) -> dict[str, Any]:
        folder = runs.run_dir(state.root, _string(body, "id"))
        return {"reply": state.tryout.reply(folder, body.get("messages"), body.get("max_new_tokens", 256))}

    @app.get("/api/configs")
    def configs() -> dict[str, Any]:
        return {"configs": [choice["name"] for choice in _config_choices(state)]}

    @app.get("/api/config")
    def config_text(name: str = Query("")) -> dict[str, Any]:
        choices = {choice["name"]: choice for choice in _config_choices(state)}
        if name not in choices:
            raise BoardError(404, f"There is no config {name!r}; pick one /api/configs lists.")
        data = runs.read_bytes(Path(choices[name]["path"]))
        if data is None:
            raise BoardError(404, f"Config {name} cannot be read.")
        return {"name": name, "text": data.decode("utf-8", errors="replace")}

    @app.get("/api/datasets")
    def datasets() -> dict[str, Any]:
        return {**state.data.datasets(), "models": _preview_models(state), "templates": PREVIEW_TEMPLATES}

    @app.get("/api/datasets/preview")
    def preview(name: str = Query(""), model: str = Query(DEFAULT_MODEL_NAME),
                template: str = Query("auto")) -> dict[str, Any]:
        return state.data.preview(name, model, _preview_models(state), template)

    return app


def _authorized(request: Request, token: str) -> bool:
    if bearer_matches(request.headers.get("authorization", ""), token):
        return True
    given = [request.cookies.get(COOKIE, ""), request.query_params.get("token", "")]
    return any(value and hmac.compare_digest(value.encode(errors="replace"), token.encode()) for value in given)


def _host_name(host: str) -> str:
    """The name in a Host header, without the port (IPv6 in brackets kept whole)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


# On every response, refusals too: no page may frame the board (clickjacking), no file is sniffed as another type.
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff"}


def _refusal(status: int, message: str) -> SafeJSONResponse:
    return SafeJSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _refuse_foreign_write(request: Request) -> str | None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return "Requests that change something must send JSON (Content-Type: application/json)."
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host", ""):  # "null" (a sandboxed frame) too
        return f"Requests from another site ({origin}) may not change anything on this board."
    return None


def _text(body: dict[str, Any]) -> str:
    text = body.get("yaml")
    if not isinstance(text, str) or not _utf8(text):
        raise BoardError(400, "yaml must be the config's text (a string of UTF-8 text).")
    if len(text) > 1_000_000:
        raise BoardError(400, "The config is over 1 MB; a train config is a few hundred lines at most.")
    return text


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or not _utf8(value):
        raise BoardError(400, f"{key} must be a run id (a string /api/runs lists).")
    return value


def _utf8(text: str) -> bool:
    """False for a string JSON can carry but a file name cannot (a lone surrogate such as \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _run_or_pending(state: BoardState, given: str) -> Path | None:
    """The run folder, or None for a launch whose folder has no run files yet (its id is its output_dir)."""
    try:
        return runs.run_dir(state.root, given)
    except BoardError:
        if any(launch.output_dir == runs.resolved_path(state.root / given) for launch in state.launcher.pending()) \
                and ".." not in Path(given).parts:
            return None
        raise


def _pending_details(state: BoardState, given: str) -> dict[str, Any]:
    launch = next((lc for lc in state.launcher.pending() if lc.output_dir == runs.resolved_path(state.root / given)),
                  None)
    if launch is None:  # its run folder appeared, or it was forgotten, since the first look
        raise BoardError(404, f"There is no run {given!r} under the board's root; reload the runs table.")
    return {"id": given, "pending": True, "status": "starting" if launch.alive else "failed",
            "detail": "" if launch.alive else f"ftkit train exited with status {launch.process.returncode}",
            "console": launch.console_tail(), "checkpoints": [], "evaluations": [], "config_text": "",
            "results": None, "can_chat": False}


def _console(state: BoardState, folder: Path) -> str | None:
    launch = state.launcher.for_folder(folder)
    return console_tail(launch.console_file) if launch is not None else None


async def _event_stream(request: Request, state: BoardState, given: str, folder: Path, cursor: str | None):
    """``log`` events with new records, ``status`` events on a change, ``gone`` when the folder disappears."""
    last_status = None
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        try:
            runs.run_dir(state.root, given)
        except BoardError:
            state.curves.forget(folder)
            yield _event("gone", {"id": given})
            return
        chunk = await asyncio.to_thread(runs.read_log_since, folder, cursor)
        if chunk.records or chunk.reset or cursor is None:
            cursor = chunk.cursor
            yield _event("log", chunk.as_json(), event_id=cursor)
            last_sent = time.monotonic()
        summary = await asyncio.to_thread(runs.summary, state.root, folder)
        status = {**summary, "console": _console(state, folder)}
        key = (status["status"], status["detail"], status["step"], status["general_kept"], status["console"])
        if key != last_status:
            last_status = key
            yield _event("status", status)
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)


def _event(name: str, data: Any, event_id: str | None = None) -> str:
    body = json.dumps(finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"event: {name}\n" + (f"id: {event_id}\n" if event_id else "") + f"data: {body}\n\n"


def _config_choices(state: BoardState) -> list[dict[str, str]]:
    """Configs the Launch tab offers: the YAML files of ``--configs`` and each run's resolved config."""
    choices = []
    if state.configs_dir is not None and state.configs_dir.is_dir():
        for path in sorted(state.configs_dir.iterdir()):
            if path.suffix in CONFIG_SUFFIXES and path.is_file():
                choices.append({"name": f"{state.configs_dir.name}/{path.name}", "path": str(path)})
    for folder in runs.find_runs(state.root):
        config = folder / "ftkit_config.yaml"
        if config.is_file():
            choices.append({"name": f"run: {runs.run_id(state.root, folder)}", "path": str(config)})
    return choices


def _preview_models(state: BoardState) -> list[str]:
    models = [DEFAULT_MODEL_NAME]
    for folder in runs.find_runs(state.root):
        model = runs.read_config(folder).get("model_name_or_path")
        if isinstance(model, str) and model not in models:
            models.append(model)
    return models
