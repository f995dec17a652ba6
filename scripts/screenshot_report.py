"""Render an HTML report to a PNG with headless Chromium, to check what a reader will see.

    python scripts/screenshot_report.py REPORT.html OUT.png [--size 1400,2400]

Exits non-zero when no Chromium is found or no PNG appears. Importable: ``screenshot(html, png)``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install Debian's chromium: apt-get install -y chromium"


def find_chromium() -> str | None:
    """Path of the first Chromium-like browser on PATH, else None."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: str | Path, png: str | Path, width: int = 1400, height: int = 2400,
               timeout: float = 120.0) -> Path:
    """Screenshot ``html`` (a local file) into ``png`` at ``width`` x ``height`` CSS pixels; returns ``png``.

    Raises FileNotFoundError when the HTML or the browser is missing, RuntimeError when no PNG appears.
    """
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"no such HTML file: {html}")
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BINARIES)}); {INSTALL_HINT}")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="hq-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--force-device-scale-factor=1",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
               html.as_uri()]
        try:
            result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{browser} did not finish within {timeout:.0f} s") from exc
    if not png.is_file() or png.stat().st_size == 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{browser} exited with {result.returncode} and wrote no PNG at {png}:\n{tail}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report.html to render")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--size", default="1400,2400", help="window WIDTH,HEIGHT in pixels (default 1400,2400)")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.split(","))
        out = screenshot(args.html, args.png, width, height)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
