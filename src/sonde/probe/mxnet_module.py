"""``sonde.mxnet.probe_module``: probes for MXNet Symbol models trained with ``mx.mod.Module``.

How: the module's ``forward`` and ``update`` are wrapped on the instance, so ``Module.fit`` and
hand-written ``forward``/``backward``/``update`` loops are seen alike. The first forward after
``bind`` installs a monitor callback on the executor (``Executor.set_monitor_callback``, what
``mx.mon.Monitor`` uses). The executor calls it with each operator's output as the operator is
pushed; on a step the schedule records, the callback publishes the selected symbols' outputs
(``activations``) and the outputs feeding them (``inputs``); on other steps it only releases the
array handle, as ``mx.mon.Monitor`` does between its intervals. ``output_grads`` is the first
input of each operator's backward node (``<name>_backward_input0``, the gradient flowing into
it); on the passes that record it the callback also sees operator inputs (``monitor_all``,
switched off again for the others). ``update()`` gives the
parameters (``arg_dict``) and their gradients (``grad_dict``) before it, and the update (after
minus before). Arrays reach the metrics through DLPack, read at once: the executor reuses
intermediate buffers.

Steps are ``update()`` calls. ``forward(is_train=False)`` (as ``fit`` and ``score`` do on
validation data) is ``eval``, filed at the step whose weights it used. Layers are the symbol's
operator nodes, named as the symbol names them (``fc1``, ``relu1``); a parameter
(``fc1_weight``) belongs to the operator that takes it, and is a bias when its name after the
last ``_`` starts with ``bias``. With several contexts, the first context's executor (its share
of the batch) is recorded.
"""

from __future__ import annotations

import ctypes
import json
import logging
from typing import TYPE_CHECKING, Any

import mxnet as mx
from mxnet.base import _LIB, NDArrayHandle, check_call, py_str

from sonde.errors import ProbeError
from sonde.probe import kit
from sonde.probe.mxnet import NDArrayProbe, to_torch

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["MXNetModuleProbe", "probe_module", "select_symbols"]

log = logging.getLogger("sonde")

#: Operators whose backward ignores the gradient arriving at their output: a loss head's
#: gradient comes from its label, so it has no ``output_grads``.
_LOSS_HEADS = frozenset({"SoftmaxOutput", "LinearRegressionOutput", "LogisticRegressionOutput",
                         "MAERegressionOutput", "SVMOutput", "MakeLoss", "make_loss", "BlockGrad", "stop_gradient"})

_ACTIVE_TOPICS = ("activations", "inputs", "output_grads")


class SymbolNode:
    """One operator node of a Symbol graph; each operator gets a subclass named for it
    (``FullyConnected``), which is the layer type sonde records."""

    def __init__(self, name: str, op: str, inputs: list[tuple[str, int, bool]]) -> None:
        self.name = name
        self.op = op
        self.inputs = inputs  # (producer node, its output index, whether the producer is a variable)


_node_types: dict[str, type[SymbolNode]] = {}


def _node(name: str, op: str, inputs: list[tuple[str, int, bool]]) -> SymbolNode:
    cls = _node_types.get(op)
    if cls is None:
        cls = _node_types[op] = type(op, (SymbolNode,), {})
    return cls(name, op, inputs)


def _nodes(symbol: Any) -> list[SymbolNode | str]:
    """The symbol's nodes in order: operators as :class:`SymbolNode`, variables as their name."""
    graph = json.loads(symbol.tojson())["nodes"]
    names = [node["name"] for node in graph]
    return [node["name"] if node["op"] == "null" else
            _node(node["name"], node["op"], [(names[i], k, graph[i]["op"] == "null") for i, k, *_ in node["inputs"]])
            for node in graph]


def select_symbols(symbol: Any, layers: kit.LayerFilter = None, depth: int | None = None,
                   params: frozenset[str] = frozenset()) -> dict[str, SymbolNode]:
    """The operator nodes to probe, by name (:func:`~sonde.probe.kit.choose_layers`'s rule; a
    Symbol graph is flat, every operator one level down).

    Example:
        >>> import mxnet as mx
        >>> fc = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=4, name="fc1")
        >>> list(select_symbols(mx.sym.Activation(fc, act_type="relu", name="relu1")))
        ['fc1', 'relu1']
        >>> type(select_symbols(fc)["fc1"]).__name__
        'FullyConnected'
    """
    named = [(n.name, n, 1, True, any(p in params for p, _, _ in n.inputs))
             for n in _nodes(symbol) if isinstance(n, SymbolNode)]
    return kit.choose_layers(named, layers, depth, "the symbol")


def _output_names(symbol: Any) -> dict[tuple[str, int], str]:
    """Each operator output ``(node, index)`` by the name the executor's monitor gives it."""
    internals = symbol.get_internals()
    names: dict[tuple[str, int], str] = {}
    counts: dict[str, int] = {}
    for i, output in enumerate(internals.list_outputs()):
        node = internals[i].name
        index = counts.get(node, 0)
        counts[node] = index + 1
        names[(node, index)] = output
    return names


