"""Render an ``udaseg analyze`` report in headless Chromium and save screenshots of it.

    python scripts/render_report.py runs/analysis/report.html --out runs/analysis/screenshots

Chromium comes from the Debian package (``apt-get install -y chromium``). It runs with a fresh
profile folder, no GPU, no sandbox (containers), and none of its background network services, on
the local file only. The script checks that the browser's DOM holds the report's title, every
figure and every table, then writes ``top.png`` (the first screen) and ``page.png`` (the whole
page at the given height) for a person to look at.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--disable-extensions", "--disable-default-apps"]


def find_chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("render_report: no Chromium found; install it with 'apt-get install -y chromium' or pass --browser")


def run_browser(browser: str, extra: list[str], url: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="udaseg-chromium-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html written by 'udaseg analyze'")
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900, help="height of the first-screen shot")
    parser.add_argument("--page-height", type=int, default=7000, help="height of the whole-page shot")
    parser.add_argument("--browser", help="Chromium executable (default: found on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    report = args.report.resolve()
    if not report.is_file():
        sys.exit(f"render_report: {report} does not exist")
    browser = find_chromium(args.browser)
    url = report.as_uri()
    args.out.mkdir(parents=True, exist_ok=True)

    dom = run_browser(browser, ["--dump-dom"], url, args.timeout)
    if dom.returncode != 0 or "<h1>udaseg analysis</h1>" not in dom.stdout:
        sys.exit(f"render_report: Chromium did not render the report (exit {dom.returncode}): "
                 f"{dom.stderr.strip().splitlines()[-1:] or ''}")
    images = dom.stdout.count('<img src="data:image/png;base64,')
    tables = dom.stdout.count("<table>")
    print(f"DOM: {len(dom.stdout)} characters, {images} embedded figures, {tables} tables")

    for name, height in (("top.png", args.height), ("page.png", args.page_height)):
        target = (args.out / name).resolve()
        target.unlink(missing_ok=True)
        shot = run_browser(browser, [f"--screenshot={target}", f"--window-size={args.width},{height}"], url,
                           args.timeout)
        if shot.returncode != 0 or not target.is_file():
            sys.exit(f"render_report: no screenshot {target} (exit {shot.returncode})")
        print(f"wrote {target} ({target.stat().st_size // 1024} KiB, {args.width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
