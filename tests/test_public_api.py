"""The public surface is exactly what the docs' API reference (docs/reference/) documents."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest

import sonde
import sonde.functional
import sonde.metrics
import sonde.sinks


def test_top_level_exports() -> None:
    assert sorted(sonde.__all__) == sorted(
        [
            "TOPICS", "ConfigError", "Graph", "GraphError", "LayerFilterError", "Probe", "ProbeError", "Record",
            "RunExistsError",
            "SondeError", "StoreError", "every", "graph", "load", "log_spaced", "probe",
        ]
    )
    for name in sonde.__all__:
        assert getattr(sonde, name) is not None


def test_every_public_name_of_the_package_is_exported_and_documented() -> None:
    # Built from the package itself (as httpx's test does), so a new public name cannot slip in unseen.
    public = {
        name for name, value in vars(sonde).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(sonde.__all__)
    reference = (Path(__file__).parents[1] / "docs" / "reference" / "sonde.md").read_text()
    assert "::: sonde\n" in reference  # the reference renders every name of sonde.__all__


def test_probe_signature_follows_the_design() -> None:
    from sonde.probe.torch import TorchProbe

    params = list(inspect.signature(TorchProbe.__init__).parameters)
    assert params == [
        "self", "model", "run", "store", "server", "optimizer", "layers", "topics", "metrics", "every", "budget",
        "max_interval", "depth", "sinks", "resume", "per_rank", "probe_set",
    ]


def test_topics_are_the_design_vocabulary() -> None:
    assert sonde.TOPICS == (
        "activations", "inputs", "output_grads", "weights", "biases", "weight_grads", "bias_grads",
        "weight_updates", "bias_updates", "loss", "labels", "outputs",
    )


def test_builtin_metrics_and_sinks_register_through_entry_points() -> None:
    metrics = sonde.metrics.registry()
    for name in ("mean", "std", "var", "min", "max", "abs_mean", "norm", "zero_frac", "nonfinite_frac",
                 "histogram", "update_ratio", "loss", "train_accuracy", "stats",
                 "cka", "svcca", "cka_matrix", "probe_f1", "cluster_mi", "test_accuracy",
                 "saturation", "spectral_norm", "condition_number", "alerts", "snapshot"):
        assert name in metrics
    assert {"store", "tensorboard", "csv", "console", "remote", "video"} <= set(sonde.sinks.registry())


def test_lazily_imported_names_are_the_real_classes() -> None:
    from sonde.server.api.tensors import ServerMetric
    from sonde.sinks.remote import RemoteSink
    from sonde.sinks.video import VideoSink

    assert sonde.metrics.ServerMetric is ServerMetric
    assert sonde.sinks.RemoteSink is RemoteSink
    assert sonde.sinks.VideoSink is VideoSink
    with pytest.raises(AttributeError):
        _ = sonde.metrics.NoSuchMetric


def test_every_public_name_has_a_docstring() -> None:
    for module in (sonde, sonde.metrics, sonde.functional, sonde.sinks):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, tuple):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
