"""Training through model code written for inference: in-place writes and fused ops made safe.

Inference code (ComfyUI's Flux, HunyuanVideo, LTX...) adds into tensors in place after an op
saved them for backward (`x += attn(norm(x))`, `x.addcmul_(ff(y), gate)`). Plain autograd then
stops with "modified by an inplace operation"; under block checkpointing it is worse: the
recompute reads values the forward already overwrote and the gradients come out wrong with no
error. `AutogradSafety` makes such code train with exact gradients, for the duration of one
forward + backward, without touching the model's source:

1. Augmented assignments run out of place. `x += y` (also -=, *=, /=, **=) on a tensor taking
   part in autograd (grad mode on and `x` or `y` requiring grad) returns `x + y` instead of
   writing into `x`; the code rebinds its name to the result, so nothing is saved twice and no
   copy is made. Not for a view whose base someone still holds (its writes must reach the base),
   nor when the result would not keep `x`'s shape: those stay in place and fall to (2). (Code
   that reads `x` through another name or a view made earlier would see the difference; the
   family gradient checks are what proves a model is not such code.) Tensor's in-place dunders are
   process-global, so the patched ones act only on a thread whose torch-function mode stack holds
   an active session (that stack also travels into autograd's backward threads): other threads,
   and everything after the run, get the original in-place behaviour.
2. Copy-on-write for everything else (`add_`, `addcmul_`, `copy_`, `x[i] = v`, `out=`,
   `inplace=True`). Saved-tensor hooks index the storage byte ranges autograd holds; a
   TorchFunctionMode sees each in-place write just before it happens and, if it overlaps a held
   range, gives the holder a private copy of the old values. The writer writes in place as the
   code expects (views and aliases see it); only the saved value is preserved. Copies are made
   only when a write hits saved memory, never for every saved tensor.
3. Inside checkpointed blocks. `torch.utils.checkpoint` replaces the saved-tensor hooks inside a
   block, so (2) cannot see what the block saves. The block's *inputs* are still saved through
   our hooks (checkpoint saves them before entering its own), so writes into them are caught in
   the forward. For the recompute, `recompute_context()` (handed to checkpoint as its
   `context_fn`) wraps checkpoint's recompute hooks: every tensor the recompute saves is first
   replaced by an alias registered with (2), and a write into its memory re-points that alias at
   a copy, so the recompute keeps the values its first forward saw.
4. Ops without an autograd formula (fused custom kernels): `reference_ops` maps such an op to a
   plain-torch implementation of the same function, called instead inside the session.

Safety net: a saved tensor that changed without a copy (a write the mode could not see, e.g.
inside a C++ extension) raises at backward, as autograd would without us.

Invariant: on leaving the context (normally, on error, or on a `BaseException` cancel) the mode
and the hooks are popped and the dunders are the original ones again once no session is open in
any thread; inference afterwards runs exactly the original code paths.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
import weakref
from collections.abc import Callable, Mapping

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["AutogradSafety", "recompute_context", "active_session"]

# In-place dunders and their out-of-place twins. Bitwise / shift ops never carry gradients.
_AUGMENTED = {
    "__iadd__": operator.add,
    "__isub__": operator.sub,
    "__imul__": operator.mul,
    "__itruediv__": operator.truediv,
    "__ipow__": operator.pow,
}
_INPLACE_DUNDERS = frozenset(
    ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__iand__",
     "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__")
)
# Names ending in "_" that do not write a tensor's values.
_NOT_WRITES = frozenset(("requires_grad_", "share_memory_", "retain_grad_", "pin_memory_"))


# ---------------------------------------------------------------------------------------------
# Which memory a tensor covers
# ---------------------------------------------------------------------------------------------


class _Extent:
    """The memory a tensor covers: storage identity, element layout and byte bounds."""

    __slots__ = ("key", "item", "offset", "sizes", "strides", "start", "end")

    def __init__(self, key, item, offset, sizes, strides):
        self.key, self.item, self.offset, self.sizes, self.strides = key, item, offset, sizes, strides
        last = offset
        for length, stride in zip(sizes, strides):
            last += (length - 1) * stride
        self.start, self.end = offset * item, (last + 1) * item

    def overlaps(self, other: "_Extent") -> bool:
        if self.start >= other.end or other.start >= self.end:
            return False
        if self.item != other.item:
            return True
        boxes = _boxes(self, other)
        if boxes is None:
            return True  # layouts not comparable: assume the worst (a needless copy at most)
        return all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(*boxes))


def _box(extent: _Extent, strides: list[int]):
    """Index ranges of `extent` along `strides` (descending), or None if its offsets would wrap
    from one stride's rows into the next (then the ranges do not describe its elements)."""
    length_of = {}
    for size, stride in zip(extent.sizes, extent.strides):
        if size > 1:
            length_of[stride] = size
    remainder, ranges = extent.offset, []
    for stride in strides:
        first = remainder // stride
        remainder -= first * stride
        ranges.append((first, first + length_of.get(stride, 1)))
    reach = 0
    for index in range(len(strides) - 1, 0, -1):
        first, stop = ranges[index]
        reach += (stop - 1) * strides[index]
        if reach >= strides[index - 1]:
            return None
    return ranges


