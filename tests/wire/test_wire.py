"""The protocol package: codecs round-trip and shift steps, one retry rule, and no server import."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest

from sonde.records import Record
from sonde.wire import (
    ROUTES,
    Backoff,
    Mark,
    TensorItem,
    WireError,
    decode_payload,
    decode_records,
    encode_payload,
    encode_records,
    path,
    retryable,
    shift_records,
    shift_steps,
)


def test_records_round_trip_with_messages_arrays_and_shifted_steps() -> None:
    records = [Record("r", 2, "train", "fc", "weights", "histogram", np.array([1.0, 2.0])),
               Record("r", 3, "train", "fc", "activations", "alert", 1.0, "dead")]
    batch_id, back = decode_records(shift_records(encode_records("b", records), 10), "r")
    assert batch_id == "b" and [r.step for r in back] == [12, 13]
    assert back[0].value.tolist() == [1.0, 2.0] and back[1].message == "dead"


def test_a_malformed_batch_names_the_record_and_its_status() -> None:
    body = msgpack.packb({"batch_id": "b", "records": [[-1, "train", "fc", "weights", "norm", 1.0]]})
    with pytest.raises(WireError, match="record 0: step") as caught:
        decode_records(body, "r")
    assert caught.value.status == 422
    with pytest.raises(WireError) as caught:
        decode_records(b"\xc1", "r")
    assert caught.value.status == 400


def test_tensor_payloads_shift_steps_and_reject_specs_the_checker_refuses() -> None:
    spec = [{"name": "mean", "kwargs": {}}]
    body = encode_payload("b", [Mark("epoch_end", spec), TensorItem(1, "train", "fc", "activations",
                                                                    np.ones((2, 2)), None, spec)])
    _, items = decode_payload(shift_steps(body, 5))
    assert isinstance(items[0], Mark) and isinstance(items[1], TensorItem) and items[1].step == 6

    def refuse(spec: object) -> None:
        raise ValueError("no such metric")

    with pytest.raises(WireError, match="item 0: no such metric") as caught:
        decode_payload(body, refuse)
    assert caught.value.status == 422


def test_one_route_table_and_one_retry_rule() -> None:
    assert path("run", "a/b") == "/api/v1/runs"
    assert path("heartbeat", "a/b") == "/api/v1/runs/a%2Fb/heartbeat"
    assert ROUTES["graph"][0] == "PUT"
    assert [retryable(s) for s in (429, 503, 501, 404)] == [True, True, False, False]
    wait = Backoff(0.05, 0.1)
    assert [wait.next(), wait.next(), wait.next()] == [0.05, 0.1, 0.1]
    wait.reset()
    assert wait.next() == 0.05


@pytest.mark.parametrize("module", ["sonde.wire", "sonde.metrics.server", "sonde.sinks.remote"])
def test_the_probe_side_of_the_protocol_loads_no_server(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('fastapi', 'sonde.server') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
