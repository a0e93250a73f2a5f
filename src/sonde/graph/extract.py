"""Tracing a forward pass into a :class:`~sonde.graph.model.Graph`.

How: the model's module tree is copied with every parameter and buffer replaced by a *meta*
tensor (shapes and dtypes, no storage), so the copy costs no real memory and its forward no
compute; module pre/post hooks on the copy see every module call and a
:class:`torch.overrides.TorchFunctionMode` sees every functional operation between modules.
Each tensor remembers the node that produced it (by identity), which gives the edges. A
forward that cannot run on meta tensors (``if mask.any():`` reads a value) is traced again on
*fake* tensors (``FakeTensorMode``: still no storage, but libraries such as transformers
recognise them and skip their data-dependent checks, as they do under ``torch.compile``), and
failing that on real tensors: the copy then shares the real parameters (no copy; under
``torch.no_grad()``) and works on clones of the buffers, and the global random state is
restored afterwards, so the model and the training run are left exactly as they were.

A model sharded with FSDP2 (``fully_shard``) is copied as the classes it was built from
(``Linear``, not ``FSDPLinear``), without FSDP's hooks, and its sharded parameters (``DTensor``)
become meta or fake tensors of the whole parameter's shape: the trace reads no shard and runs no
collective. Such a model is not traced on real tensors (that would need the gathered parameters).

Names follow the probe's: module paths, ``name:2`` for a second call of a module in one
forward pass; functions are ``<enclosing module call>/<function>`` (``layer1.0/add``), ``:2``
for repeats.
"""

from __future__ import annotations

import copy
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from sonde.graph.model import Graph, GraphError, Node
from sonde.run_info import user_class

__all__ = ["graph", "trace"]

#: Functions that only change how a tensor is viewed; ``Graph.prune`` removes them.
TRIVIAL_FUNCTIONS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "detach", "to", "type", "float", "double", "half", "bfloat16", "identity", "data",
    "transpose", "permute", "t", "T", "mT",
})
#: Modules that do not change values (dropout counts only when inactive).
TRIVIAL_MODULES = frozenset({"Identity", "Flatten", "Unflatten"})
#: On the meta device these return a tensor like their input; PyTorch's meta kernels for them are slow
#: Python decompositions (3 ms per batch norm), so the trace makes that tensor directly.
SHAPE_PRESERVING = frozenset({"batch_norm", "instance_norm", "layer_norm", "group_norm", "local_response_norm",
                              "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
                              "dropout3d"})
_DROPOUT = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"})

# Hook tables are not copied (a probe's bound-method hooks would drag the probe into the copy).
_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# Attributes by which a library marks a module whose hooks it installed; the copy has no hooks, so it
# loses the mark too and the library installs them on the copy (transformers' output capturing, which
# collects Mixtral's router logits: without it the copy's forward fails).
_HOOK_MARKS = ("_output_capturing_hooks_installed",)


def graph(model: nn.Module, example_input: Any, *, device: str = "auto") -> Graph:
    """Trace one forward pass of ``model`` on ``example_input`` into a :class:`Graph`.

    Args:
        model: any ``torch.nn.Module``; it is not modified (the trace runs on a copy of its module tree).
        example_input: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments
            (``{"input_ids": ids, "attention_mask": mask}``). Only shapes and dtypes matter, unless the
            forward reads values and has to run on real tensors.
        device: ``"auto"`` (meta tensors, else fake tensors, else real tensors: the first that works),
            ``"meta"``, ``"fake"`` or ``"real"``.

    Returns:
        the graph; ``graph.device`` says which way it was traced (``meta``, ``fake`` or ``real``).

    Raises:
        GraphError: the forward pass failed; the message names the operation and the module it ran in.

    Example:
        >>> import torch, sonde
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> g = sonde.graph(model, torch.zeros(16, 4))
        >>> [(n.name, n.output_shapes) for n in g.nodes if n.kind == "module"]
        [('0', [[16, 8]]), ('1', [[16, 8]]), ('2', [[16, 2]])]
    """
    if not isinstance(model, nn.Module):
        raise GraphError(f"sonde.graph expects a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    args: tuple[Any, ...]
    if isinstance(example_input, dict):
        args, kwargs = (), dict(example_input)
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    else:
        args, kwargs = (example_input,), {}
    return trace(model, args, kwargs, device=device)


def trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, device: str = "auto",
          background: bool = False) -> Graph:
    """:func:`graph` for a call ``model(*args, **kwargs)``.

    ``background=True`` is for a trace on another thread while the model trains: the global random
    state is shared with training and cannot be saved and restored, so a real-tensor trace then runs
    the copy in eval mode (dropout draws no random numbers).
    """
    if device not in ("auto", *_MODES):
        raise GraphError(f"device= expects 'auto', 'meta', 'fake' or 'real', got {device!r}")
    failures: list[tuple[str, str]] = []
    for mode in _MODES if device == "auto" else (device,):
        try:
            return _trace(model, args, kwargs, mode=mode, background=background)
        except GraphError as exc:
            if mode == "real" or device != "auto":
                earlier = "".join(f" (with {m} tensors too: {e})" for m, e in failures)
                raise GraphError(f"{exc}{earlier}") from exc
            failures.append((mode, str(exc)))
    raise AssertionError("unreachable")


