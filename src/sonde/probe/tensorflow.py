"""``sonde.tensorflow.probe_session``: probes for TF1-style graphs trained with ``session.run``.

How: on entering, the probe reads the session's ``tf.Graph`` once. Its layers are the graph's
name scopes that own trainable variables (``dense``, ``model/conv1``: the variables' scope paths),
with their parent scopes available through ``depth=``. A layer's output (``activations``) is the
last floating-point tensor its ops produce for ops outside the scope; its input (``inputs``) the
first floating-point tensor its ops take from outside. The training ops are the optimizer's
``Apply*``/``ResourceApply*`` ops (what ``minimize``/``apply_gradients`` make): each names its
variable and the gradient it consumes.

While the probe is open the session's ``run`` is wrapped. A ``run`` whose fetches execute a
training op (or the ``train_op=`` given) is one optimizer step, counted from 0; any other ``run``
that computes the layers (evaluation) is recorded in phase ``eval`` at the step whose weights it
used (activations, inputs and loss); runs that compute no layer record nothing. On a recorded
step the wanted tensors are appended to the user's own fetches, and only tensors that run
computes anyway: layer outputs and inputs, the loss, each variable's value as the forward pass
read it (``weights``/``biases``), the gradient its training op consumed. Two things are new ops,
created once on entering and executed only on the steps that fetch them: ``output_grads``
(``tf.gradients`` of ``loss=`` with respect to the layer outputs) and each variable read after
its update (``weight_updates``/``bias_updates`` = after - before). They stay in the graph after
the probe closes (a graph cannot drop ops) and run only when fetched. At a step the schedule does
not record, the user's call goes through untouched.

Limits: resource variables (TensorFlow 2's default, also under ``tf.compat.v1``) give every
topic; legacy reference variables are updated in place, so their value before the update cannot
be fetched in the same run: they give ``weight_grads``/``bias_grads`` only. Sparse updates
(embeddings) are not recorded. ``session.make_callable`` runs bypass ``run`` and are not seen.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from sonde.errors import GraphError, ProbeError
from sonde.probe import kit
from sonde.probe.core import Probe, shared_tensor
from sonde.records import NETWORK
from sonde.topics import GRADS_AND_UPDATES

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["NameScope", "SessionProbe", "probe_session", "select_scopes"]

log = logging.getLogger("sonde")

#: Training ops of the dense optimizers: ``ApplyGradientDescent``, ``ResourceApplyAdam``, ...
_APPLY = re.compile(r"^(Resource)?Apply[A-Z]")
#: Ops that hold or read variables, and constants: never a layer's input or output.
_STATE_OPS = frozenset({"VarHandleOp", "ReadVariableOp", "VariableV2", "Variable", "Const"})


@dataclass
class NameScope:
    """One layer of a graph: a name scope, the trainable variables it owns directly, and the
    tensors that are its output and input in the forward pass (None where it has none)."""

    name: str
    variables: list[Any] = field(default_factory=list)
    output: Any = None
    input: Any = None


@dataclass
class _Update:
    """One variable's training op, and the tensors a recorded step fetches for it."""

    layer: str
    kind: str  # "weights" | "biases"
    op: Any  # the Apply* op
    grad: Any  # the gradient it consumes
    before: Any = None  # the value the forward pass read (resource variables only)
    after: Any = None  # a read ordered after the op, made on entering when updates are wanted


def _ancestors(roots: Iterable[Any], fed: frozenset[str] = frozenset()) -> set[Any]:
    """Every op ``roots`` (ops) depend on, through data and control inputs, stopping at fed
    tensors (their ops are included: fetching a fed tensor returns the value fed)."""
    seen: set[Any] = set()
    todo = list(roots)
    while todo:
        op = todo.pop()
        if op in seen:
            continue
        seen.add(op)
        for t in op.inputs:
            if t.name in fed:
                seen.add(t.op)
            else:
                todo.append(t.op)
        todo.extend(op.control_inputs)
    return seen


def _is_float(tensor: Any) -> bool:
    return bool(tensor.dtype.is_floating) and not tensor.dtype._is_ref_dtype


def _is_gradient_op(op: Any) -> bool:
    return any(part.startswith("gradients") for part in op.name.split("/"))


def _own_name(variable: Any) -> str:
    return str(variable.op.name.rsplit("/", 1)[-1])


def forward_ops(graph: Any, loss: Any = None) -> list[Any]:
    """The forward pass's ops in graph order: what ``loss`` depends on, else what the training
    ops' gradients depend on, less the gradient ops themselves (else every op)."""
    if loss is not None:
        needed = _ancestors([loss.op])
    else:
        grads = [op.inputs[_grad_index(op)].op for op in graph.get_operations()
                 if _APPLY.match(op.type) and _grad_index(op) is not None]
        if not grads:
            return list(graph.get_operations())
        needed = {op for op in _ancestors(grads) if not _is_gradient_op(op)}
    return [op for op in graph.get_operations() if op in needed]


