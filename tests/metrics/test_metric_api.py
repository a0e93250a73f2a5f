"""The Metric extension point: declared state with its reduce, merge, reset, clone, and lookup by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sonde
from collect import Collect
from sonde.errors import ConfigError
from sonde.metrics import Mean, Metric, Norm, registry, resolve_metrics
from sonde.metrics.base import Capture


def l2_combine(a: Any, b: Any) -> Any:
    """A callable reduce: the L2 norm of two partial L2 norms."""
    return np.hypot(a, b)


class Tally(Metric):
    """A custom metric using every kind of reduce."""

    name = "tally"
    outputs = ("tally_sum", "tally_max", "tally_min", "tally_values", "tally_l2")
    topics = ("activations",)

    def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        self.add_state("total", default=0.0, reduce="sum")
        self.add_state("peak", default=-np.inf, reduce="max")
        self.add_state("low", default=np.inf, reduce="min")
        self.add_state("values", default=np.zeros(0), reduce="cat")
        self.add_state("l2", default=0.0, reduce=l2_combine)

    def update(self, capture: Capture) -> None:
        t = capture.tensor.detach().double() * self.scale
        self.stage("total", t.sum())
        self.stage("peak", t.max())
        self.stage("low", t.min())
        self.stage("values", t.reshape(-1))
        self.stage("l2", torch.linalg.vector_norm(t))

    def compute(self) -> dict[str, Any]:
        if not self.updates and not len(self.state["values"]):
            return {}
        return {
            "tally_sum": float(self.state["total"]),
            "tally_max": float(self.state["peak"]),
            "tally_min": float(self.state["low"]),
            "tally_values": np.asarray(self.state["values"], dtype=np.float64),
            "tally_l2": float(self.state["l2"]),
        }


def to_host(value: Any) -> np.ndarray:
    """A staged partial (a tensor, or a tuple of 0-d tensors and floats) as a float64 host array."""
    if isinstance(value, tuple):
        return np.array([float(part) for part in value], dtype=np.float64)
    return value.detach().cpu().numpy().astype(np.float64)


def feed(metric: Metric, batches: list[np.ndarray]) -> None:
    """What the bus does: update, count, move staged tensors to the host, fold them in."""
    for batch in batches:
        metric.update(Capture(torch.from_numpy(batch)))
        metric.updates += 1
        metric.absorb_staged({id(value): to_host(value) for _, value in metric.staged})


def expected(batches: list[np.ndarray], scale: float = 1.0) -> dict[str, Any]:
    x = np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64) * scale
    return {
        "tally_sum": float(np.sum(x)),
        "tally_max": float(np.max(x)),
        "tally_min": float(np.min(x)),
        "tally_values": x,
        "tally_l2": float(np.linalg.norm(x)),
    }


def assert_matches(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    np.testing.assert_allclose(got["tally_values"], want["tally_values"], rtol=1e-12)
    for name in ("tally_sum", "tally_max", "tally_min", "tally_l2"):
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def _batches(seed: int, sizes: Sequence[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) * 4 - 1 for n in sizes]


def test_custom_metric_states_reduce_as_declared() -> None:
    batches = _batches(0, [5, 1, 12, 3])
    m = Tally()
    feed(m, batches)
    assert m.staged == []
    assert_matches(m.compute(), expected(batches))
    assert m.updates == 4


def test_merge_equals_one_instance_fed_everything() -> None:
    batches = _batches(1, [4, 9, 2, 7, 3])
    whole = Tally()
    feed(whole, batches)
    left, right = Tally(), Tally()
    feed(left, batches[:2])
    feed(right, batches[2:])
    left.merge(right)
    assert_matches(left.compute(), whole.compute())
    assert_matches(left.compute(), expected(batches))
    assert left.updates == whole.updates == 5
    # The merged-in instance is left as it was.
    assert_matches(right.compute(), expected(batches[2:]))


def test_merge_with_a_fresh_instance_changes_nothing() -> None:
    batches = _batches(2, [6, 6])
    m = Tally()
    feed(m, batches)
    m.merge(Tally())
    assert_matches(m.compute(), expected(batches))
    fresh = Tally()
    fresh.merge(m)
    assert_matches(fresh.compute(), expected(batches))


def test_builtin_merge_with_a_never_updated_instance() -> None:
    m = Mean()
    feed(m, [np.array([1.0, 2.0, 6.0])])
    m.merge(Mean())
    assert m.compute() == {"mean": pytest.approx(3.0, rel=1e-12)}


def test_builtin_summary_metric_merge_equals_numpy() -> None:
    batches = _batches(3, [10, 3, 25])
    parts = []
    for batch in batches:
        m = Norm()
        feed(m, [batch])
        parts.append(m)
    first = parts[0]
    for other in parts[1:]:
        first.merge(other)
    assert first.compute()["norm"] == pytest.approx(np.linalg.norm(np.concatenate(batches)), rel=1e-9)


def test_reset_restores_defaults_and_clears_staging() -> None:
    m = Tally()
    feed(m, _batches(4, [3, 3]))
    m.update(Capture(torch.ones(2, dtype=torch.float64)))  # staged, not yet absorbed
    assert m.staged
    m.reset()
    assert m.staged == [] and m.updates == 0
    assert m.state["total"] == 0.0 and m.state["l2"] == 0.0
    assert m.state["peak"] == -np.inf and m.state["low"] == np.inf
    assert m.state["values"].shape == (0,)
    assert m.compute() == {}
    batches = _batches(5, [2, 8])
    feed(m, batches)
    assert_matches(m.compute(), expected(batches))


def test_reset_does_not_share_a_mutable_default() -> None:
    class Bag(Metric):
        name = "bag"

        def __init__(self) -> None:
            super().__init__()
            self.add_state("items", default=[], reduce=lambda a, b: a + b)

    m = Bag()
    m.state["items"].append(1)
    m.reset()
    assert m.state["items"] == []
    m.state["items"].append(2)
    assert Bag().state["items"] == [] and m.clone().state["items"] == []


def test_clone_keeps_configuration_with_independent_state() -> None:
    original = Tally(scale=3.0, every=2)
    feed(original, _batches(6, [4]))
    clone = original.clone()
    assert type(clone) is Tally and clone.scale == 3.0
    assert clone.schedule is not None and clone.schedule(4) and not clone.schedule(3)
    assert clone.updates == 0 and clone.compute() == {}
    batches = _batches(7, [5, 2])
    feed(clone, batches)
    assert_matches(clone.compute(), expected(batches, scale=3.0))
    assert_matches(original.compute(), expected(_batches(6, [4]), scale=3.0))  # untouched by the clone
    feed(original, batches)
    assert_matches(clone.compute(), expected(batches, scale=3.0))  # untouched by the original


def test_unknown_reduce_name_is_a_config_error() -> None:
    m = Tally()
    with pytest.raises(ConfigError, match="mean"):
        m.add_state("x", default=0.0, reduce="mean")


def test_custom_metric_through_a_probe_resets_every_step_and_honours_every() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    captured: dict[tuple[int, str], list[np.ndarray]] = {}
    step = [0]
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda m, a, out, name=name: captured.setdefault((step[0], name), []).append(
                out.detach().double().numpy().reshape(-1).copy()
            )
        )
    sink = Collect()
    gen = torch.Generator().manual_seed(1)
    metrics = [Tally(scale=2.0), Mean(every=2)]
    with sonde.probe(model, store=None, sinks=[sink], metrics=metrics, topics=["activations"]):
        for k in range(4):
            step[0] = k
            model(torch.randn(5, 3, generator=gen))
    tally: dict[tuple[int, str], dict[str, Any]] = {}
    means: dict[tuple[int, str], float] = {}
    for r in sink.records:
        assert r.phase == "train" and r.topic == "activations"
        if r.metric == "mean":
            means[(r.step, r.layer)] = r.value
        else:
            tally.setdefault((r.step, r.layer), {})[r.metric] = r.value
    assert set(tally) == set(captured)
    for key, parts in captured.items():
        assert_matches(tally[key], expected(parts, scale=2.0))  # this step's data only: state was reset
    assert sorted(means) == [(0, "0"), (0, "1"), (2, "0"), (2, "1")]
    for key, value in means.items():
        assert value == pytest.approx(np.mean(np.concatenate(captured[key])), rel=1e-5, abs=1e-7)


def test_resolve_unknown_name_names_the_registered_metrics() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_metrics(["mean", "no_such_metric"])
    message = str(info.value)
    assert "no_such_metric" in message
    names = sorted(registry())
    assert {"mean", "std", "var", "histogram", "update_ratio", "loss", "train_accuracy"} <= set(names)
    for name in names:
        assert name in message
    assert ", ".join(names) in message


def test_resolve_metrics_instances_dedup_and_requirements() -> None:
    mine = Tally()
    chosen = resolve_metrics(["update_ratio", mine, "mean", "mean"])
    emitted = [name for metric in chosen for name in metric.emits()]
    # mean named twice is computed once; norm is pulled in by update_ratio.
    assert sorted(emitted) == sorted(["update_ratio", *Tally.outputs, "mean", "norm"])
    assert any(metric is mine for metric in chosen)
    with pytest.raises(ConfigError):
        resolve_metrics([42])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="no_such_metric"):
        sonde.probe(nn.Linear(2, 2), store=None, metrics=["no_such_metric"])


def _server_usable() -> list[type[Metric]]:
    """Registered metrics the server's evaluator can run on shipped tensors (as metric_from_spec admits them)."""
    return [cls for cls in registry().values() if not getattr(cls, "derived", False) and not cls.reads_topics]