#: Tried in this order: meta tensors (fastest: shapes only), fake tensors (shapes only, and libraries
#: such as transformers skip their data-dependent checks on them, as under torch.compile), real tensors.
_MODES = ("meta", "fake", "real")


def _trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, mode: str,
           background: bool) -> Graph:
    fake = FakeTensorMode(allow_non_fake_inputs=True) if mode == "fake" else None
    convert: Callable[[torch.Tensor], torch.Tensor] | None = (
        _to_meta if mode == "meta" else _fake_like(fake) if fake is not None else None)
    shadow = _shadow(model, convert)
    if convert is not None:
        args, kwargs = _map_tensors(args, convert), _map_tensors(kwargs, convert)
    elif background:
        shadow.eval()
    tracer = _Tracer(shadow)
    name = _module_type(model)
    with torch.no_grad():
        if fake is not None:
            with fake:
                return tracer.run(args, kwargs, name, mode)
        if convert is not None or background:
            return tracer.run(args, kwargs, name, mode)
        devices = sorted({t.device.index or 0 for t in shadow.parameters() if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            return tracer.run(args, kwargs, name, mode)


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(tensor):  # the whole parameter's shape, as a plain tensor (empty_like would keep the DTensor)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return torch.empty_like(tensor, device="meta")


def _is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 shards across ranks)."""
    module = sys.modules.get("torch.distributed.tensor")  # none exists before torch.distributed.tensor is imported
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def _fsdp_original(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The class FSDP2's ``fully_shard`` made ``cls`` from (``Linear`` for ``FSDPLinear``), else None."""
    original = user_class(cls)
    return None if original is cls else original  # type: ignore[return-value]


def _fake_like(fake: FakeTensorMode) -> Callable[[torch.Tensor], torch.Tensor]:
    """A converter to fake tensors that reads only a tensor's shape, strides, dtype and device.

    ``FakeTensorMode.from_tensor`` also walks the tensor's ``.grad`` and view base; a background
    trace runs while training replaces and frees those (``zero_grad``), which crashed the process
    (a segmentation fault inside ``describe_tensor``).
    """
    def convert(tensor: torch.Tensor) -> torch.Tensor:
        with fake:
            return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return convert


def _shadow(model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor] | None) -> nn.Module:
    """A copy of the module tree: storage-less (meta or fake) parameters and buffers, or, with
    ``convert=None``, shared parameters and cloned buffers; no hooks.

    Each module is copied shallowly (its own attribute dict, whose values are shared), with new
    parameter, buffer, submodule and hook tables. Unlike ``copy.deepcopy`` this never copies what a
    module merely refers to (a config is shared; a Lightning module's trainer and data loaders are
    not duplicated), and tied parameters stay tied.
    """
    tensors: dict[int, Any] = {}
    modules: dict[int, nn.Module] = {}

    def param(p: nn.Parameter) -> Any:
        if convert is None and _is_dtensor(p):
            raise GraphError("its parameters are sharded across ranks (DTensor): a trace on real tensors would "
                             "gather them")
        if id(p) not in tensors:
            tensors[id(p)] = nn.Parameter(convert(p), requires_grad=p.requires_grad) if convert is not None else p
        return tensors[id(p)]

    def buffer(b: torch.Tensor) -> Any:
        if id(b) not in tensors:
            tensors[id(b)] = convert(b) if convert is not None else b.detach().clone()
        return tensors[id(b)]

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        twin = _shallow_copy(module)
        for mark in _HOOK_MARKS:
            twin.__dict__.pop(mark, None)
        modules[id(module)] = twin
        twin._parameters = {k: None if v is None else param(v) for k, v in module._parameters.items()}
        twin._buffers = {k: None if v is None else buffer(v) for k, v in module._buffers.items()}
        twin._modules = {k: None if v is None else clone(v) for k, v in module._modules.items()}
        for attr in _HOOK_ATTRS:
            table = getattr(module, attr, None)
            if table is not None:
                setattr(twin, attr, type(table)())
        for key, value in list(twin.__dict__.items()):
            # A method stored on the instance (Lightning's DDP strategy leaves the module's own
            # ``forward`` there after redirecting it) is bound to the original: bind it to the copy,
            # or the trace would run the original modules.
            if isinstance(value, types.MethodType) and value.__self__ is module:
                twin.__dict__[key] = types.MethodType(value.__func__, twin)
        return twin

    try:
        return clone(model)
    except GraphError:
        raise
    except Exception as exc:  # any copy failure means the same thing to the caller
        raise GraphError(f"cannot copy {type(model).__name__}'s module tree to trace it: {type(exc).__name__}: {exc}"
                         ) from exc