def _grad_index(op: Any) -> int | None:
    names = [arg.name for arg in op.op_def.input_arg]
    for name in ("grad", "delta"):
        if name in names:
            return names.index(name)
    return None


def select_scopes(graph: Any, loss: Any = None, layers: kit.LayerFilter = None,
                  depth: int | None = None) -> dict[str, NameScope]:
    """The name scopes to probe, by scope path, in the order their variables were made
    (:func:`~sonde.probe.kit.choose_layers`'s rule: by default every scope owning trainable variables).

    Example:
        >>> import tensorflow as tf
        >>> with tf.Graph().as_default() as graph:
        ...     x = tf.compat.v1.placeholder(tf.float32, [None, 4])
        ...     with tf.compat.v1.variable_scope("model/dense"):
        ...         w = tf.compat.v1.get_variable("kernel", [4, 2])
        ...         y = tf.nn.relu(tf.matmul(x, w))
        >>> scopes = select_scopes(graph)
        >>> list(scopes), scopes["model/dense"].output.op.type
        (['model/dense'], 'Relu')
    """
    variables = graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)
    scopes: dict[str, NameScope] = {}
    for variable in variables:
        path = variable.op.name.rpartition("/")[0]
        if not path:
            continue  # a variable outside any scope belongs to no layer
        parts = path.split("/")
        for level in range(1, len(parts) + 1):
            scopes.setdefault("/".join(parts[:level]), NameScope("/".join(parts[:level])))
        scopes[path].variables.append(variable)
    if not scopes:
        raise ProbeError("sonde.tensorflow found no trainable variable under a name scope in this graph; "
                         "layers are the scopes that own variables (tf.compat.v1.variable_scope('dense'))")
    named = [(name, scope, name.count("/") + 1, not any(other.startswith(name + "/") for other in scopes),
              bool(scope.variables)) for name, scope in scopes.items()]
    chosen: dict[str, NameScope] = kit.choose_layers(named, layers, depth, "this graph")
    _find_tensors(chosen, forward_ops(graph, loss))
    return chosen


def _find_tensors(scopes: dict[str, NameScope], forward: list[Any]) -> None:
    """Each scope's output and input among the forward ops."""
    in_forward = set(forward)
    for name, scope in scopes.items():
        prefix = name + "/"
        inside = [op for op in forward if op.name.startswith(prefix) and op.type not in _STATE_OPS
                  and not any(t.dtype._is_ref_dtype for t in op.inputs)]
        members = set(inside)
        leaving = [t for op in inside for t in op.outputs if _is_float(t)
                   and any(c in in_forward and c not in members for c in t.consumers())]
        if leaving:
            scope.output = leaving[-1]
        else:
            last = [t for op in inside for t in op.outputs if _is_float(t)]
            scope.output = last[-1] if last else None
        entering = [t for op in inside for t in op.inputs if _is_float(t) and t.op not in members
                    and t.op.type not in _STATE_OPS]
        scope.input = entering[0] if entering else None


def _fetched_ops(graph: Any, fetches: Any) -> list[Any]:
    """The ops the user's fetches name (tensors, ops, variables, names; nested in lists, tuples, dicts)."""
    ops = []
    for leaf in tf.nest.flatten(fetches):
        element = graph.as_graph_element(leaf) if isinstance(leaf, str) else leaf
        op = getattr(element, "op", element)
        if isinstance(op, tf.Operation):
            ops.append(op)
    return ops


