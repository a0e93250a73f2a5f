"""``sonde.keras.SondeCallback``: probes for Keras 3 models trained with ``model.fit``.

One callback for the three backends; :func:`make_probe` picks the backend's probe when ``fit``
begins: :class:`KerasProbe` (TensorFlow, this module), :class:`~sonde.probe.keras_jax.KerasJaxProbe`
(a recording twin of the jitted step, as here) and :class:`~sonde.probe.keras_torch.KerasTorchProbe`
(the torch adapter's hooks on the Keras layers, each a ``torch.nn.Module`` there).

How, on TensorFlow: at ``on_train_begin`` the callback keeps the compiled training function Keras made and builds
a second one from the same ``train_step``, traced with recording on: each probed layer's ``call``
notes its input and output, the output passes through an identity whose gradient notes the
gradient flowing back (``output_grads``), ``compute_loss`` notes the batch's loss, labels and
predictions, and the optimizer's ``apply_gradients`` notes each weight before the update, its
gradient and the update. The recorded tensors come back as extra outputs of that function, so
the step stays one compiled graph (XLA included), and the callback routes them to the bus. At a
step the schedule (``every=``) does not record, the original function runs: unrecorded steps cost
nothing. Validation inside ``fit`` is recorded the same way, under the ``eval`` phase (activations,
inputs and loss), at the step whose weights it used.

Layer names are the layers' names below the model, joined with dots for nested models
(``encoder.dense_1``); a layer called twice in one step is ``name`` and ``name:2``. As for
PyTorch, the default selection is every leaf layer and every layer owning weights; ``depth=k``
takes layers k levels down. An RNN (``LSTM``, ``GRU``, ...) is a leaf holding its cell's weights:
the cell runs inside the RNN's loop, where no tensor can be taken out. Trainable variables whose
name starts with ``bias`` are biases, every other trainable variable is a weight.

Steps are ``fit``'s optimizer steps, counted from 0. With ``steps_per_execution=N`` Keras runs N
steps in one call; the probe then sees each call as one step (the last of the N).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import torch

from sonde.errors import GraphError, ProbeError
from sonde.probe import kit
from sonde.probe.core import Probe, shared_tensor
from sonde.records import NETWORK

if TYPE_CHECKING or keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # the backend is chosen when Keras is imported: only that one is loaded
if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["KerasProbe", "SondeCallback", "select_layers"]

log = logging.getLogger("sonde")

#: The key of the extra output the recording function returns next to Keras's logs.
_KEY = "__sonde__"


def _children(layer: Any) -> list[Any]:
    """Sublayers, but not an RNN's cell: the cell runs inside the RNN's loop, where its tensors
    cannot be recorded, so an RNN (SimpleRNN, LSTM, GRU, ...) is one layer with its cell's weights."""
    if isinstance(layer, keras.layers.RNN):
        return []
    return [c for c in layer._flatten_layers(include_self=False, recursive=False)
            if not isinstance(c, keras.layers.InputLayer)]


def _own_variables(layer: Any) -> list[Any]:
    return list(getattr(layer, "_trainable_variables", []))


def select_layers(model: Any, layers: kit.LayerFilter = None, depth: int | None = None) -> dict[str, Any]:
    """The Keras layers to probe, by dotted name, in the model's order
    (:func:`~sonde.probe.kit.choose_layers`'s rule)."""
    named: list[tuple[str, Any, int, bool, bool]] = []

    def walk(layer: Any, prefix: str, level: int) -> None:
        for child in _children(layer):
            name = f"{prefix}{child.name}"
            named.append((name, child, level, not _children(child), bool(_own_variables(child))))
            walk(child, name + ".", level + 1)

    walk(model, "", 1)
    return kit.choose_layers(named, layers, depth, type(model).__name__)


def _first_float(value: Any) -> Any:
    """The first floating-point tensor in ``value`` (depth-first, in ``tf.nest``'s order)."""
    return kit.first_leaf(value, _is_float, tf.nest.flatten)


def _is_float(value: Any) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating


def _replace(value: Any, old: Any, new: Any) -> Any:
    flat = tf.nest.flatten(value)
    return tf.nest.pack_sequence_as(value, [new if item is old else item for item in flat])


