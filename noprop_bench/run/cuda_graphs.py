"""Whole inference calls recorded once as a CUDA graph and replayed, so a loop of many small steps (e.g. the
1000 steps of NoProp-CT's stochastic process) costs one launch instead of thousands.

Under ``--compile`` on CUDA the harness wraps each attribute a method names in ``capture_targets()`` in a
:class:`CapturedCall`. A call under ``torch.inference_mode``/``no_grad`` is recorded the first time its
signature is seen (tensor shapes, dtypes and strides, the other arguments, the autocast state and the
storages of the method's parameters and buffers), then replayed: the tensor arguments are copied into the
recording's inputs and its outputs are cloned out. Parameters updated in place between calls (what
optimisers do) are read afresh by every replay; a parameter replaced by another tensor changes the
signature, so that call is recorded again. Random numbers drawn inside are fresh on every replay and follow
the generator's seed, as CUDA graphs handle the default generator; a replay draws what an eager call from
the same generator state would. Calls with gradients enabled, on the CPU,
or with arguments that cannot be part of a signature run as they are.

A whole training update (forward, backward and optimiser step, what a method names in
``capture_step_targets()``) is recorded the same way with ``update=True``: then it is the calls with gradients
enabled that are recorded, the method's optimisers are made ``capturable``, their hyperparameters and each
module's mode join the signature, each replay first checks that the optimisers still hold the state tensors
the graph writes to, and the two runs before the capture, which train, are undone
(:class:`~.warmup.MethodState`) before it is captured. An update whose signature keeps changing (a learning
rate set every step) turns eager after ``2 * max_recordings`` recordings. A training step of a small network
is a few hundred short kernels, so its replay costs a fraction of launching them one by one.

A call that cannot be captured runs eagerly from then on and the reason is reported, like a compile fallback;
errors of the function itself go up as they are. What synchronises with the host is found by a rehearsal run
under ``torch.cuda.set_sync_debug_mode("error")`` before any capture begins, because a capture that breaks
half-way can leave the caching allocator and the generator of older torch releases believing a capture is
still under way. If one breaks all the same, captures are turned off for the rest of the process
(:func:`captures_off_reason`): every wrapped call drops its recordings and runs eagerly. Running out of memory
while recording is not a failure of the capture: the recordings are dropped and the error goes up, so the
harness can retry with smaller batches.
"""

import contextlib
import gc
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

from .warmup import MethodState, method_optimizers

MAX_RECORDINGS = 16  # per wrapped attribute; each holds a private memory pool on the device
PLAIN_TYPES = (int, float, str, bool, type(None))


@dataclass
class Recording:
    """One recorded call: replaying it reads ``args``/``kwargs`` (its own tensors) and rewrites ``output``."""

    replay: Callable[[], None]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any
    # device memory reserved for the graph's private pool: what its calls allocate (activations, gradients)
    # lives there between replays, where torch.cuda.max_memory_allocated no longer counts it
    pool_bytes: int = 0
    # an update's: the optimiser state the graph writes to (see OwnedTensors.optimizer_state)
    optimizer_state: Optional["OptimizerState"] = None

    def optimizer_state_in_place(self) -> bool:
        return self.optimizer_state is None or self.optimizer_state.in_place()


@dataclass
class OptimizerState:
    """Which state tensors some optimisers hold: each optimiser's ``state`` mapping (``load_state_dict``
    replaces it) and, per parameter, its state dict, keys and tensors."""

    optimizers: Tuple[Any, ...]
    mappings: Tuple[Any, ...]
    dicts: Tuple[dict, ...]
    keys: Tuple[str, ...]
    tensors: Tuple[torch.Tensor, ...]

    def in_place(self) -> bool:
        """Whether the optimisers still hold these very tensors."""
        return all(map(operator.is_, (o.state for o in self.optimizers), self.mappings)) and all(
            map(operator.is_, map(dict.get, self.dicts, self.keys), self.tensors))