class SessionProbe(Probe):
    """Probe of a TF1-style graph during ``session.run``; made by :func:`probe_session`."""

    framework = "tensorflow"

    def __init__(self, session: Any, loss: Any = None, train_op: Any = None,
                 **options: Unpack[kit.ProbeOptions]) -> None:
        graph = getattr(session, "graph", None)
        if not isinstance(graph, tf.Graph) or not callable(getattr(session, "run", None)):
            raise ProbeError(f"sonde.tensorflow.probe_session expects a tf.compat.v1.Session, got "
                             f"{type(session).__module__}.{type(session).__name__}")
        if getattr(session, "_sonde_probe", None) is not None:
            raise ProbeError("this session is already probed; close that probe first")
        self.session, self.graph, self.loss = session, graph, loss
        self.train_op = None if train_op is None else getattr(train_op, "op", train_op)
        self.scopes = select_scopes(graph, loss, options.get("layers"), options.get("depth"))
        updates = [op for op in graph.get_operations() if _APPLY.match(op.type) and _grad_index(op) is not None]
        shapes = {name: {_own_name(v): v.shape.as_list() for v in s.variables} for name, s in self.scopes.items()}
        super().__init__(session, self.scopes, shapes, optimizer=updates[0].name.split("/")[0] if updates else None,
                         **options)
        self.count_steps(True)
        if not updates and self.train_op is None:
            log.warning("sonde: no optimizer training op (Apply*/ResourceApply*) in this graph, so no run is a "
                        "training step; pass train_op= to name the op a step runs")
        self.param_publisher = kit.ParameterPublisher(self, shared_tensor)
        self.updates = self._find_updates(updates)
        self.output_grads: dict[str, Any] = {}
        self._plans: dict[tuple[Any, ...], tuple[bool, set[Any]]] = {}
        self._broken = False  # sonde's part of a run failed once: runs go through untouched
        self._had_run = "run" in session.__dict__
        self._plain_run = session.run
        self._guard("reading the graph", self._send_graph)
        self._guard("adding the output gradients and update reads", self._add_ops)
        session.run = self._run
        object.__setattr__(session, "_sonde_probe", self)

    # -- reading the graph once --------------------------------------------------------------
    def _find_updates(self, applies: list[Any]) -> list[_Update]:
        owner = {v.op.name: (name, v) for name, s in self.scopes.items() for v in s.variables}
        found = []
        for op in applies:
            target = op.inputs[0].op
            if target.name not in owner:
                continue
            layer, variable = owner[target.name]
            update = _Update(layer, kit.param_topic(_own_name(variable)), op, op.inputs[_grad_index(op)])
            if target.type == "VarHandleOp":  # a resource variable: reads are copies the update cannot change
                reads = [a for a in _ancestors([update.grad.op])
                         if a.type == "ReadVariableOp" and a.inputs[0].op is target]
                if reads:
                    update.before = min(reads, key=lambda a: a._id).outputs[0]
            found.append(update)
        return found

    def _add_ops(self) -> None:
        """The ops only recorded steps run: output gradients and reads after each update."""
        topics = self.bus.topics
        if self.graph.finalized:  # a MonitoredSession's graph takes no new op
            if (self.loss is not None and "output_grads" in topics) or topics & {"weight_updates", "bias_updates"}:
                log.warning("sonde: the graph is finalized, so output_grads and the updates cannot be recorded "
                            "(they need ops added to it); probe before graph.finalize() to record them")
            return
        with self.graph.as_default(), tf.name_scope("sonde"):
            if self.loss is not None and "output_grads" in topics:
                names = [n for n, s in self.scopes.items() if s.output is not None]
                grads = tf.gradients(self.loss, [self.scopes[n].output for n in names])
                self.output_grads = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
            for update in self.updates:
                if update.before is not None and GRADS_AND_UPDATES[update.kind][1] in topics:
                    with tf.control_dependencies([update.op]):
                        update.after = tf.raw_ops.ReadVariableOp(resource=update.op.inputs[0],
                                                                 dtype=update.before.dtype)

    def _send_graph(self) -> None:
        from sonde.graph.tensorflow import scope_graph

        try:
            graph = scope_graph(self.graph, list(self.scopes), forward_ops(self.graph, self.loss), self.loss)
        except GraphError as exc:
            log.info("sonde: no graph view for this run: %s", exc)
            return
        for runner in self._runners:
            runner.submit_graph(graph.to_dict())

    # -- each run ----------------------------------------------------------------------------
    def _run(self, fetches: Any, feed_dict: Any = None, options: Any = None, run_metadata: Any = None) -> Any:
        plain = self._plain_run
        if self._broken or self.closed:
            return plain(fetches, feed_dict, options, run_metadata)
        planned: list[tuple[Any, Any]] = []
        train = False

        def plan() -> None:
            nonlocal train
            train, computed = self._plan(fetches, feed_dict)
            if train:
                self.begin_train_forward()
            planned.extend(self._extras("train" if train else "eval", computed))

        self._guard("choosing what to fetch", plan)
        self._broken = "choosing what to fetch" in self._warned  # a failure switches recording off
        if not planned:
            result = plain(fetches, feed_dict, options, run_metadata)
        else:
            try:
                result, values = plain((fetches, [t for _, t in planned]), feed_dict, options, run_metadata)
            except tf.errors.OpError:
                raise  # the run itself failed while executing (as it would unprobed)
            except Exception as exc:  # sonde's fetches could not be added: the user's run, untouched
                log.exception("sonde: could not add the probe's fetches to session.run; training goes on "
                              "unrecorded: %s", exc)
                self._broken = True
                return plain(fetches, feed_dict, options, run_metadata)
            phase = "train" if train else "eval"
            self._guard(f"{phase} capture", lambda: self._publish(planned, values, phase))
            self._broken = f"{phase} capture" in self._warned
        if train:
            self.optimizer_stepped()
        return result

    def _plan(self, fetches: Any, feed_dict: Any) -> tuple[bool, set[Any]]:
        """Whether the run is a training step, and the ops it computes (cached per fetches and feeds)."""
        ops = _fetched_ops(self.graph, fetches)
        fed = frozenset(getattr(self.graph.as_graph_element(k) if isinstance(k, str) else k, "name", str(k))
                        for k in (feed_dict or {}))
        key = (tuple(op.name for op in ops), fed)
        known = self._plans.get(key)
        if known is None:
            computed = _ancestors(ops, fed)
            if self.train_op is not None:
                train = self.train_op in computed
            else:
                train = any(update.op in computed for update in self.updates) or any(
                    _APPLY.match(op.type) for op in computed)
            known = self._plans[key] = (train, computed)
        return known

    def _extras(self, phase: str, computed: set[Any]) -> list[tuple[Any, Any]]:
        """``(what, tensor)`` for each wanted tensor the run computes anyway (and, on a training
        step, the output gradients and update reads made for it)."""
        wants = self.wants
        extras: list[tuple[Any, Any]] = []
        for name, scope in self.scopes.items():
            for topic, tensor in (("activations", scope.output), ("inputs", scope.input)):
                if tensor is not None and tensor.op in computed and wants(topic, phase):
                    extras.append(((name, topic), tensor))
        # the loss op itself may be left out of a run of the training op alone (its gradient
        # starts from its inputs); fetching it then costs that one op
        loss = self.loss
        loss_computed = loss is not None and (loss.op in computed or all(t.op in computed for t in loss.op.inputs))
        if loss_computed and wants("loss", phase):
            extras.append(((NETWORK, "loss"), self.loss))
        if phase != "train":
            return extras
        if loss_computed and wants("output_grads"):
            extras.extend(((name, "output_grads"), grad) for name, grad in self.output_grads.items())
        for update in self.updates:
            if update.op not in computed:
                continue
            grad_topic, update_topic = GRADS_AND_UPDATES[update.kind]
            if update.before is not None and (wants(update.kind) or (update.after is not None and wants(update_topic))):
                extras.append(((update, "before"), update.before))
            if wants(grad_topic):
                extras.append(((update, "grad"), update.grad))
            if update.after is not None and update.before is not None and wants(update_topic):
                extras.append(((update, "after"), update.after))
        return extras

    def _publish(self, planned: list[tuple[Any, Any]], values: list[Any], phase: str) -> None:
        params: dict[int, dict[str, Any]] = {}
        owners: dict[int, _Update] = {}
        for ((who, what), _), value in zip(planned, values, strict=True):
            if isinstance(who, _Update):
                params.setdefault(id(who), {})[what] = value
                owners[id(who)] = who
            else:
                self.publish(who, what, shared_tensor(value), phase=phase)
        for key, got in params.items():
            update = owners[key]
            if "before" in got:
                self.param_publisher.publish(update.layer, update.kind, got["before"], got.get("grad"),
                                             got.get("after"))
            elif "grad" in got:
                self.publish(update.layer, GRADS_AND_UPDATES[update.kind][0], shared_tensor(got["grad"]),
                             phase="train")

    # -- closing -----------------------------------------------------------------------------
    def detach(self) -> None:
        session = self.session
        if session.__dict__.get("run") == self._run:
            if self._had_run:
                session.run = self._plain_run
            else:
                del session.run
        if getattr(session, "_sonde_probe", None) is self:
            object.__delattr__(session, "_sonde_probe")
        self.param_publisher.clear()
        self._plans.clear()


