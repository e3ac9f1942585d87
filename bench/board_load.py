"""How fast ``ftkit board`` shows many long runs, in a real browser (Debian's chromium through Playwright).

Writes RUNS run folders of LINES log lines each (an eval line every 500 steps; one run "running"), starts
``ftkit board`` on them as a user would (a subprocess on loopback), and measures:

- the runs table: from navigation until every run's row is drawn (cold: the board's first read; warm);
- one run's curves: from navigation until the loss chart holds all LINES points (cold and warm);
- live updates: a line appended to the running run's log until the open page's chart has it (UPDATES times);
- the API behind them (``/api/runs``, ``/api/log``) timed alone with httpx.

Targets (issue 21): runs table under 1 s, a run's curves under 1 s, updates within 2 s of the line.

    python bench/board_load.py                       # 50 runs x 10,000 lines
    python bench/board_load.py --runs 10 --lines 2000
    python bench/board_load.py --screenshot docs/board.png --root saves --run quickstart   # the README's picture
                                                   # (after make demo; it asks the Try box "Who are you?")
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def start_board(root: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``ftkit board`` on a free loopback port; (process, url) once it says it is ready."""
    process = subprocess.Popen([sys.executable, "-m", "ftkit", "board", "--root", str(root), "--port", "0", *extra],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stderr:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if found:
            return process, found.group(1)
    raise SystemExit(f"ftkit board did not start (exit status {process.wait()})")


def make_runs(root: Path, runs: int, lines: int, live_pid: int) -> list[str]:
    from board_runs import write_run

    ids = []
    for index in range(runs):
        name = f"run-{index:02d}"
        status = "running" if index == 0 else "finished"
        write_run(root / name, steps=lines, status=status, pid=live_pid if index == 0 else None, eval_every=500,
                  config={"learning_rate": 1e-4 * (1 + index % 5), "lora_rank": 8 * (1 + index % 3)})
        ids.append(name)
    return ids


def timed_navigation(page, url: str, ready: str) -> float:
    """Seconds from starting navigation to ``url`` until the JavaScript condition ``ready`` holds."""
    page.goto("about:blank")
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_function(ready, timeout=60000, polling="raf")
    return time.perf_counter() - started


def measure(runs: int, lines: int, updates: int) -> None:
    from board_runs import append_log
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="ftkit-board-bench-") as scratch:
        root = Path(scratch) / "saves"
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        started = time.perf_counter()
        ids = make_runs(root, runs, lines, live.pid)
        size = sum(f.stat().st_size for f in root.rglob("trainer_log.jsonl"))
        print(f"{runs} runs x {lines:,} log lines ({size / 2**20:.0f} MiB of logs) written in "
              f"{time.perf_counter() - started:.1f} s")
        board, url = start_board(root)
        results: dict[str, float] = {}
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                table_ready = f"document.querySelectorAll('#runs-table tbody tr[data-id]').length === {runs}"
                results["runs table, cold"] = timed_navigation(page, url + "/", table_ready)
                results["runs table, warm"] = statistics.median(
                    timed_navigation(page, url + "/", table_ready) for _ in range(3))
                curves_ready = f"ftkitBoard.charts.loss && ftkitBoard.charts.loss.data[0].length === {lines}"
                results["a run's curves, cold"] = timed_navigation(page, f"{url}/#/run/{ids[1]}", curves_ready)
                results["a run's curves, warm"] = statistics.median(
                    timed_navigation(page, f"{url}/#/run/{ids[1]}", curves_ready) for _ in range(3))

                timed_navigation(page, f"{url}/#/run/{ids[0]}", curves_ready)
                page.wait_for_timeout(1000)  # the event stream is open
                delays = []
                for step in range(lines + 1, lines + 1 + updates):
                    written = time.perf_counter()
                    append_log(root / ids[0], range(step, step + 1))
                    page.wait_for_function(f"ftkitBoard.charts.loss.data[0].length === {step}", timeout=10000,
                                           polling="raf")
                    delays.append(time.perf_counter() - written)
                results["live update, median"] = statistics.median(delays)
                results["live update, worst"] = max(delays)
                browser.close()
            with httpx.Client(base_url=url, timeout=60) as client:
                results["GET /api/runs"] = statistics.median(_timed(client, "/api/runs", {}) for _ in range(5))
                results["GET /api/log (whole run, cached)"] = statistics.median(
                    _timed(client, "/api/log", {"id": ids[2]}) for _ in range(5))
        finally:
            board.terminate()
            board.wait()
            live.kill()
            live.wait()

    targets = {"runs table": 1.0, "a run's curves": 1.0, "live update": 2.0}
    print(f"\n| measure ({runs} runs x {lines:,} lines) | seconds | target | met |\n|---|---:|---:|---|")
    for name, seconds in results.items():
        target = next((t for prefix, t in targets.items() if name.startswith(prefix)), None)
        met = "" if target is None else ("yes" if seconds < target else "NO")
        print(f"| {name} | {seconds:.3f} | {'' if target is None else f'< {target:g}'} | {met} |")


def _timed(client: httpx.Client, path: str, params: dict) -> float:
    started = time.perf_counter()
    client.get(path, params=params).raise_for_status()
    return time.perf_counter() - started


def screenshot(path: Path, root: Path, run: str, ask: str | None) -> None:
    """A picture of ``run``'s page on a board over ``root`` (the README's), after asking its Try box ``ask``."""
    from playwright.sync_api import sync_playwright

    board, url = start_board(root)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/#/run/{run}")
            page.wait_for_selector("#chart-loss .uplot")
            if ask:
                page.fill("#chat-input", ask)
                page.press("#chat-input", "Enter")
                page.wait_for_selector("#chat-log .msg.assistant", timeout=120000)
            page.wait_for_timeout(500)
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
            browser.close()
    finally:
        board.terminate()
        board.wait()
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--screenshot", type=Path, help="save a picture of --run's page instead of measuring")
    parser.add_argument("--root", type=Path, default=Path("saves"))
    parser.add_argument("--run", default="quickstart")
    parser.add_argument("--ask", default="Who are you?", help="a question for --run's Try box before the picture")
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.screenshot:
        screenshot(args.screenshot, args.root.resolve(), args.run, args.ask)
    else:
        measure(args.runs, args.lines, args.updates)


if __name__ == "__main__":
    main()