class CaptureFailed(RuntimeError):
    """The function ran, but its call could not be captured into a CUDA graph."""


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, the reason a fallback records."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


_captures_off: Optional[str] = None  # why captures are off in this process; None while they are on
_recording = 0  # how many CudaGraphRecorder calls are under way (warm-up, rehearsal and capture)
_paused = 0  # how many no_new_recordings blocks are open


def recording_a_whole_call() -> bool:
    """Whether a whole-call recording (its warm-up, rehearsal or capture) is under way: compiled targets
    with CUDA graphs of their own run eagerly then, as those cannot nest in it."""
    return _recording > 0


@contextlib.contextmanager
def no_new_recordings():
    """Inside, a :class:`CapturedCall` replays what it holds but records nothing new: a signature it has
    not seen runs eagerly. For calls whose shapes will not come again (the harness's warm-up on a
    training batch), so they take no recording, device memory or capture time."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def captures_off_reason() -> Optional[str]:
    """Why CUDA graph captures are off for the rest of this process (a capture broke half-way), or None."""
    return _captures_off


def turn_captures_off(reason: str) -> None:
    """Turn captures off for the rest of the process; every :class:`CapturedCall` runs eagerly from its next
    call on and reports ``reason``."""
    global _captures_off
    _captures_off = reason


def _static_copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _generator_usable_after_a_failed_capture() -> None:
    """A capture that fails may leave the default CUDA generator marked as capturing (older torch), and
    every later draw would then raise; give it a fresh copy of its own state in that case only (swapping
    the state under working recordings would detach their noise from the seed)."""
    try:
        state = torch.cuda.get_rng_state()
        torch.randn(1, device="cuda")
        torch.cuda.set_rng_state(state)  # the check itself leaves the draws of what follows alone
    except RuntimeError:
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        try:
            generator.graphsafe_set_state(generator.clone_state())
        except (AttributeError, RuntimeError):  # a torch without it: the eager run that follows says what is wrong
            pass


class CudaGraphRecorder:
    """Makes :class:`Recording` s with ``torch.cuda.CUDAGraph`` on a capture stream of its own.

    Each call runs the function twice on a side stream first: once for lazy initialisation, compilation and
    library workspaces, once more as a rehearsal in which a host synchronisation raises. The CUDA generator
    is put back afterwards, so the recorded call draws what an eager call would. Errors of the function
    itself go up as they are; a call that cannot be captured raises :class:`CaptureFailed` (out of memory
    excepted). Graphs captured on one stream share cuBLAS workspaces, so their owner drops them together.
    """

    def __init__(self):
        self.stream: Optional[torch.cuda.Stream] = None

    def __call__(self, function: Callable, args: tuple, kwargs: dict,
                 after_warmup: Optional[Callable[[], None]] = None) -> Recording:
        """Record ``function(*args, **kwargs)``; ``after_warmup`` runs once the two runs before the capture
        are done, whether they succeeded or not (a training update puts the method's state back there)."""
        global _recording
        device = next((v.device for v in list(args) + list(kwargs.values())
                       if isinstance(v, torch.Tensor) and v.device.type == "cuda"), None)
        if device is None:
            raise ValueError("a CUDA graph records calls with at least one CUDA tensor argument")
        _recording += 1
        try:
            with torch.cuda.device(device):
                return self._record(function, args, kwargs, after_warmup)
        finally:
            _recording -= 1

    def _record(self, function: Callable, args: tuple, kwargs: dict,
                after_warmup: Optional[Callable[[], None]]) -> Recording:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        static_args = tuple(_static_copy(a) for a in args)
        static_kwargs = {key: _static_copy(value) for key, value in kwargs.items()}
        # autocast caches weight casts across calls; a cast cached before the capture would be left out of
        # the graph, and replays would read stale weights
        cache_enabled = torch.is_autocast_cache_enabled()
        # (only under autocast: torch.compile guards on the flag, and code compiled in a recording would
        # otherwise be compiled again for the eager calls)
        torch.set_autocast_cache_enabled(cache_enabled and not torch.is_autocast_enabled("cuda"))
        try:
            rng_state = torch.cuda.get_rng_state()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    function(*static_args, **static_kwargs)
                    _rehearse_without_host_syncs(function, static_args, static_kwargs)
            finally:  # also when the rehearsal fails: the eager call that follows draws what it would have
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.set_rng_state(rng_state)
                if after_warmup is not None:
                    after_warmup()
            graph = torch.cuda.CUDAGraph()
            # a cyclic garbage collection during the capture could free an older graph, which is not allowed
            # while a stream captures
            collecting = gc.isenabled()
            try:
                gc.disable()
                # entering the stream outside the graph's context puts the current stream back even when
                # ending the capture raises
                with torch.cuda.stream(self.stream):
                    try:
                        with torch.cuda.graph(graph, stream=self.stream):
                            # the graph's private pool is reserved from here on (a host-side count)
                            reserved = torch.cuda.memory_reserved()
                            output = function(*static_args, **static_kwargs)
                    except Exception as error:  # noqa: BLE001 - whatever stopped the capture, the reason is kept
                        _after_a_broken_capture(error)
            finally:
                if collecting:
                    gc.enable()
        finally:
            torch.set_autocast_cache_enabled(cache_enabled)
        return Recording(graph.replay, static_args, static_kwargs, output,
                         pool_bytes=max(0, torch.cuda.memory_reserved() - reserved))


def _rehearse_without_host_syncs(function: Callable, args: tuple, kwargs: dict) -> None:
    """Run ``function`` with host synchronisations raising; one is reported as :class:`CaptureFailed`."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        function(*args, **kwargs)
    except RuntimeError as error:
        if "synchroniz" not in str(error):  # not the check's error: out of memory, or the device failed
            raise
        raise CaptureFailed(f"it synchronises with the host: {first_line(error)}") from error
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _after_a_broken_capture(error: Exception) -> None:
    """Raise what a capture that raised ``error`` amounts to; captures stay on only after an out-of-memory
    error that left the capture properly ended."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        raise error
    # ending a broken capture raises on its own; the cause is the error before it
    cause = error.__context__ or error
    _generator_usable_after_a_failed_capture()
    turn_captures_off(first_line(cause))
    if isinstance(cause, torch.cuda.OutOfMemoryError):
        raise cause from error
    raise CaptureFailed(first_line(cause)) from error


def _tensor_signature(tensor: torch.Tensor) -> Hashable:
    return ("tensor", tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, str(tensor.device))


_module_generation = 0  # counts parameters, buffers and submodules registered or replaced anywhere


def _module_changed(*args) -> None:
    global _module_generation
    _module_generation += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_module_changed)
