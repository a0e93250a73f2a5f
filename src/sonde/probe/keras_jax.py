"""Keras 3 on the JAX backend: a recording twin of ``fit``'s jitted step.

On this backend ``fit`` runs ``train_step(state, data)``, a pure function of the variables'
values, compiled with ``jax.jit``. As on TensorFlow (:class:`sonde.probe.keras.KerasProbe`),
:class:`KerasJaxProbe` keeps that compiled function and builds a second one, also jitted, that is
the same step with recording on: each probed layer's ``call`` notes its input and output, and
adds to the output a zero array taken as an argument of the differentiated loss, so that
``jax.value_and_grad`` of Keras's own ``compute_loss_and_updates`` gives, in the one backward
pass that also gives the weights' gradients, the gradient with respect to each layer's output
(``output_grads``). The optimizer's ``stateless_apply`` and the metrics' update then run as in
Keras's ``train_step``; the step returns the variables before, their gradients and the variables
after next to Keras's logs, and the callback routes them to the bus. The new state is the one
the recording step computed: training goes on from it exactly as from Keras's own step. Steps the
schedule does not record run Keras's own function. Validation is recorded the same way (the
``eval`` phase: activations, inputs, loss and outputs).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from keras.src.trainers import data_adapters

from sonde.probe import kit
from sonde.probe.keras import _KEY, KerasProbe, _Recorder, send_graph

__all__ = ["KerasJaxProbe"]

log = logging.getLogger("sonde")


def _is_float(value: Any) -> bool:
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)


class _JaxRecorder(_Recorder):
    """What the recording step notes while it is traced (tracers of the jitted step)."""

    def reset(self) -> None:
        super().reset()
        self.zeros: dict[str, Any] | None = None  # layer call -> the zeros added to its output

    def layer_call(self, name: str, args: tuple[Any, ...], output: Any) -> Any:
        layer = self.call_names(name)
        x = kit.first_leaf(args, _is_float, jax.tree.leaves)
        if x is not None:
            self.tensors[(layer, "inputs")] = x
        y = kit.first_leaf(output, _is_float, jax.tree.leaves)
        if y is None:
            return output
        if self.zeros is not None and layer in self.zeros:
            # y + 0: the same values, and the loss's gradient with respect to the zeros is its
            # gradient with respect to the output
            noted = y + self.zeros[layer]
            output = kit.replace_leaf(output, y, noted)
            y = noted
        self.tensors[(layer, "activations")] = y
        return output


class KerasJaxProbe(KerasProbe):
    """Probe of a Keras 3 model on the JAX backend during ``fit``; made by
    :class:`sonde.keras.SondeCallback`."""

    backend = "jax"

    def __init__(self, model: Any, **options: Any) -> None:
        super().__init__(model, **options)
        self._recorder = self._jax_recorder = _JaxRecorder()
        owner = {id(v): layer for layer, variables in self.variables.items() for v in variables}
        # (index in the model's trainable variables, layer, kind) of each probed variable
        self._plan = [(i, owner[id(v)], kit.param_topic(v.name))
                      for i, v in enumerate(model.trainable_variables) if id(v) in owner]
        self._recorder.plans[True] = [(layer, kind) for _, layer, kind in self._plan]

    def attach(self) -> None:
        """Swap in the recording training (and test) functions; called at ``on_train_begin``."""
        model = self.model
        self._guard("reading the model graph", lambda: send_graph(self, self.model))
        for name, layer in self.layers.items():
            self._patches.set(layer, "call", self._layer_call(name, layer.call))
        model.make_train_function()
        self._plain_train = model.train_function
        recording_train = model._make_function(jax.jit(self._recording_train_step))
        self._set(model, "train_function", self._dispatch_jax(self._plain_train, recording_train, "train"))
        model.make_test_function()
        self._plain_test = model.test_function
        recording_test = model._make_function(jax.jit(self._recording_test_step))
        self._set(model, "test_function", self._dispatch_jax(self._plain_test, recording_test, "eval"))

    # -- the recording steps (traced once each by jax.jit) ---------------------------------------
    def _losses(self, state: Any, data: Any, training: bool) -> Callable[[Any, Any], Any]:
        """Keras's loss of ``data`` as a function of the trainable values and the zeros added to
        the layers' outputs, with what the recorder noted as auxiliary outputs."""
        model, recorder = self.model, self._jax_recorder
        non_trainable, metrics = state[1], state[-1]
        optimizer = state[2] if training else None
        x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(data)

        def loss(trainable: Any, zeros: Any) -> Any:
            recorder.reset()
            recorder.active, recorder.training, recorder.zeros = True, training, zeros
            try:
                value, aux = model.compute_loss_and_updates(trainable, non_trainable, metrics, x, y, sample_weight,
                                                            training=training, optimizer_variables=optimizer)
            finally:
                recorder.active = False
            calls = {f"{layer}\x1f{topic}": t for (layer, topic), t in recorder.tensors.items()}
            # the loss before any loss scaling, the predictions and the labels, as compute_loss saw them
            step = {k: v for k, v in (("loss", aux[0]), ("labels", y), ("outputs", aux[1])) if _is_array(v)}
            return value, (aux, calls, step)

        return loss

    def _recording_train_step(self, state: Any, data: Any) -> Any:
        model = self.model
        trainable, _, optimizer_variables, _ = state
        loss = self._losses(state, data, training=True)
        traced = jax.eval_shape(loss, trainable, None)[1][1]
        zeros = {key.split("\x1f")[0]: jnp.zeros(s.shape, s.dtype) for key, s in traced.items()
                 if key.endswith("\x1factivations")}
        (_, (aux, calls, step)), (grads, output_grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            trainable, zeros)
        unscaled_loss, y_pred, non_trainable, metrics = aux
        new_trainable, optimizer_variables = model.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(data)
        logs, metrics = model._update_metrics_variables(metrics, unscaled_loss, x, y, y_pred, sample_weight)
        calls.update({f"{layer}\x1foutput_grads": g for layer, g in output_grads.items()})
        noted = {"calls": calls, "step": step,
                 "variables": tuple((trainable[i], grads[i], new_trainable[i]) for i, _, _ in self._plan)}
        return {**logs, _KEY: noted}, (new_trainable, non_trainable, optimizer_variables, metrics)

    def _recording_test_step(self, state: Any, data: Any) -> Any:
        model = self.model
        trainable = state[0]
        _, (aux, calls, step) = self._losses(state, data, training=False)(trainable, None)
        unscaled_loss, y_pred, non_trainable, metrics = aux
        x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(data)
        logs, metrics = model._update_metrics_variables(metrics, unscaled_loss, x, y, y_pred, sample_weight)
        noted = {"calls": calls, "step": step, "variables": ()}
        return {**logs, _KEY: noted}, (trainable, non_trainable, metrics)

    # -- per step, eagerly -------------------------------------------------------------------
    def _dispatch_jax(self, plain: Callable[[Any, Any], Any], recording: Callable[[Any, Any], Any],
                      phase: str) -> Callable[[Any, Any], Any]:
        usable = True  # False once the recording step could not be built

        def function(state: Any, iterator: Any) -> Any:
            nonlocal usable
            if phase == "train":
                self.begin_train_forward()
            wanted = usable and not self.closed and any(self.wants(t, phase) for t in self.bus.topics)
            if not wanted:
                logs, state = plain(state, iterator)
            else:
                first = next(iterator)  # kept, so that Keras's own step can take it if recording fails
                try:
                    logs, state = recording(state, itertools.chain([first], iterator))
                    logs = dict(logs)
                except Exception as exc:
                    log.exception("sonde: could not build the recording %s step; %s goes on unrecorded: %s",
                                  phase, "training" if phase == "train" else "validation", exc)
                    usable = False
                    logs, state = plain(state, itertools.chain([first], iterator))
                else:
                    noted = logs.pop(_KEY)
                    self._guard(f"{phase} capture", lambda: self._publish(noted, phase))
            if phase == "train":
                self.optimizer_stepped()
            return logs, state

        return function


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array)

