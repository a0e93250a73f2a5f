"""The heap-churn hint: real page faults counted over training steps, one warning with the fix."""

from __future__ import annotations

import logging
import mmap
import time

import pytest
import torch
from torch import nn

import sonde
from sonde.probe import heap


def train(steps: int, churn_pages: int = 0, pause: float = 0.0) -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sonde.probe(model, optimizer=opt, store=None, metrics=["mean"]):
        for _ in range(steps):
            if churn_pages:  # what glibc's trimmed heap does to a training step: fresh pages, each faulted in
                block = mmap.mmap(-1, churn_pages * mmap.PAGESIZE)
                for page in range(churn_pages):
                    block[page * mmap.PAGESIZE] = 1
                block.close()
            time.sleep(pause)  # a step this much longer
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            opt.zero_grad()


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "applicable", lambda: True)  # whatever this machine's environment says


def test_a_loop_that_faults_thousands_of_pages_per_step_gets_the_hint_once(
    checked: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sonde"):
        train(heap.WINDOW[1] + 10, churn_pages=2 * heap.FAULTS_PER_STEP)
    hints = [r.getMessage() for r in caplog.records if "page faults per training step" in r.getMessage()]
    assert len(hints) == 1
    faults = int(hints[0].split("takes ")[1].split(" page")[0].replace(",", ""))
    assert 2 * heap.FAULTS_PER_STEP <= faults < 3 * heap.FAULTS_PER_STEP
    assert "MALLOC_TRIM_THRESHOLD_=1073741824" in hints[0] and "SONDE_HEAP_HINT=0" in hints[0]


def test_a_quiet_loop_and_a_short_run_get_no_hint(checked: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sonde"):
        train(heap.WINDOW[1] + 5)
        train(heap.WINDOW[1] - 2, churn_pages=2 * heap.FAULTS_PER_STEP)  # ends before the window does
    assert not [r for r in caplog.records if "page faults" in r.getMessage()]


def test_faults_that_are_a_small_share_of_a_long_step_get_no_hint(
    checked: None, caplog: pytest.LogCaptureFixture
) -> None:
    # 1,500 faults (1.5 ms at the low estimate of 1 us each) in steps of 50 ms and more: under 5%.
    with caplog.at_level(logging.WARNING, logger="sonde"):
        train(heap.WINDOW[1] + 2, churn_pages=1500, pause=0.05)
    assert not [r for r in caplog.records if "page faults" in r.getMessage()]


@pytest.mark.parametrize("name, value", [("SONDE_HEAP_HINT", "0"), ("MALLOC_TRIM_THRESHOLD_", "1073741824"),
                                         ("LD_PRELOAD", "libjemalloc.so.2")])
def test_the_check_is_off_when_turned_off_or_the_heap_is_already_looked_after(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    for key in ("SONDE_HEAP_HINT", *heap._TUNED):
        monkeypatch.delenv(key, raising=False)
    assert heap.applicable() == heap._glibc()
    monkeypatch.setenv(name, value)
    assert not heap.applicable()
    assert not heap.HeapChurnCheck().enabled