torch.nn.modules.module.register_module_buffer_registration_hook(_module_changed)
torch.nn.modules.module.register_module_module_registration_hook(_module_changed)


class OwnedTensors:
    """What a recording of ``owner`` depends on besides its arguments: the storages of its parameters and
    buffers and, for an update, each module's training mode, which parameters take gradients, and every
    optimiser's hyperparameters (a float learning rate is part of the captured kernels). Walking a network's
    modules costs far more than replaying a small step, so the lists are kept and made again only when a
    module somewhere registered a parameter, buffer or submodule; the values are read on every call."""

    def __init__(self, owner: torch.nn.Module, update: bool):
        self.owner, self.update = owner, update
        self.generation = -1
        self.tensors: list = []
        self.parameters: list = []
        self.modules: list = []
        self.optimizers: list = []

    def _refresh(self) -> None:
        if self.generation != _module_generation:
            self.generation = _module_generation
            self.parameters = list(self.owner.parameters())
            self.tensors = self.parameters + list(self.owner.buffers())
            self.modules = list(self.owner.modules())
            self.optimizers = method_optimizers(self.owner) if self.update else []

    def key(self) -> Hashable:
        self._refresh()
        storages = tuple(map(torch.Tensor.data_ptr, self.tensors))
        if not self.update:
            return storages
        return (storages, tuple(m.training for m in self.modules), tuple(p.requires_grad for p in self.parameters),
                tuple(_hyperparameters(optimizer) for optimizer in self.optimizers))

    def optimizer_state(self) -> OptimizerState:
        """Every tensor in the optimisers' per-parameter state, as they hold it now."""
        self._refresh()
        entries = [(state, key, value) for optimizer in self.optimizers for state in optimizer.state.values()
                   for key, value in state.items() if isinstance(value, torch.Tensor)]
        return OptimizerState(tuple(self.optimizers), tuple(o.state for o in self.optimizers),
                              *(tuple(column) for column in zip(*entries)) if entries else ((), (), ()))


