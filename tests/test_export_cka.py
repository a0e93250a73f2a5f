"""The HTML report's layer × layer CKA matrix: the last step's matrix, computed here with numpy.

The test trains a small MLP with ``cka_matrix`` on a probe set, keeps the weights of the last
evaluated step, recomputes each layer's probe-set activations itself and the minibatch CKA from
its formula (unbiased HSIC per chunk, averaged), and compares with the report's JSON.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sonde
from sonde.export import export_html
from sonde.metrics import CKAMatrix
from sonde.probe.torch import TorchProbe

LAYERS = ["0", "1", "2", "3"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU())


def _hsic1(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return float((np.trace(kt @ lt) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * kt.sum(0) @ lt.sum(1))
                 / (n * (n - 3)))


def _minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    xy = xx = yy = 0.0
    for x, y in zip(xs, ys, strict=True):
        k, l = x @ x.T, y @ y.T  # noqa: E741
        xy, xx, yy = xy + _hsic1(k, l), xx + _hsic1(k, k), yy + _hsic1(l, l)
    return xy / math.sqrt(xx * yy)


def test_report_holds_the_cka_matrix_of_the_last_step(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    probe_x = torch.randn(80, 5)
    states = []
    with sonde.probe(model, store=db, run="mlp", optimizer=opt, metrics=["std", CKAMatrix(compute_every=3)],
                     probe_set=probe_x) as p:
        for _ in range(7):  # the matrix at steps 0, 3 and 6
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            loss = model(torch.randn(16, 5)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            p.log(loss=loss)

    out = export_html(db, "mlp", tmp_path / "report.html")
    text = out.read_text()
    data = json.loads(re.search(r"<script type='application/json' id='sonde-data'>(.*?)</script>", text, re.S)
                      .group(1).replace("<\\/", "</"))
    got = data["cka_matrix"]
    assert got["step"] == 6 and got["layers"] == LAYERS
    assert "Layer similarity (linear CKA on the probe set) at step 6" in text

    # The same matrix from the formula, on activations this test computes from the step-6 weights.
    ref = _model()
    ref.load_state_dict(states[6])
    ref.eval()
    acts: dict[str, list[np.ndarray]] = {n: [] for n in LAYERS}
    for name, module in ref.named_children():
        module.register_forward_hook(lambda m, a, o, name=name: acts[name].append(o.detach().double().numpy()))
    chunk = TorchProbe.probe_batch_size
    with torch.no_grad():
        for start in range(0, len(probe_x), chunk):
            ref(probe_x[start:start + chunk])
    expected = np.array([[_minibatch_cka(acts[a], acts[b]) for b in LAYERS] for a in LAYERS])
    np.testing.assert_allclose(np.array(got["values"]), expected, rtol=1e-6)
    assert expected.min() < 0.95  # not a trivial matrix

    # The picture is an inline PNG (the report stays self-contained).
    img = re.search(r"<img alt='CKA matrix' src='data:image/png;base64,([^']+)'>", text)
    assert img is not None and base64.b64decode(img.group(1))[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_the_matrix_has_no_section(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    model = _model()
    with sonde.probe(model, store=db, run="plain", metrics=["std"]):
        model(torch.randn(4, 5))
    text = export_html(db, "plain", tmp_path / "r.html").read_text()
    assert "CKA" not in text and '"cka_matrix"' not in text
