"""Debian's Chromium under Playwright for the browser tests (imported as ``from browser import ...``).

``needs_chromium`` skips a module (with the reason) only when ``/usr/bin/chromium`` is absent;
``chromium(pw)`` launches it headless with the flags the project uses; ``wait`` polls a
predicate until it is truthy and fails naming what it waited for and what it last saw.
This lives outside ``conftest.py`` for the same reason as ``collect.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ARTIFACTS", "CHROMIUM", "chromium", "needs_chromium", "wait"]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"Debian's Chromium is not installed at {CHROMIUM}")


def chromium(pw: Any) -> Any:
    """Debian's Chromium, launched by Playwright (``pw``: what ``sync_playwright()`` gives)."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def wait(predicate: Any, timeout: float, what: str) -> Any:
    """Call ``predicate`` every 0.2 s until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last seen: {str(last)[:400]})")