def _boxes(a: _Extent, b: _Extent):
    """Both extents as boxes in one coordinate system (the union of their strides), or None."""
    used = [st for sz, st in zip(a.sizes, a.strides) if sz > 1] + [st for sz, st in zip(b.sizes, b.strides) if sz > 1]
    if any(st <= 0 for st in used) or len(set(st for sz, st in zip(a.sizes, a.strides) if sz > 1)) < sum(
            1 for sz in a.sizes if sz > 1) or len(set(st for sz, st in zip(b.sizes, b.strides) if sz > 1)) < sum(
            1 for sz in b.sizes if sz > 1):
        return None  # broadcast (stride 0) or repeated strides
    strides = sorted(set(used) | {1}, reverse=True)
    box_a, box_b = _box(a, strides), _box(b, strides)
    if box_a is None or box_b is None:
        return None
    return box_a, box_b


def _extent(tensor: torch.Tensor) -> _Extent | None:
    """The memory `tensor` can read or write; None for tensors without a plain storage (meta,
    wrapper subclasses) and empty ones."""
    try:
        key = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None
    if key == 0 or tensor.numel() == 0:
        return None
    return _Extent(key, tensor.element_size(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())


class _Saved:
    """What our pack hook hands autograd: the saved tensor (a detached alias, or a private copy
    once someone wrote into its memory) and its version when saved."""

    __slots__ = ("tensor", "version", "copied", "__weakref__")

    def __init__(self, tensor: torch.Tensor, version: int):
        self.tensor = tensor
        self.version = version
        self.copied = False


class _Ref(weakref.ref):
    """A weak reference that knows which storage's entry to drop when its object dies."""

    __slots__ = ("key",)


class _Held:
    """A registry entry: a weak reference to what holds saved memory, and which memory."""

    __slots__ = ("ref", "extent", "alias")

    def __init__(self, ref, extent: _Extent, alias: bool):
        self.ref, self.extent, self.alias = ref, extent, alias


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


class _Mode(TorchFunctionMode):
    """Sees every torch call of the session's thread (and of autograd's threads working for it).

    Most calls write nothing (and many are attribute reads such as `.shape`): they leave after one
    dictionary lookup, the cost that matters on small layers.
    """

    def __init__(self, session: "AutogradSafety"):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        session = self.session
        if kwargs or type(func) in _OP_TYPES:  # keyword writes (out=, inplace=) or a custom op
            return session._call(func, args, kwargs or {})
        try:
            written = _written[func]
        except (KeyError, TypeError):
            written = _written_arguments(func)
        if not written or not session._held:
            return func(*args)
        return session._call(func, args, {})


_OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_written: dict = {}  # func -> positions of the arguments it writes into (cached per function object)


def _written_arguments(func) -> tuple[int, ...]:
    """Which positional arguments `func` writes into: from the schema for torch.ops operators, else
    by torch's naming (`add_`, `copy_`, `__iadd__`, `__setitem__`: the first one)."""
    op = func.default if isinstance(func, torch._ops.OpOverloadPacket) and hasattr(func, "default") else func
    if isinstance(op, torch._ops.OpOverload):
        written = tuple(i for i, arg in enumerate(op._schema.arguments)
                        if not arg.kwarg_only and arg.alias_info is not None and arg.alias_info.is_write)
    else:
        name = getattr(func, "__name__", "")
        first = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")
                                              and not name.endswith("__") and name not in _NOT_WRITES)
        written = (0,) if first else ()
    try:
        _written[func] = written
    except TypeError:  # unhashable callable: decided again each time
        pass
    return written


_SETITEM = torch.Tensor.__setitem__


