"""``ftkit board`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The board runs on loopback over runs made in-test. The page's curves must hold exactly the log's points
and follow new lines live; compare overlays runs and marks differing keys; a config with problems shows
each at its line and starts nothing; a tiny run launched from the page is stopped, resumed, watched to the
end and chatted with. ``make test`` installs chromium where it can; where
it cannot, these tests skip with that sentence.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from board_runs import append_log, write_run, write_status

from ftkit.board import build_board
from ftkit.board.app import create_app
from ftkit.http_server import BackgroundServer
from ftkit.run_files import RUN_RESULTS_FILE, TRAINER_LOG_FILE

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install adds "
                                                                   "it with the dev extras)")
if CHROMIUM is None:
    pytest.skip("chromium is not installed and this user cannot install it (make test runs apt-get install "
                "chromium as root); the board's browser tests skip", allow_module_level=True)

@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def board(tmp_path, browser):
    """(page, base url, root, state) for a board over ``tmp_path/saves``; launched runs are stopped afterwards."""
    root = tmp_path / "saves"
    state = build_board(root, dataset_dir=REPO / "data", configs_dir=None, workdir=tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        with BackgroundServer(create_app(state)) as server:
            try:
                yield page, server.root, root, state
            finally:
                page.close()  # first: its event stream ends with it, so the server stops at once
    finally:
        state.launcher.stop_all()
        for launch in state.launcher.launches.values():
            launch.process.wait(timeout=60)
    assert errors == [], errors  # no JavaScript error on any page


def chart_data(page, name: str) -> list[list]:
    return page.evaluate(f"ftkitBoard.charts.{name}.data.map(series => Array.from(series))")


def wait_status(page, status: str, timeout_s: float) -> None:
    page.wait_for_selector(f'#run-status [data-status="{status}"]', timeout=timeout_s * 1000)


def test_a_runs_curves_hold_the_logs_points_and_follow_new_lines(board):
    page, url, root, _ = board
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        folder = write_run(root / "live", steps=40, status="running", pid=sleeper.pid, eval_every=10)
        page.goto(url + "/")
        page.wait_for_selector('#runs-table tr[data-id="live"] [data-status="running"]')
        page.click('#runs-table tr[data-id="live"]')
        page.wait_for_selector("#chart-loss .uplot")
        records = [json.loads(line) for line in (folder / TRAINER_LOG_FILE).read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
        steps, losses, eval_losses = chart_data(page, "loss")
        assert steps == [r["step"] for r in train] and losses == [r["loss"] for r in train]
        assert {s: v for s, v in zip(steps, eval_losses, strict=True) if v is not None} == evals
        assert chart_data(page, "lr") == [steps, [r["learning_rate"] for r in train]]
        assert chart_data(page, "grad") == [steps, [r["grad_norm"] for r in train]]

        added = append_log(folder, range(41, 46))
        page.wait_for_function("ftkitBoard.charts.loss.data[0].length === 45", timeout=20000)
        assert chart_data(page, "loss")[1][-5:] == [r["loss"] for r in added]

        write_status(folder, "finished", step=45)
        (folder / RUN_RESULTS_FILE).write_text(json.dumps({"global_step": 45, "total_seconds": 30.0}))
        wait_status(page, "finished", 20)
        shutil.rmtree(folder)
        page.wait_for_selector("#gone", timeout=20000)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_compare_overlays_runs_and_marks_the_keys_that_differ(board):
    page, url, root, _ = board
    write_run(root / "lr-1e-4", steps=30, config={"learning_rate": 1e-4})
    write_run(root / "lr-3e-4", steps=20, config={"learning_rate": 3e-4})
    page.goto(url + "/")
    for run in ("lr-1e-4", "lr-3e-4"):
        page.check(f'#runs-table tr[data-id="{run}"] input[type=checkbox]')
    page.click("#compare")
    page.wait_for_selector("#chart-compare .uplot")
    steps, first, second = chart_data(page, "compare")
    assert steps == list(range(1, 31)) and first[:3] == [r for r in first[:3] if r is not None]
    assert second[20:] == [None] * 10  # the shorter run ends at step 20
    assert page.locator('#config-diff tr.differs[data-key="learning_rate"]').count() == 1
    assert page.locator('#config-diff tr[data-key="model_name_or_path"]').count() == 0
    page.uncheck("#only-differing")
    row = page.locator('#config-diff tr[data-key="model_name_or_path"]')
    assert row.count() == 1 and "differs" not in (row.get_attribute("class") or "")


def test_the_data_tab_highlights_trained_spans(board):
    page, url, _, _ = board
    page.goto(url + "/#/data")
    page.click('#datasets tr[data-name="identity"]')
    page.wait_for_selector("#preview .example pre .trained")
    trained = page.locator("#preview .example pre .trained").first.inner_text()
    masked = page.locator("#preview .example pre .masked").first.inner_text()
    assert "Ftkit" in trained and "Who are you?" in masked
    page.select_option("#preview-template", "alpaca")  # re-encodes the shown set in that template
    page.wait_for_function("document.querySelector('#preview .example pre')?.textContent.includes('### Instruction:')")


def tiny_config(model_dir: Path, output_dir: Path, **extra) -> str:
    keys = {"model_name_or_path": str(model_dir), "dataset": "identity", "dataset_dir": str(REPO / "data"),
            "max_samples": 8, "cutoff_len": 128, "output_dir": str(output_dir), "max_steps": 6, "logging_steps": 1,
            "learning_rate": 5e-3, "per_device_train_batch_size": 8, "save_strategy": "no",
            "replay_ratio": 0, "general_check": False, "learned_check": False, **extra}
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items())


@pytest.mark.slow
def test_launch_stop_resume_finish_and_chat_from_the_page(board, tiny_llama_dir):
    """One real run through everything the page does with it (each ftkit train start costs seconds)."""
    page, url, root, state = board
    page.goto(url + "/#/launch")
    bad = tiny_config(tiny_llama_dir, root / "tiny").replace("learning_rate", "learning_rat")
    page.fill("#config-text", bad)
    page.click("#launch")
    page.wait_for_selector("#annotated .line.bad")
    line = [x.split(":")[0] for x in bad.splitlines()].index("learning_rat") + 1
    assert page.locator(f'#annotated .line.bad[data-line="{line}"]').count() == 1
    assert "did you mean 'learning_rate'" in page.locator('#annotated .problem[data-key="learning_rat"]').inner_text()
    assert httpx.get(url + "/api/runs").json()["runs"] == [] and not (root / "tiny").exists()

    config = tiny_config(tiny_llama_dir, root / "tiny", max_steps=60, save_strategy="steps", save_steps=4,
                         save_total_limit=2)
    page.fill("#config-text", config)
    page.click("#launch")
    page.wait_for_function("location.hash === '#/run/tiny'")
    deadline = time.monotonic() + 180
    while not any(c["complete"] for c in httpx.get(url + "/api/run", params={"id": "tiny"}).json().get(
            "checkpoints", [])):
        assert time.monotonic() < deadline, "the launched run saved no checkpoint"
        time.sleep(0.3)
    wait_status(page, "running", 30)

    page.goto(url + "/#/launch")  # a second launch into the same output_dir is refused
    page.fill("#config-text", config)
    page.click("#launch")
    page.wait_for_selector("#launch-outcome .notice.bad")
    assert "already running a training into" in page.locator("#launch-outcome").inner_text()

    page.goto(url + "/#/run/tiny")
    wait_status(page, "running", 20)
    page.click("#stop")
    wait_status(page, "interrupted", 60)
    assert "SIGTERM" in page.locator("#run-detail").inner_text()
    page.click("#resume")
    wait_status(page, "finished", 180)  # from the last checkpoint to step 60

    steps = [json.loads(line)["step"] for line in (root / "tiny" / TRAINER_LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 61))  # resumed from the checkpoint: the log has no gap and no repeat
    page.wait_for_function("ftkitBoard.charts.loss.data[0].length === 60", timeout=20000)
    logged = [json.loads(line)["loss"] for line in (root / "tiny" / TRAINER_LOG_FILE).read_text().splitlines()]
    assert chart_data(page, "loss")[1] == logged
    assert "done: loss" in page.locator("#console").inner_text()
    for launch in state.launcher.launches.values():  # the stopped process exited and let the resumed one in
        assert launch.process.wait(timeout=60) in (0, 128 + 15)
    assert not (root / "tiny" / ".ftkit-lock").exists()

    page.wait_for_selector("#chat-input")
    page.fill("#chat-input", "Who are you?")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log .msg.assistant", timeout=60000)
    assert page.locator("#chat-error").inner_text() == ""
    shot = page.screenshot(full_page=True)
    width, height = struct.unpack(">II", shot[16:24])  # the PNG's own header: a picture of the whole page
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and width == 1280 and height > 900
