"""Regenerate docs/browser-page.png: the browser page mid-speech, a word highlighted.

Starts a real `speakd serve` and the headless Chromium the tests use (`scripts/setup.sh test` installs
both), speaks an LLM-style reply and takes the screenshot while a word in the middle is being heard:

    SPEAKD_CACHE_DIR=~/.cache/speakd .venv/bin/python scripts/screenshot_page.py [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import SpeakdPage, chromium  # noqa: E402
from daemon import Daemon  # noqa: E402

from speakd.server.config import default_cache_dir  # noqa: E402

logger = logging.getLogger("screenshot_page")

REPLY = (
    "Sure! The quickest way to get there is to take the train to the central station, "
    "then walk two blocks north along the river."
)
HIGHLIGHTED_WORD = 9  # "take": far enough in that the heard part shows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "browser-page.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), default_cache_dir())
        try:
            daemon.wait_ready()
            with chromium() as browser:
                context = browser.new_context(viewport={"width": 880, "height": 700}, device_scale_factor=1)
                page = SpeakdPage(context, daemon.http + "/")
                page.speak(REPLY)
                page.wait(
                    f"speakdTap.highlights.length > {HIGHLIGHTED_WORD} "
                    "&& document.getElementById('word').textContent !== ''",
                    60,
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.page.screenshot(path=str(args.out), full_page=True)
                logger.info(
                    "wrote %s (word %r highlighted)", args.out, page.js("speakdTap.highlights.at(-1).word")
                )
                page.wait_finished()
                context.close()
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