def _own_name(name: str) -> str:
    """What :func:`~sonde.probe.kit.param_topic` reads: ``fc1_bias`` gives ``bias``."""
    return name.rsplit("_", 1)[-1]


def _release(handle: Any) -> None:
    """Free the NDArray handle the executor made for the monitor (the callback owns it)."""
    check_call(_LIB.MXNDArrayFree(NDArrayHandle(handle)))


#: The C signature of an executor's monitor callback (``Executor.set_monitor_callback`` wraps the same).
_MONITOR_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, NDArrayHandle, ctypes.c_void_p)
#: What a closed probe leaves on an executor that had no monitor: MXNet cannot remove one.
_RELEASE = _MONITOR_CALLBACK(lambda name, handle, _: _release(handle))


def _set_monitor(executor: Any, callback: Any, monitor_all: bool) -> None:
    """``Executor.set_monitor_callback`` with a C callback made once: the executor keeps it alive."""
    check_call(_LIB.MXExecutorSetMonitorCallbackEX(executor.handle, callback, None, ctypes.c_int(monitor_all)))
    executor._monitor_callback, executor._monitor_all = callback, monitor_all


class MXNetModuleProbe(NDArrayProbe):
    """Probe of an ``mx.mod.Module``; see :func:`probe_module`."""

    framework = "mxnet"

    def __init__(self, module: Any, **options: Unpack[kit.ProbeOptions]) -> None:
        if not isinstance(module, mx.mod.Module):
            raise ProbeError(f"sonde.mxnet.probe_module expects an mx.mod.Module, got {type(module).__module__}."
                             f"{type(module).__name__}; Gluon blocks take sonde.mxnet.probe(net, trainer=...)")
        if "forward" in vars(module):
            raise ProbeError("this Module is already probed; close that probe first")
        self.module = module
        symbol = module.symbol
        param_names = frozenset(module._param_names)
        self.layers = select_symbols(symbol, options.get("layers"), options.get("depth"), param_names)
        self.params: dict[str, list[str]] = {}
        taken: set[str] = set()
        for name, node in self.layers.items():
            for producer, _, variable in node.inputs:
                if variable and producer in param_names and producer not in taken:
                    taken.add(producer)
                    self.params.setdefault(name, []).append(producer)
        shapes: dict[str, dict[str, Any]] = {}
        if module.binded:
            arrays = module._exec_group.execs[0].arg_dict
            shapes = {layer: {p: arrays[p].shape for p in ps} for layer, ps in self.params.items()}
        optimizer = getattr(module, "_optimizer", None)
        super().__init__(module, self.layers, shapes,
                         optimizer=type(optimizer).__name__ if optimizer is not None else None, **options)
        self.count_steps(True)
        self._watch = self._watch_list(symbol)
        self._variable_inputs = {name: node.inputs[0][0] for name, node in self.layers.items()
                                 if node.inputs and node.inputs[0][2]}
        self._monitor_all = "output_grads" in self.bus.topics
        # id(executor): (executor, its previous callback, that callback's monitor_all)
        self._installed: dict[int, tuple[Any, Any, bool]] = {}
        self._recording = False
        self._phase = "train"
        self._pass_step = self.step
        self._callback = self._make_callback()
        self.param_publisher = kit.ParameterPublisher(self, to_torch)
        self._attach()

    def _watch_list(self, symbol: Any) -> dict[str, list[tuple[str, str]]]:
        """Monitor names to the ``(layer, topic)`` each feeds."""
        outputs = _output_names(symbol)
        watch: dict[str, list[tuple[str, str]]] = {}
        for name, node in self.layers.items():
            watch.setdefault(outputs.get((name, 0), f"{name}_output"), []).append((name, "activations"))
            if node.inputs and not node.inputs[0][2]:
                producer, index, _ = node.inputs[0]
                watch.setdefault(outputs.get((producer, index), f"{producer}_output"), []).append((name, "inputs"))
            if node.op not in _LOSS_HEADS:
                watch.setdefault(f"{name}_backward_input0", []).append((name, "output_grads"))
        return watch

    # -- attaching ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        module = self.module
        forward, update = module.forward, module.update

        def probed_forward(data_batch: Any, is_train: bool | None = None) -> Any:
            self._guard("step bookkeeping", lambda: self._begin_pass(is_train))
            result = forward(data_batch, is_train=is_train)
            if self._recording:
                self._guard("inputs capture", self._publish_variable_inputs)
            return result

        def probed_update() -> Any:
            self._guard("optimizer pre-step capture", self._before_update)
            result = update()
            self._guard("weight update capture", self._after_update)
            self.optimizer_stepped()
            return result

        module.forward = probed_forward
        module.update = probed_update

    def _make_callback(self) -> Any:
        """The monitor callback, as the C function the executor calls (made once, kept alive here)."""

        def on_array(name: bytes, handle: Any, _: Any) -> None:
            if not self._recording:
                _release(handle)  # an unrecorded step: no work but handing the array back
                return
            array = mx.nd.NDArray(NDArrayHandle(handle), writable=False)  # owns the handle from here
            targets = self._watch.get(py_str(name))
            if targets:
                self._guard("monitor capture", lambda: self._publish_array(targets, array))

        return _MONITOR_CALLBACK(on_array)

    def _publish_array(self, targets: list[tuple[str, str]], array: Any) -> None:
        tensor = None
        for layer, topic in targets:
            phase = "train" if topic == "output_grads" else self._phase
            if self.wants(topic, phase):
                tensor = to_torch(array) if tensor is None else tensor  # read now: the buffer is reused
                self.publish(layer, topic, tensor, phase=phase, step=self._pass_step)

    def _install(self) -> Any:
        """Put the callback on the module's first executor (a new one after each ``bind``); the executor."""
        if not self.module.binded:
            return None
        executor = self.module._exec_group.execs[0]
        previous = getattr(executor, "_monitor_callback", None)
        if previous is self._callback:
            return executor
        if previous is not None and previous is getattr(executor, "_sonde_released", None):
            previous = None
        if previous is not None:
            log.warning("sonde: the Module already has a monitor (install_monitor or fit(monitor=...)); sonde's "
                        "monitor replaces it while the probe is open, and puts it back on close")
        self._installed.setdefault(id(executor), (executor, previous, getattr(executor, "_monitor_all", False)))
        _set_monitor(executor, self._callback, False)
        return executor

    def _begin_pass(self, is_train: bool | None) -> None:
        executor = self._install()
        train = self.module.for_training if is_train is None else is_train
        self._phase = "train" if train else "eval"
        if self._phase == "train":
            self.begin_train_forward()
        self._pass_step = self.eval_step if self._phase == "eval" else self.step
        self._recording = executor is not None and any(
            self.wants(t, "train" if t == "output_grads" else self._phase) for t in _ACTIVE_TOPICS)
        # operator inputs (output_grads) only on the passes that record them: each is a callback
        see_inputs = self._recording and train and self._monitor_all and self.wants("output_grads")
        if executor is not None and executor._monitor_all != see_inputs:
            _set_monitor(executor, self._callback, see_inputs)

    def _publish_variable_inputs(self) -> None:
        if not self.wants("inputs", self._phase):
            return
        arrays = self.module._exec_group.execs[0].arg_dict
        for layer, variable in self._variable_inputs.items():
            if variable in arrays:
                self.publish(layer, "inputs", to_torch(arrays[variable]), phase=self._phase, step=self._pass_step)

    def current_phase(self) -> str:
        """The phase of the last forward pass: ``p.log`` after ``update()`` still logs the training step."""
        return self._phase

    def _before_update(self) -> None:
        self._recording = False  # the step's forward and backward are over
        self.begin_optimizer_step()
        executor = self.module._exec_group.execs[0]
        grads = executor.grad_dict
        self.param_publisher.before_step(
            ((layer, _own_name(name), name) for layer, names in self.params.items() for name in names),
            value=lambda name: executor.arg_dict[name],
            grad=lambda name: grads.get(name),
            updated=lambda name: grads.get(name) is not None,
        )

    def _after_update(self) -> None:
        arrays = self.module._exec_group.execs[0].arg_dict
        self.param_publisher.after_step(lambda name: arrays[name])

    def detach(self) -> None:
        self._recording = False
        for attribute in ("forward", "update"):
            vars(self.module).pop(attribute, None)
        for installed in self._installed.values():
            self._guard("monitor removal", lambda installed=installed: self._restore(*installed))  # type: ignore[misc]
        self._installed.clear()
        self.param_publisher.clear()

    def _restore(self, executor: Any, previous: Any, monitor_all: bool) -> None:
        """Give the executor its monitor back. MXNet cannot remove a monitor callback, so without a
        previous one the callback left behind only releases each array handle."""
        if previous is not None:
            _set_monitor(executor, previous, monitor_all)
        else:
            _set_monitor(executor, _RELEASE, False)
            executor._sonde_released = _RELEASE  # not the user's: a later probe replaces it


def probe_module(module: Any, **kwargs: Any) -> MXNetModuleProbe:
    """Attach probes to an MXNet Symbol ``module`` (``mx.mod.Module``) for one run; use as a context manager.

    Takes :func:`sonde.probe`'s keywords (no ``optimizer=``: the module's ``update()`` calls are
    the steps). Works with ``module.fit(...)`` and with hand-written loops.

    Example:
        >>> import sonde.mxnet                                              # doctest: +SKIP
        >>> with sonde.mxnet.probe_module(module, run="symbol-mlp") as p:   # doctest: +SKIP
        ...     module.fit(train_iter, num_epoch=2, optimizer="sgd")
    """
    return MXNetModuleProbe(module, **kwargs)
