"""TensorBoard as a user sees it, kept beside an experiment's report: PNG screenshots of its Custom Scalars and
HParams dashboards, taken by headless Chromium from a TensorBoard started on the experiment's runs folder.

    python -m lab.tensorboard_screenshots runs/zoo_code docs/zoo/zoo_code

writes docs/zoo/zoo_code/tensorboard_custom_scalars.png and tensorboard_hparams.png. TensorBoard listens on a free
port of 127.0.0.1 only and is stopped when the screenshots are taken (or fail). Needs Chromium (Debian:
`apt-get install chromium`) and the tensorboard package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DASHBOARDS = {"custom_scalars": "tensorboard_custom_scalars.png", "hparams": "tensorboard_hparams.png"}


class ScreenshotError(RuntimeError):
    pass


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise ScreenshotError(f"chromium is not installed (none of {', '.join(BROWSERS)} is on PATH): install Debian's "
                          f"chromium package: apt-get install chromium")


def tensorboard_command() -> list[str]:
    if importlib.util.find_spec("tensorboard") is None:
        raise ScreenshotError("tensorboard is not installed: pip install tensorboard (or pip install -e . here)")
    executable = shutil.which("tensorboard")
    return [executable] if executable else [sys.executable, "-m", "tensorboard.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(server: subprocess.Popen, base: str, logdir: Path, timeout: float) -> None:
    """Until TensorBoard answers HTTP and has read at least one run (a page taken before shows an empty board)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"tensorboard exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as response:
                if json.loads(response.read()):
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise ScreenshotError(f"tensorboard showed no runs of {logdir} within {timeout:.0f} s: is it a folder of "
                          f"TensorBoard event files (runs/<experiment>)?")


def screenshot(browser: str, url: str, path: Path, size: tuple[int, int], profile: str) -> None:
    """One page, rendered by headless Chromium after up to 15 s of (virtual) time for its data to load."""
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               "--virtual-time-budget=15000", f"--screenshot={path.resolve()}", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not path.is_file():
        raise ScreenshotError(f"{Path(browser).name} took no screenshot of {url} (exit {done.returncode}):\n"
                              f"{done.stderr[-2000:]}")


def take_screenshots(logdir: Path, out: Path, size: tuple[int, int] = (1600, 1200), timeout: float = 90) -> list[Path]:
    """tensorboard_custom_scalars.png and tensorboard_hparams.png of `logdir` (an experiment's runs folder) in
    `out`."""
    browser, tensorboard = find_browser(), tensorboard_command()  # both checked before anything starts
    if not logdir.is_dir():
        raise ScreenshotError(f"no runs folder {logdir}: train the experiment first (python compare.py ...)")
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*tensorboard, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_runs(server, base, logdir, timeout)
        paths = []
        with tempfile.TemporaryDirectory() as profile:  # a fresh browser profile: nothing of the user's is read
            for dashboard, name in DASHBOARDS.items():
                paths.append(out / name)
                screenshot(browser, f"{base}/#{dashboard}", paths[-1], size, profile)
        return paths
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="an experiment's runs folder, e.g. runs/zoo_code")
    p.add_argument("out", help="where the PNGs go, e.g. docs/zoo/zoo_code")
    p.add_argument("--size", default="1600x1200", help="browser window in pixels, WIDTHxHEIGHT")
    args = p.parse_args(argv)
    width, _, height = args.size.partition("x")
    try:
        paths = take_screenshots(Path(args.runs), Path(args.out), (int(width), int(height)))
    except ScreenshotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