def _hyperparameters(optimizer: torch.optim.Optimizer) -> Hashable:
    """An optimiser's group settings as a key: tensors by storage, other values as they are (by ``repr``
    where one cannot be hashed)."""
    key = (id(optimizer),) + tuple(
        tuple(value.data_ptr() if isinstance(value, torch.Tensor) else value for name, value in group.items()
              if name != "params")
        for group in optimizer.param_groups)
    try:
        hash(key)
    except TypeError:
        return (id(optimizer),) + tuple(repr(value) for group in optimizer.param_groups
                                        for name, value in group.items() if name != "params")
    return key


def make_optimizers_capturable(owner: torch.nn.Module) -> None:
    """Let each optimiser of ``owner`` whose parameters are all on CUDA step inside a capture: torch refuses to
    capture a step while ``capturable`` is off. Its step counts then live on the device (where the fused
    kernels keep them anyway; a count kept on the host is moved there, exactly, being a whole number); the
    update is the same up to rounding."""
    for optimizer in method_optimizers(owner):
        for group in optimizer.param_groups:
            if group.get("capturable", True) or not all(p.is_cuda for p in group["params"]):
                continue
            for parameter in group["params"]:
                state = optimizer.state.get(parameter, {})
                if isinstance(state.get("step"), torch.Tensor) and not state["step"].is_cuda:
                    state["step"] = state["step"].to(parameter.device)
            group["capturable"] = True


def _optimizer_states(owner: torch.nn.Module) -> set:
    return {(id(optimizer), id(p)) for optimizer in method_optimizers(owner) for p, state in optimizer.state.items()
            if state}


def _undoing(owner: torch.nn.Module) -> Callable[[], None]:
    """What puts ``owner`` back as it is now once a recording's runs before the capture have trained it.

    The optimisers' state those runs made must stay, zeroed, in the same tensors: state made during the
    capture would be made afresh by every replay (a momentum that never accumulates). Where it cannot stay
    (optimisers that :class:`~.warmup.MethodState` restores by ``load_state_dict``) this raises
    :class:`CaptureFailed`."""
    saved = MethodState(owner)

    def undo() -> None:
        made = _optimizer_states(owner)
        saved.restore()
        for parameter in owner.parameters():  # gradients start from nothing in the capture, as in any step
            parameter.grad = None
        if made - _optimizer_states(owner):
            raise CaptureFailed("its optimiser's state cannot be kept in place across the recording's runs")

    return undo