class _Recorder:
    """What the recording function notes while it is traced (symbolic tensors of its graph)."""

    def __init__(self) -> None:
        self.active = False
        self.training = True
        # (layer, kind) of each entry of the "variables" output, per function (training or not);
        # fixed when the function is traced
        self.plans: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
        self.reset()

    def reset(self) -> None:
        self.tensors: dict[tuple[str, str], Any] = {}  # (layer, topic) -> tensor, for layer calls
        # (layer, "weights" | "biases", before, gradient, after) for each updated variable
        self.variables: list[tuple[str, str, Any, Any, Any]] = []
        self.call_names = kit.CallNames()
        self.loss: Any = None
        self.labels: Any = None
        self.outputs: Any = None
        self.graph: Any = None  # the graph of the step being traced
        self.nested: set[str] = set()  # probed layers called only inside a loop or branch

    def layer_call(self, name: str, args: tuple[Any, ...], output: Any) -> Any:
        if tf.compat.v1.get_default_graph() is not self.graph:
            # called inside a loop or branch (an RNN's cell in its while loop): its tensors cannot
            # leave that body; its variables are still recorded through the optimizer
            self.nested.add(name)
            return output
        layer = self.call_names(name)
        x = _first_float(args)
        if x is not None:
            self.tensors[(layer, "inputs")] = x
        y = _first_float(output)
        if y is None:
            return output
        self.tensors[(layer, "activations")] = y
        if not self.training:
            return output

        @tf.custom_gradient  # type: ignore[misc]
        def noted(t: Any) -> Any:
            def grad(dy: Any) -> Any:
                self.tensors[(layer, "output_grads")] = dy
                return dy
            return tf.identity(t), grad

        return _replace(output, y, noted(y))


def check_model(model: Any, backend: str) -> None:
    """Raise unless ``model`` is a ``keras.Model`` of a Keras running on ``backend``, not probed yet."""
    if not isinstance(model, keras.Model):
        raise ProbeError(f"sonde.keras expects a keras.Model, got {type(model).__module__}.{type(model).__name__}")
    if keras.backend.backend() != backend:
        raise ProbeError(f"this probe records Keras on the {backend!r} backend; this Keras runs on "
                         f"{keras.backend.backend()!r}: use sonde.keras.SondeCallback, which picks the backend's probe")
    if getattr(model, "_sonde_probe", None) is not None:
        raise ProbeError(f"{model.name} is already probed; close that probe first")