def _basic_index(index) -> bool:
    """Slices, integers, None and Ellipsis only: indexing with it gives a view of what is written."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, (slice, int)) and not isinstance(item, bool)
               for item in items)


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


class AutogradSafety:
    """Context manager for one forward + backward of model code that writes in place.

    `reference_ops`: {op: function} for ops with no autograd formula; inside the session
    `function(*args, **kwargs)` runs instead of `op` (always, so a run computes one function, with
    or without gradients).
    `out_of_place_augmented=False` leaves `x += y` in place (then copy-on-write alone keeps the
    gradients right, at the price of one copy per such write into saved memory).
    Counters (`copies`, `copied_bytes`, `out_of_place`, `rerouted`) say what the run cost.
    """

    def __init__(self, reference_ops: Mapping[object, Callable] | None = None, out_of_place_augmented: bool = True):
        self.reference_ops = dict(reference_ops or {})
        self.out_of_place_augmented = out_of_place_augmented
        self.copies = 0
        self.copied_bytes = 0
        self.out_of_place = 0
        self.rerouted = 0
        self._held: dict[int, dict[int, _Held]] = {}
        self._mode: _Mode | None = None
        self._stack: contextlib.ExitStack | None = None

    # -- entering and leaving -------------------------------------------------------------------
    def __enter__(self) -> "AutogradSafety":
        if self._stack is not None:
            raise RuntimeError("An AutogradSafety session cannot be entered twice; make a new one.")
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(_augmented_patch())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
            self._mode = _Mode(self)
            stack.enter_context(self._mode)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._stack = self._stack, None
        self._held.clear()
        if stack is not None:
            stack.close()

    # -- saving (outside checkpointed blocks) ---------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> _Saved:
        # Detached: a tensor an op saves of its own output would otherwise hold its grad_fn, which
        # holds it (a cycle Python's gc cannot see). The detached alias shares the version counter.
        saved = _Saved(tensor.detach(), tensor._version)
        # Parameters (frozen weights, adapter factors) are written only between steps: not indexed,
        # which spares a third of the bookkeeping; the version check at unpack still covers them.
        extent = None if isinstance(tensor, torch.nn.Parameter) else _extent(tensor)
        if extent is not None:
            self._hold(extent, _Ref(saved, self._forget), alias=False)
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        if not saved.copied and saved.tensor._version != saved.version:
            raise RuntimeError(
                "A tensor saved for backward was modified in place by an operation the in-place "
                "safety could not see (a write outside torch's Python API, e.g. inside a C++ "
                "extension); its gradient would be wrong. Report the model family so the write can "
                "be handled."
            )
        return saved.tensor

    def _hold(self, extent: _Extent, ref: _Ref, alias: bool) -> None:
        ref.key = extent.key
        self._held.setdefault(extent.key, {})[id(ref)] = _Held(ref, extent, alias)

    def _forget(self, ref: _Ref) -> None:
        entries = self._held.get(ref.key)
        if entries is not None:
            entries.pop(id(ref), None)
            if not entries:
                del self._held[ref.key]

    # -- saving inside a checkpoint's recompute -------------------------------------------------
    def _alias_for_recompute(self, tensor: torch.Tensor) -> torch.Tensor:
        alias = tensor.detach()
        extent = _extent(tensor)
        if extent is not None:
            self._hold(extent, _Ref(alias, self._forget), alias=True)
        return alias

    # -- every torch call ------------------------------------------------------------------------
    def _call(self, func, args, kwargs):
        if self.reference_ops and type(func) in _OP_TYPES:
            reference = self.reference_ops.get(func)
            if reference is not None:
                self.rerouted += 1
                return reference(*args, **kwargs)
        try:
            written = _written[func]
        except (KeyError, TypeError):
            written = _written_arguments(func)
        targets = []
        for position in written:
            if position < len(args):
                if func is _SETITEM and len(args) > 1 and _basic_index(args[1]):
                    targets.append(args[0][args[1]])  # the view written (a view op: cheap, exact)
                else:
                    targets.extend(_tensors_in(args[position]))
        if kwargs:
            if kwargs.get("inplace") is True and args and isinstance(args[0], torch.Tensor):
                targets.append(args[0])
            out = kwargs.get("out")
            if out is not None:
                targets.extend(_tensors_in(out))
        if not targets or not self._held:
            return func(*args, **kwargs)
        untouched = self._before_write(targets)
        result = func(*args, **kwargs)
        for saved in untouched:  # same storage, other bytes: its version moved, its values did not
            saved.version = saved.tensor._version
        return result

    def _before_write(self, targets) -> list[_Saved]:
        """Give every holder of memory a write will overlap its own copy; return the holders of
        the same storages that the write leaves alone."""
        untouched: list[_Saved] = []
        for target in targets:
            extent = _extent(target)
            if extent is None:
                continue
            key = extent.key
            entries = self._held.get(key)
            if not entries:
                continue
            for entry_id, entry in list(entries.items()):
                holder = entry.ref()
                if holder is None:
                    continue
                if entry.extent.overlaps(extent):
                    self._copy(holder, entry.alias)
                    entries.pop(entry_id, None)
                elif not entry.alias:
                    untouched.append(holder)
            if not entries:
                self._held.pop(key, None)
        return untouched

    def _copy(self, holder, alias: bool) -> None:
        if alias:  # an alias checkpoint keeps: re-point the object itself at a copy
            copy = holder.clone()
            holder.data = copy
        else:
            copy = holder.tensor.clone()
            holder.tensor = copy
            holder.copied = True
        self.copies += 1
        self.copied_bytes += copy.numel() * copy.element_size()

    # -- augmented assignment --------------------------------------------------------------------
    def out_of_place_result(self, name: str, tensor: torch.Tensor, other):
        """`tensor <op> other` when `tensor <op>= other` may run out of place here, else None."""
        if not self.out_of_place_augmented or not torch.is_grad_enabled():
            return None
        if not (tensor.requires_grad or (isinstance(other, torch.Tensor) and other.requires_grad)):
            return None
        if type(tensor) is not torch.Tensor or (tensor._is_view() and _base_references(tensor) > _UNREFERENCED_BASE):
            return None
        result = _AUGMENTED[name](tensor, other)
        if not isinstance(result, torch.Tensor) or result.shape != tensor.shape:
            return None  # broadcasting beyond `tensor`: let the in-place op raise its own error
        if result.dtype != tensor.dtype:
            result = result.to(tensor.dtype)  # in place keeps the written tensor's dtype
        self.out_of_place += 1
        return result


def _base_references(view: torch.Tensor) -> int:
    return sys.getrefcount(view._base)


def _unreferenced_base_count() -> int:
    base = torch.zeros(2)
    view = base[:1]
    del base
    return _base_references(view)


# A view's writes must reach its base when someone still holds the base (`v = img[:, :n]; v += a`).
# A base nobody holds in Python (a Linear's 2-D output behind its 3-D view) cannot be read again,
# so the view may be rebound out of place. Calibrated once: the count differs between Pythons.
_UNREFERENCED_BASE = _unreferenced_base_count()


def active_session() -> AutogradSafety | None:
    """The session whose mode is on this thread's torch-function mode stack (innermost), if any."""
    for index in range(torch._C._len_torch_function_stack() - 1, -1, -1):
        mode = torch._C._get_function_stack_at(index)
        if isinstance(mode, _Mode):
            return mode.session
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoint recompute
# ---------------------------------------------------------------------------------------------


