"""Fuzz the REST API from its own OpenAPI spec with schemathesis: no 5xx, JSON errors, earlier data intact.

Each API operation gets a bounded number of generated requests (valid and invalid ones), sent
in-process to an app over a store that already holds a run with Records and a graph. Afterwards
that run's Records, layers and graph are exactly what they were.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from sonde.records import Record
from sonde.server.app import create_app
from sonde.sinks.base import LayerInfo, RunInfo
from sonde.store import Store, open_store

EXAMPLES = 25  # per operation; about 15 operations


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: Any, value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (OverflowError, TypeError, ValueError):  # e.g. an integer beyond 64 bits, a lone surrogate
        return repr(value).encode("utf-8", "surrogatepass")  # then the server gets bytes that are not msgpack


def _seeded(tmp: Path) -> Store:
    store = open_store(tmp / "fuzz.db")
    store.start_run(RunInfo("kept", model="MLP", layers=[LayerInfo("fc1", "Linear", {"weight": [3, 2]})]))
    store.write("kept", [Record("kept", s, "train", "fc1", "weights", "norm", float(s) / 7) for s in range(50)]
                + [Record("kept", 3, "train", "fc1", "weights", "histogram", np.arange(4.0))])
    store.put_graph("kept", {"nodes": [{"id": "fc1"}], "edges": []})
    return store


_DIR = Path(tempfile.mkdtemp(prefix="sonde-fuzz-"))  # at import: schemathesis reads the spec at collection
_STORE = _seeded(_DIR)
_APP = create_app(_STORE, ui=False, max_body=1 << 20)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)
_BEFORE = (_STORE.load("kept"), _STORE.load("kept", arrays=True), _STORE.layers("kept"), _STORE.get_graph("kept"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    _STORE.close()
    shutil.rmtree(_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_for_any_input(case: schemathesis.Case) -> None:
    # Aim half the requests at the seeded run, so that handlers past the run lookup are fuzzed too;
    # requests that would delete or overwrite it go to a scratch name instead.
    if case.path_parameters and "run" in case.path_parameters:
        destructive = case.method.upper() in ("DELETE", "PUT") or case.path.endswith(("/records", "/finish"))
        if not destructive and zlib.crc32(repr(case.query).encode("utf-8", "surrogatepass")) % 2 == 0:
            case.path_parameters["run"] = "kept"
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], response.text[:300]


def test_earlier_data_is_intact_after_fuzzing() -> None:
    records, arrays, layers, graph = _BEFORE
    assert _STORE.load("kept").equals(records)
    after = _STORE.load("kept", arrays=True)
    assert len(after) == len(arrays) and all(np.array_equal(a, b) for a, b in zip(after["value"], arrays["value"]))
    assert _STORE.layers("kept").equals(layers)
    assert _STORE.get_graph("kept") == graph