def make_probe(model: Any, **options: Any) -> Any:
    """The probe for ``model`` on the Keras backend in use: TensorFlow and JAX record a twin of
    the compiled training step, torch hooks the layers as :class:`~sonde.probe.torch.TorchProbe` does."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return KerasProbe(model, **options)
    if backend == "jax":
        from sonde.probe.keras_jax import KerasJaxProbe

        return KerasJaxProbe(model, **options)
    if backend == "torch":
        from sonde.probe.keras_torch import KerasTorchProbe

        return KerasTorchProbe(model, **options)
    raise ProbeError(f"sonde.keras records Keras on the tensorflow, jax and torch backends; this Keras runs on "
                     f"{backend!r} (set KERAS_BACKEND to one of them)")


def send_graph(probe: Probe, model: Any) -> None:
    """``model``'s graph (:func:`~sonde.graph.keras.keras_graph`) to the probe's sinks, on every
    backend; a model the graph cannot be read from is logged, and the run goes on without a graph view."""
    from sonde.graph.keras import keras_graph

    try:
        graph = keras_graph(model).to_dict()
    except GraphError as exc:
        log.info("sonde: no graph view for this run: %s", exc)
        return
    for runner in probe._runners:
        runner.submit_graph(graph)


class KerasProbe(Probe):
    """Probe of a Keras 3 model during ``fit``; made by :class:`SondeCallback`."""

    framework = "keras"
    backend = "tensorflow"  #: the Keras backend this class records (one class per backend)

    def __init__(self, model: Any, **options: Unpack[kit.ProbeOptions]) -> None:
        check_model(model, self.backend)
        self.model = model
        self.layers = select_layers(model, options.get("layers"), options.get("depth"))
        self.variables = kit.deepest_owners(self.layers, lambda layer: layer.trainable_variables)
        super().__init__(model, self.layers,
                         {name: {v.name: v.shape for v in variables} for name, variables in self.variables.items()},
                         optimizer=type(model.optimizer).__name__ if model.optimizer else None, **options)
        self.count_steps(True)
        self.param_publisher = kit.ParameterPublisher(self, shared_tensor)
        self._recorder = _Recorder()
        self._patches = kit.Patches()
        self._plain_train: Any = None
        self._plain_test: Any = None
        object.__setattr__(model, "_sonde_probe", self)

    # -- attaching -------------------------------------------------------------------------
    def attach(self) -> None:
        """Swap in the recording training (and test) functions; called at ``on_train_begin``.
        Also hands the model's graph (:func:`sonde.graph.keras.keras_graph`) to the sinks."""
        model = self.model
        self._guard("reading the model graph", lambda: send_graph(self, self.model))
        for name, layer in self.layers.items():
            self._patches.set(layer, "call", self._layer_call(name, layer.call))
        self._patches.set(model, "compute_loss", self._compute_loss(model.compute_loss))
        if model.optimizer is not None:
            optimizer = model.optimizer
            self._patches.set(optimizer, "apply_gradients", self._apply_gradients(optimizer.apply_gradients))
        model.make_train_function()
        self._plain_train = model.train_function
        recording_train = model._make_function(self._recording_step(model.train_step, training=True))
        self._set(model, "train_function", self._dispatch(self._plain_train, recording_train, "train"))
        model.make_test_function()
        self._plain_test = model.test_function
        recording_test = model._make_function(self._recording_step(model.test_step, training=False))
        self._set(model, "test_function", self._dispatch(self._plain_test, recording_test, "eval"))

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        object.__setattr__(obj, attr, value)

    def detach(self) -> None:
        self._patches.restore()
        model = self.model
        if self._plain_train is not None:
            self._set(model, "train_function", self._plain_train)
            self._set(model, "test_function", self._plain_test)
            self._plain_train = self._plain_test = None
        if getattr(model, "_sonde_probe", None) is self:
            object.__delattr__(model, "_sonde_probe")

    # -- what the recording function notes while traced -----------------------------------------
    def _layer_call(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self._recorder

        def recorded_call(*args: Any, **kwargs: Any) -> Any:
            output = call(*args, **kwargs)
            if recorder.active:
                output = recorder.layer_call(name, args, output)
            return output

        return recorded_call

    def _compute_loss(self, compute_loss: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self._recorder

        def recorded_compute_loss(*args: Any, **kwargs: Any) -> Any:
            loss = compute_loss(*args, **kwargs)
            if recorder.active:
                names = ("x", "y", "y_pred", "sample_weight")
                given = {**dict(zip(names, args, strict=False)), **kwargs}
                recorder.loss, recorder.labels, recorder.outputs = loss, given.get("y"), given.get("y_pred")
            return loss

        return recorded_compute_loss

    def _apply_gradients(self, apply_gradients: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self._recorder
        owner = {id(v): layer for layer, variables in self.variables.items() for v in variables}

        def recorded_apply_gradients(grads_and_vars: Any) -> Any:
            pairs = list(grads_and_vars)
            if not recorder.active:
                return apply_gradients(pairs)
            noted = [(owner[id(v)], kit.param_topic(v.name), v, tf.identity(v.value), tf.convert_to_tensor(g))
                     for g, v in pairs if id(v) in owner and g is not None]
            result = apply_gradients(pairs)
            # after - before is taken by the metrics' own pass (minus=), never materialised here
            recorder.variables += [(layer, kind, before, grad, tf.identity(v.value))
                                   for layer, kind, v, before, grad in noted]
            return result

        return recorded_apply_gradients

    def _recording_step(self, step: Callable[[Any], Any], training: bool) -> Callable[[Any], Any]:
        recorder = self._recorder

        def recording_step(data: Any) -> Any:
            recorder.reset()
            recorder.active, recorder.training = True, training
            recorder.graph = tf.compat.v1.get_default_graph()
            try:
                logs = step(data)
            finally:
                recorder.active = False
            noted = {
                "calls": {f"{layer}\x1f{topic}": tensor for (layer, topic), tensor in recorder.tensors.items()},
                "variables": tuple((before, grad, after) for _, _, before, grad, after in recorder.variables),
                "step": {k: v for k, v in (("loss", recorder.loss), ("labels", recorder.labels),
                                           ("outputs", recorder.outputs)) if isinstance(v, tf.Tensor)},
            }
            recorder.plans[training] = [(layer, kind) for layer, kind, *_ in recorder.variables]
            inside = sorted(recorder.nested - {layer for layer, _ in recorder.tensors})
            if inside:
                log.warning("sonde: %s run inside a loop or branch of the step (an RNN's cell): their "
                            "activations, inputs and output_grads cannot be recorded, their weights are; "
                            "probe the enclosing layer for its activations (depth= or layers=)",
                            ", ".join(inside))
            return {**logs, _KEY: noted}

        return recording_step

    # -- per step, eagerly -------------------------------------------------------------------
    def _dispatch(self, plain: Callable[[Any], Any], recording: Callable[[Any], Any],
                  phase: str) -> Callable[[Any], Any]:
        usable = True  # False once the recording step could not be built

        def function(iterator: Any) -> Any:
            nonlocal usable
            if phase == "train":
                self.begin_train_forward()
            wanted = usable and not self.closed and any(self.wants(t, phase) for t in self.bus.topics)
            if not wanted:
                logs = plain(iterator)
            else:
                try:
                    logs = dict(recording(iterator))
                except tf.errors.OpError:
                    raise  # the step itself failed while running (as Keras's own would)
                except Exception as exc:
                    log.exception("sonde: could not build the recording %s step; %s goes on unrecorded: %s",
                                  phase, "training" if phase == "train" else "validation", exc)
                    usable = False
                    logs = plain(iterator)
                else:
                    noted = logs.pop(_KEY)
                    self._guard(f"{phase} capture", lambda: self._publish(noted, phase))
            if phase == "train":
                self.optimizer_stepped()
            return logs

        return function

    def _publish(self, noted: dict[str, Any], phase: str) -> None:
        for key, tensor in noted["calls"].items():
            layer, topic = key.split("\x1f")
            if self.wants(topic, phase):
                self.publish(layer, topic, shared_tensor(tensor), phase=phase)
        plan = self._recorder.plans[phase == "train"]
        for (layer, kind), (before, grad, after) in zip(plan, noted["variables"], strict=True):
            self.param_publisher.publish(layer, kind, before, grad, after, phase=phase)
        step = {k: shared_tensor(v) for k, v in noted["step"].items()}
        loss, outputs = step.get("loss"), step.get("outputs")
        if loss is not None and self.wants("loss", phase):
            self.publish(NETWORK, "loss", loss, phase=phase)
        if outputs is not None and self.wants("outputs", phase):
            self.publish(NETWORK, "outputs", outputs, phase=phase, labels=_class_labels(step.get("labels"), outputs))


def _class_labels(labels: torch.Tensor | None, outputs: torch.Tensor | None) -> torch.Tensor | None:
    """Integer class labels for ``train_accuracy``: sparse labels as they are, one-hot labels by
    argmax; None where the outputs are not one score per class (binary or regression outputs)."""
    if labels is None or outputs is None or outputs.dim() < 2 or outputs.shape[-1] < 2:
        return None
    if labels.is_floating_point():
        if labels.shape != outputs.shape:
            return None
        return labels.argmax(dim=-1)
    return labels.reshape(outputs.shape[:-1])


class SondeCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Probe a Keras 3 model while ``model.fit`` trains it (TensorFlow, JAX or torch backend).

    Args:
        **probe_kwargs: :func:`sonde.probe`'s keywords except ``optimizer`` (the model's) and
            ``probe_set``: ``run``, ``store``, ``server``, ``layers``, ``topics``, ``metrics``,
            ``every``, ``depth``, ``sinks``, ``resume``.

    Example:
        >>> import sonde.keras                                                  # doctest: +SKIP
        >>> model.fit(x, y, epochs=5, callbacks=[sonde.keras.SondeCallback(run="mnist-mlp")])  # doctest: +SKIP
    """

    def __init__(self, **probe_kwargs: Any) -> None:
        super().__init__()
        kit.check_keywords("SondeCallback", probe_kwargs, kit.KEYWORDS, " (the optimizer is the model's)")
        self.probe_kwargs = probe_kwargs
        self.probe: Any = None  # KerasProbe, KerasJaxProbe or KerasTorchProbe: make_probe's choice

    def on_train_begin(self, logs: Any = None) -> None:
        self._close("finished")  # a second fit with the same callback is a second run
        self.probe = make_probe(self.model, **self.probe_kwargs)  # a bad argument stops fit here, at once
        try:
            self.probe.attach()
        except Exception as exc:  # Keras internals sonde relies on changed: train unprobed
            log.exception("sonde: could not attach to %s's fit (Keras %s); training goes on unrecorded: %s",
                          self.model.name, keras.__version__, exc)
            self._close("failed")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.probe is not None:
            self.probe._guard("marking the end of an epoch", self.probe.end_epoch)

    def on_train_end(self, logs: Any = None) -> None:
        self._close("finished")

    def close(self, status: str = "failed") -> None:
        """Close the probe of a ``fit`` that raised (Keras calls no callback then); idempotent."""
        self._close(status)

    def _close(self, status: str) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close(status)