def _is_parametrizations(module: nn.Module, child: str) -> bool:
    """Whether ``module.<child>`` is the container ``torch.nn.utils.parametrize`` adds: part of the
    parametrized module (its weight's computation), not a layer of its own."""
    return child == "parametrizations" and parametrize.is_parametrized(module)


def _module_type(module: nn.Module) -> str:
    """The module's class name; a parametrized module's is its original class's (``Linear``, not
    ``ParametrizedLinear``), and so is a module FSDP2 shards (``Linear``, not ``FSDPLinear``)."""
    cls = _fsdp_original(type(module)) or type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _shallow_copy(module: nn.Module) -> nn.Module:
    """``copy.copy(module)``, also for a parametrized module (``torch.nn.utils.parametrize``), whose
    class refuses to be pickled or copied: the same class, a new attribute dict with the same values;
    and for a module FSDP2 shards, whose class constructs its original class instead (``__new__``
    calls ``__init__`` without arguments): a module of the original class, without FSDP's methods."""
    original = _fsdp_original(type(module))
    if original is None and not parametrize.is_parametrized(module):
        return copy.copy(module)
    cls = original or type(module)
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) replaced by ``fn(tensor)``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value) if type(value) in (tuple, list) else [
            _map_tensors(v, fn) for v in value]
    return value


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with its path (``0``, ``logits``, ``1.0``), depth-first."""
    if isinstance(value, torch.Tensor):
        yield path, value
        return
    if isinstance(value, dict):
        items: Any = ((str(k), v) for k, v in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(value))
    elif is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in fields(value))
    else:
        return
    for key, item in items:
        yield from _tensors(item, f"{path}.{key}" if path else key)


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property such as Tensor.T or Tensor.data
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
        if name.startswith(("r", "i")) and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "matmul", "pow",
                                                          "mod", "and", "or", "xor", "lshift", "rshift"):
            name = name[1:] + ("_" if name[0] == "i" else "")
    return name


def _shapes(tensors: list[torch.Tensor]) -> tuple[list[list[int]], list[str]]:
    return [list(t.shape) for t in tensors], [str(t.dtype).removeprefix("torch.") for t in tensors]


class _Tracer(TorchFunctionMode):
    """Module hooks plus a torch-function mode, building nodes and edges as the forward runs."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root
        self.nodes: list[Node] = []
        self.edges: dict[tuple[str, str], None] = {}
        self.producer: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self.stack: list[tuple[str, bool]] = []  # (call name, atomic)
        self.calls: dict[str, int] = {}
        self.quiet = 0  # > 0 while sonde's own hook code runs: its tensor calls are not the model's
        self.last_op = "forward"
        self.handles: list[Any] = []
        self.names = {id(m): n for n, m in root.named_modules() if n}
        self.param_counts: dict[str, int] = {}  # parameter elements below each module path (a shared one once)
        for pname, param in root.named_parameters(remove_duplicate=False):
            parts = pname.split(".")[:-1]
            for i in range(1, len(parts) + 1):
                key = ".".join(parts[:i])
                self.param_counts[key] = self.param_counts.get(key, 0) + param.numel()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _source(self, tensor: torch.Tensor) -> str | None:
        entry = self.producer.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return None

    def _produce(self, tensor: torch.Tensor, name: str) -> None:
        self.producer[id(tensor)] = (weakref.ref(tensor), name)

    def _connect(self, inputs: Any, name: str) -> None:
        for _, tensor in _tensors(inputs):
            source = self._source(tensor)
            if source is not None and source != name:
                self.edges[(source, name)] = None

    def _numbered(self, base: str) -> str:
        count = self.calls.get(base, 0) + 1
        self.calls[base] = count
        return base if count == 1 else f"{base}:{count}"

    @property
    def _parent(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    # -- hooks ---------------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.quiet += 1
        try:
            path = self.names[id(module)]
            atomic = next((c for n, c in module.named_children() if not _is_parametrizations(module, n)), None) is None
            name = self._numbered(path)
            op = _module_type(module)
            inactive = not module.training or getattr(module, "p", 1) == 0
            trivial = op in TRIVIAL_MODULES or (op in _DROPOUT and inactive)
            own = {k: list(p.shape) for k, p in module.named_parameters(recurse=False)}
            if parametrize.is_parametrized(module):  # the parameters its parametrizations compute from
                own.update({f"parametrizations.{k}": list(p.shape)
                            for k, p in module.parametrizations.named_parameters()})  # type: ignore[union-attr]
            count = self.param_counts.get(path, 0)
            self.nodes.append(Node(name, "module", op, self._parent, params=own, num_params=count, trivial=trivial))
            if atomic:
                self._connect((args, kwargs), name)
            self.stack.append((name, atomic))
            self.last_op = f"{op}.forward"
        finally:
            self.quiet -= 1

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.quiet += 1
        try:
            name, atomic = self.stack.pop()
            outputs = [t for _, t in _tensors(output)]
            node = next(n for n in reversed(self.nodes) if n.name == name)
            node.output_shapes, node.dtypes = _shapes(outputs)
            if atomic:
                for tensor in outputs:
                    self._produce(tensor, name)
        finally:
            self.quiet -= 1

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.quiet:
            return func(*args, **kwargs)
        op = _op_name(func)
        try:
            first = args[0] if args else None
            if op in SHAPE_PRESERVING and isinstance(first, torch.Tensor) and (first.is_meta or
                                                                               isinstance(first, FakeTensor)):
                out = torch.empty_like(first)
            else:
                out = func(*args, **kwargs)
        except Exception as exc:
            where = f"module {self._parent!r}" if self.stack else "the model's top-level forward"
            raise GraphError(f"cannot trace {type(self.root).__name__}: {op!r} in {where} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        if self.stack and self.stack[-1][1]:
            return out  # inside a leaf module: the module is the node
        self.last_op = op
        outputs = [t for _, t in _tensors(out)]
        if not outputs:
            return out
        parent = self._parent
        name = self._numbered(f"{parent}/{op}" if parent else op)
        trivial = op in TRIVIAL_FUNCTIONS or (op == "dropout" and not (args[2] if len(args) > 2 else
                                                                       kwargs.get("training", True)))
        shapes, dtypes = _shapes(outputs)
        self.nodes.append(Node(name, "function", op, parent, shapes, dtypes, trivial=trivial))
        self._connect((args, kwargs), name)
        for tensor in outputs:
            self._produce(tensor, name)
        return out

    # -- the run -------------------------------------------------------------------------------
    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], model: str, device: str) -> Graph:
        single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        for path, tensor in _tensors({**{str(i): a for i, a in enumerate(args)}, **kwargs}):
            name = "input" if single else f"input.{path}"
            shapes, dtypes = _shapes([tensor])
            self.nodes.append(Node(name, "input", "Tensor", None, shapes, dtypes))
            self._produce(tensor, name)
        internal = {id(m) for owner in self.root.modules() if parametrize.is_parametrized(owner)
                    for m in owner.parametrizations.modules()}  # type: ignore[union-attr]
        for module in self.root.modules():
            if module is not self.root and id(module) not in internal:
                self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        try:
            with self:
                output = self.root(*args, **kwargs)
        except GraphError:
            raise
        except Exception as exc:
            where = f"module {self._parent!r}" if self.stack else "the model's top-level forward"
            raise GraphError(f"cannot trace {model}: its forward failed in {where} after {self.last_op!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
        finally:
            for handle in self.handles:
                handle.remove()
        found = list(_tensors(output))
        for path, tensor in found:
            name = "output" if isinstance(output, torch.Tensor) else f"output.{path}"
            shapes, dtypes = _shapes([tensor])
            self.nodes.append(Node(name, "output", "Tensor", None, shapes, dtypes))
            source = self._source(tensor)
            if source is not None:
                self.edges[(source, name)] = None
        total = sum(p.numel() for p in self.root.parameters())
        return Graph(self.nodes, self.edges, model=model, device=device, num_params=total)
