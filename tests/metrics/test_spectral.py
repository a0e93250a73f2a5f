"""``spectral_norm`` and ``condition_number`` of weights against ``np.linalg.svd`` in the test.

The reference weights are copied by the test right before each ``optimizer.step()`` (the values
step k's forward used), over a training run in which they change, and every recorded value must
agree with numpy's largest singular value within 1e-3 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.functional import condition_number, spectral_norm
from sonde.metrics import ConditionNumber, SpectralNorm


def svals(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), compute_uv=False)


@pytest.mark.parametrize("shape", [(64, 64), (10, 300), (300, 10), (8, 3, 3, 3), (17,)])
def test_functional_spectral_norm_and_condition_number(shape: tuple[int, ...]) -> None:
    w = np.random.default_rng(sum(shape)).standard_normal(shape)
    s = svals(w if w.ndim > 1 else w.reshape(-1, 1))
    assert spectral_norm(w) == pytest.approx(s[0], rel=1e-6)
    assert spectral_norm(torch.from_numpy(w)) == pytest.approx(s[0], rel=1e-6)
    assert condition_number(w) == pytest.approx(s[0] / s[-1], rel=1e-9)


def test_condition_number_is_a_ratio_not_a_product() -> None:
    assert condition_number(np.diag([4.0, 0.5])) == pytest.approx(8.0)  # Ikkuna returned 2.0
    assert condition_number(np.array([[1.0, 0.0], [0.0, 0.0]])) == np.inf  # rank-deficient
    assert spectral_norm(np.zeros((3, 3))) == 0.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"SpectralNorm\(tol=\) expects a number from 1e-12 to 1.0; got 0"):
        SpectralNorm(tol=0)
    with pytest.raises(ValueError, match="at least one dimension, got a scalar"):
        spectral_norm(np.float64(3.0))


@pytest.mark.parametrize("shape", [(64, 64), (10, 300), (300, 10), (17, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_iteration_on_the_tensors_device_agrees_with_svd(shape: tuple[int, int], dtype: torch.dtype) -> None:
    from sonde.functional.spectral import top_singular_value_torch

    w = np.random.default_rng(sum(shape)).standard_normal(shape)
    reads: list[tuple[int, ...]] = []

    def read(t: torch.Tensor) -> np.ndarray:
        reads.append(tuple(t.shape))
        return t.numpy()

    sigma, basis, cold = top_singular_value_torch(torch.from_numpy(w).to(dtype), tol=1e-6, read=read)
    assert sigma == pytest.approx(svals(w)[0], rel=1e-5)
    k = min(8, *shape)
    assert basis.dtype == dtype and tuple(basis.shape) == (shape[1], k)
    assert set(reads) == {(k, k)}  # only the block's Gram matrix comes back, once per iteration
    moved = w + 1e-3 * np.random.default_rng(1).standard_normal(shape)
    again, _, warm = top_singular_value_torch(torch.from_numpy(moved).to(dtype), basis, tol=1e-6)
    assert again == pytest.approx(svals(moved)[0], rel=1e-5)
    assert warm <= max(2, cold // 3)


def test_where_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"SpectralNorm\(where=\) expects one of 'auto', 'device', 'host', got 'gpu'"):
        SpectralNorm(where="gpu")


@pytest.mark.parametrize("where", ["auto", "device"])
def test_spectral_norm_over_a_training_run_agrees_with_svd_at_every_step(collect: Collect, where: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``where="device"`` on the CPU runs the path a CUDA weight takes: the copy kept as a tensor
    in the metric's state, iterated in torch on the worker, read back a Gram matrix at a time."""
    import sonde.metrics.spectral as module

    on_device = []
    iterate = module.top_singular_value_torch

    def counted(w: torch.Tensor, *args: object, **kwargs: object) -> tuple[float, torch.Tensor, int]:
        on_device.append(tuple(w.shape))
        return iterate(w, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "top_singular_value_torch", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 7))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # large steps: the weights move
    gen = torch.Generator().manual_seed(2)
    expected: dict[tuple[int, str], np.ndarray] = {}
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect], every=1,
                     metrics=[SpectralNorm(where=where), ConditionNumber(compute_every=4, where=where)]) as p:
        for step in range(12):
            x, y = torch.randn(32, 48, generator=gen), torch.randint(0, 7, (32,), generator=gen)
            nn.functional.cross_entropy(model(x), y).backward()
            for name in ("0", "2", "4"):
                expected[(step, name)] = svals(model.get_submodule(name).weight.detach().numpy())
            opt.step()
            opt.zero_grad()
        p.flush()
    first, last = expected[(0, "0")][0], expected[(11, "0")][0]
    assert abs(last - first) / first > 0.05, "the weights must change for this test to mean anything"
    for (step, layer), s in expected.items():
        got = collect.value(step=step, layer=layer, topic="weights", metric="spectral_norm")
        assert got == pytest.approx(s[0], rel=1e-3), (step, layer)
        if step % 4 == 0:
            cond = collect.value(step=step, layer=layer, topic="weights", metric="condition_number")
            assert cond == pytest.approx(s[0] / s[-1], rel=1e-9)
    assert {r.step for r in collect.find(metric="condition_number")} == {0, 4, 8}
    assert len(on_device) == (3 * 12 if where == "device" else 0)  # three layers, twelve steps


def test_warm_start_needs_fewer_iterations_and_several_matrices_take_the_largest(collect: Collect) -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(20, 30)
    model = nn.Sequential(lstm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    metric = SpectralNorm()
    expected = []
    with sonde.probe(model, store=None, optimizer=opt, sinks=[collect], metrics=[metric]) as p:
        for _ in range(3):
            model(torch.randn(5, 4, 20))[0].sum().backward()
            expected.append(max(svals(lstm.weight_ih_l0.detach().numpy())[0],
                                svals(lstm.weight_hh_l0.detach().numpy())[0]))
            opt.step()
            opt.zero_grad()
        p.flush()
    got = [collect.value(step=s, layer="0", metric="spectral_norm") for s in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-3)

    from sonde.functional.spectral import top_singular_value

    w = np.random.default_rng(0).standard_normal((200, 200))
    _, basis, cold = top_singular_value(w, tol=1e-5)
    _, _, warm = top_singular_value(w + 1e-3 * np.random.default_rng(1).standard_normal((200, 200)), basis, tol=1e-5)
    assert warm < cold / 3