class _RecomputeHooks:
    """Entered inside checkpoint's recompute: checkpoint's own pack hook keeps an alias we track,
    and the session's mode sees the recompute's writes.

    The mode has to be pushed again here: `loss.backward()` and `torch.autograd.backward` are
    torch functions, and a mode is off while its handler runs them, so the backward pass (and the
    recompute inside it) would otherwise run without it.
    """

    def __init__(self, session: AutogradSafety):
        self.session = session
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self):
        session = self.session
        stack = contextlib.ExitStack()
        try:
            if session._mode is not None and active_session() is not session:
                stack.enter_context(session._mode)
            top = _top_saved_tensors_hooks(False)
            outer_pack, outer_unpack = top if top is not None else (_same, _same)

            def pack(tensor):
                return outer_pack(session._alias_for_recompute(tensor))

            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def _same(tensor):
    return tensor


def recompute_context():
    """For `torch.utils.checkpoint(context_fn=...)`: the context its recompute runs in. Called at
    forward time; a no-op context when no session is active on this thread."""
    session = active_session()
    if session is None or _top_saved_tensors_hooks is None:
        return contextlib.nullcontext()
    return _RecomputeHooks(session)


# torch's own accessor (used by torch.compile); present in the torch versions ComfyUI ships with.
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


# ---------------------------------------------------------------------------------------------
# The process-global dunder patch, reference counted
# ---------------------------------------------------------------------------------------------

_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict[str, tuple[object, bool]] = {}  # name -> (original attribute, defined on torch.Tensor itself)


def _augmented(name: str, original: Callable) -> Callable:
    def augmented(self, other):
        session = active_session()
        if session is not None:
            result = session.out_of_place_result(name, self, other)
            if result is not None:
                return result
        return original(self, other)

    augmented.__name__ = name
    augmented.__qualname__ = f"Tensor.{name}"
    augmented.__doc__ = getattr(original, "__doc__", None)
    return augmented


@contextlib.contextmanager
def _augmented_patch():
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            for name in _AUGMENTED:
                own = name in torch.Tensor.__dict__
                original = getattr(torch.Tensor, name)
                _originals[name] = (torch.Tensor.__dict__[name] if own else original, own)
                setattr(torch.Tensor, name, _augmented(name, original))
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name, (original, own) in _originals.items():
                    if own:
                        setattr(torch.Tensor, name, original)
                    else:
                        delattr(torch.Tensor, name)
                _originals.clear()


def augmented_patch_installed() -> bool:
    """True while some session (in any thread) has Tensor's augmented assignments patched."""
    return _patch_users > 0