def probe_session(session: Any, loss: Any = None, *, train_op: Any = None,
                  **options: Unpack[kit.ProbeOptions]) -> SessionProbe:
    """Probe a TF1-style graph while ``session.run`` trains it; use as a context manager.

    Args:
        session: a ``tf.compat.v1.Session`` (anything with ``graph`` and ``run``).
        loss: the loss tensor the optimizer minimises: gives ``loss`` and ``output_grads``, and
            defines the forward pass (None: the ops the training ops' gradients depend on).
        train_op: the op a training step runs (None: any run that executes an optimizer's
            ``Apply*`` op is a step).
        **options: the keywords every adapter takes (:class:`~sonde.probe.kit.ProbeOptions`):
            ``run``, ``store``, ``server``, ``layers``, ``topics``, ``metrics``, ``every``,
            ``depth``, ``sinks``, ``resume``.

    Example:
        >>> import sonde.tensorflow                                              # doctest: +SKIP
        >>> with sonde.tensorflow.probe_session(sess, loss=loss, run="tf1-mlp"):  # doctest: +SKIP
        ...     for x, y in batches:
        ...         sess.run(train_op, {x_in: x, y_in: y})
    """
    kit.check_keywords("probe_session", options)
    return SessionProbe(session, loss, train_op, **options)