def _numeric_settings(cls: type[Metric]) -> set[str]:
    """Constructor arguments of ``cls`` (its own and its bases') whose default is a number, schedules aside."""
    found: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            default = param.default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                found.add(param.name)
    return found - {"every", "compute_every"}


def test_every_server_usable_metric_declares_the_bounds_of_its_numeric_settings() -> None:
    usable = _server_usable()
    assert {"histogram", "saturation", "probe_f1", "snapshot", "spectral_norm"} <= {c.name for c in usable}
    for cls in usable:
        missing = _numeric_settings(cls) - set(cls.bounds)
        assert not missing, f"{cls.__name__} declares no bound for {sorted(missing)}"
        for name, (low, high) in cls.bounds.items():
            assert low <= high, (cls.__name__, name)


@pytest.mark.parametrize(("name", "setting", "value", "bound"), [
    ("histogram", "bins", 10_000_000, "from 1 to 4096"),
    ("histogram", "bins", 0, "from 1 to 4096"),
    ("histogram", "bins", 2.5, "an integer"),
    ("histogram", "bins", "64", "an integer"),
    ("saturation", "top_k", 10**9, "from 1 to 4096"),
    ("saturation", "sketch_size", 10**9, "from 2 to 8192"),
    ("probe_f1", "samples", 10**9, "from 8 to 100000"),
    ("cluster_mi", "samples", 10**9, "from 8 to 100000"),
    ("snapshot", "max_side", 10**6, "from 1 to 256"),
    ("snapshot", "max_values", 10**9, "from 1 to 65536"),
    ("spectral_norm", "max_iter", 10**9, "from 1 to 10000"),
    ("spectral_norm", "tol", float("nan"), "a number from 1e-12 to 1.0"),
])
def test_absurd_settings_are_a_clear_value_error_at_construction(name: str, setting: str, value: Any,
                                                                  bound: str) -> None:
    cls = registry()[name]
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({setting}=\) expects .*{bound}"):
        cls(**{setting: value})
    cls(**{setting: cls.bounds[setting][1]})  # the bound itself is allowed