def clone_output(output):
    """``output`` with every tensor in it (also inside tuples, lists and dicts) copied to fresh memory."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(clone_output(item) for item in output)
    if isinstance(output, dict):
        return {key: clone_output(value) for key, value in output.items()}
    return output


class CapturedCall:
    """``function`` replayed from recordings keyed by call signature; see the module docstring.

    ``owner`` is the module whose parameters and buffers the function reads. ``record`` makes a
    :class:`Recording` (by default a :class:`CudaGraphRecorder`; tests pass a stand-in). ``on_fallback(name,
    reason)`` hears once when recording fails and the call turns eager for good. With ``max_recordings``
    held, a new signature drops them all (they are made again as calls come) only where some are stale, made
    for parameters the method no longer has; otherwise it runs eagerly (counted in ``eager_calls``). Dropping
    them all would make a cycle of more signatures than the limit (an ``--inference-sweep`` repeated over
    inference runs) record every call again and replay none.
    """

    def __init__(self, name: str, function: Callable, owner: torch.nn.Module,
                 on_fallback: Callable[[str, str], None], record: Optional[Callable[..., Recording]] = None,
                 device_type: str = "cuda", max_recordings: int = MAX_RECORDINGS, update: bool = False):
        self.name, self.function, self.owner, self.on_fallback = name, function, owner, on_fallback
        self.update = update
        self.owned = OwnedTensors(owner, update)
        self.record: Optional[Callable[..., Recording]] = record or CudaGraphRecorder()
        self.device_type, self.max_recordings = device_type, max_recordings
        self.recordings: Dict[Hashable, Recording] = {}
        self.replays = self.eager_calls = self.recorded = 0

    @property
    def pool_bytes(self) -> int:
        """Device memory the recordings held now reserve for their graphs' private pools."""
        return sum(recording.pool_bytes for recording in self.recordings.values())

    def _signature(self, args: tuple, kwargs: dict) -> Optional[Hashable]:
        parts = []
        on_device = False
        for value in list(args) + [kwargs[key] for key in sorted(kwargs)]:
            if isinstance(value, torch.Tensor):
                on_device = on_device or value.device.type == self.device_type
                parts.append(_tensor_signature(value))
            elif isinstance(value, PLAIN_TYPES):
                parts.append((type(value).__name__, value))
            else:
                return None
        if not on_device:
            return None
        autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        return tuple(parts), tuple(sorted(kwargs)), autocast, torch.is_inference_mode_enabled(), self.owned.key()

    def __call__(self, *args, **kwargs):
        if self.record is not None and captures_off_reason() is not None:
            self._turn_eager(f"captures are off in this process: {captures_off_reason()}")
        if self.record is None or torch.is_grad_enabled() != self.update:
            return self.function(*args, **kwargs)
        signature = self._signature(args, kwargs)
        if signature is None:
            return self.function(*args, **kwargs)
        recording = self.recordings.get(signature)
        if recording is not None and not recording.optimizer_state_in_place():
            self.recordings.clear()  # an optimiser's state was replaced (graphs of one stream go together)
            recording = None
        if recording is None:
            if _paused:
                return self.function(*args, **kwargs)
            if len(self.recordings) >= self.max_recordings:
                storages = signature[-1]
                if all(held[-1] == storages for held in self.recordings):
                    self.eager_calls += 1
                    return self.function(*args, **kwargs)
                self.recordings.clear()
            if self.update and self.recorded >= 2 * self.max_recordings:
                self._turn_eager(f"recorded {self.recorded} times: the optimisers' settings or state, or the modules' "
                                 "modes, change between steps, and a replay would keep old ones")
                return self.function(*args, **kwargs)
            recording = self._recorded(args, kwargs)
            if recording is None:
                return self.function(*args, **kwargs)
            self.recorded += 1
            if self.update:  # recording made the optimisers capturable: key it as later calls will see them
                signature = self._signature(args, kwargs)
            self.recordings[signature] = recording
        for static, value in zip(recording.args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                recording.kwargs[key].copy_(value)
        recording.replay()
        self.replays += 1
        return clone_output(recording.output)

    def _recorded(self, args: tuple, kwargs: dict) -> Optional[Recording]:
        try:
            if not self.update:
                return self.record(self.function, args, kwargs)
            make_optimizers_capturable(self.owner)
            recording = self.record(self.function, args, kwargs, after_warmup=_undoing(self.owner))
            recording.optimizer_state = self.owned.optimizer_state()
            return recording
        except torch.cuda.OutOfMemoryError:
            self.recordings.clear()
            raise
        except CaptureFailed as error:
            self._turn_eager(str(error))
            return None

    def _turn_eager(self, reason: str) -> None:
        self.record = None
        self.recordings.clear()
        self.on_fallback(self.name, reason)
