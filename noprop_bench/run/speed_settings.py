"""Speed settings the harness owns (precision, memory format, torch.compile, cuDNN autotuning), applied
alike to every method.

A method never chooses its own precision or compilation: the run's :class:`SpeedSettings` wrap the
method's entry points (``train_step``, ``predict``, ``features``, ``predict_from_features``) in the
same way for every method, so a comparison stays fair. ``torch.compile`` wraps what the method's
optional ``compile_targets()`` hook names (by default the train step and the inference path); a target
that cannot be compiled falls back to eager, and the reason is recorded with the trial. On CUDA,
``--compile`` also records what ``capture_targets()`` (inference loops) and ``capture_step_targets()`` (whole
training updates) name as whole CUDA graphs (see :mod:`.cuda_graphs`).
"""

import argparse
import contextlib
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ..conformance import resolve_target, violation
from ..errors import UsageError
from .cuda_graphs import CapturedCall, clone_output, first_line, recording_a_whole_call

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor records its own CUDA graphs in these
ENTRY_POINTS = ("train_step", "predict", "features", "predict_from_features")


@dataclass(frozen=True)
class SpeedSettings:
    """How a trial's arithmetic runs: ``precision`` (fp32, tf32 matmuls/convolutions, bf16 autocast),
    ``channels_last`` memory format for 4-D weights and inputs, the ``compile`` mode, and
    ``cudnn_benchmark`` (cuDNN times its convolution algorithms for each new shape and keeps the fastest,
    instead of choosing by heuristics; CUDA only)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "none"
    cudnn_benchmark: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: accepted: {', '.join(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise UsageError(f"--compile {self.compile!r}: accepted: {', '.join(COMPILE_MODES)}")

    @property
    def is_reference(self) -> bool:
        """Eager fp32 in the default memory format: the settings every trial had before they existed."""
        return self == SpeedSettings()

    def identity(self) -> Optional[Dict[str, Any]]:
        """What enters the trial id: nothing for the reference settings, and ``cudnn_benchmark`` only when
        on (trial ids from before either existed stay valid)."""
        if self.is_reference:
            return None
        identity = asdict(self)
        if not self.cudnn_benchmark:
            del identity["cudnn_benchmark"]
        return identity

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short caption text, e.g. ``eager fp32`` or ``bf16, channels-last, compile max-autotune``."""
        parts = [self.precision] + (["channels-last"] if self.channels_last else [])
        text = ", ".join(parts + [f"compile {self.compile}"]) if self.compile != "none" else " ".join(
            ["eager", ", ".join(parts)])
        return text + (", cuDNN autotuning" if self.cudnn_benchmark else "")

    def check_device(self, device_type: str) -> None:
        """Refuse settings that mean nothing on ``device_type``: cuDNN autotuning and TF32 off CUDA (a CPU run
        labelled tf32 would compute in fp32 and sit in a cell of its own)."""
        if self.cudnn_benchmark and device_type != "cuda":
            raise UsageError(f"--cudnn-benchmark: cuDNN runs on CUDA devices only, not on {device_type}")
        if self.precision == "tf32" and device_type != "cuda":
            raise UsageError(f"--precision tf32: TF32 is for CUDA devices only; on {device_type} give fp32 (what "
                             f"it would compute) or bf16")

    @classmethod
    def from_dict(cls, fields: Optional[Dict[str, Any]]) -> "SpeedSettings":
        return cls(**(fields or {}))


SETTING_FIELDS = tuple(field.name for field in fields(SpeedSettings))


def default_settings(device_type: str) -> SpeedSettings:
    """The settings a run gets when none are asked for: eager fp32 on the CPU; on CUDA TF32 (fp32 storage
    and accumulation, 10-bit mantissa products) with channels-last, which tensor-core convolutions prefer.
    torch.compile stays opt-in: its compile time and its failures depend on the method."""
    if device_type == "cuda":
        return SpeedSettings(precision="tf32", channels_last=True, compile="none")
    return SpeedSettings()


def chosen_settings(device_type: str, precision: Optional[str] = None, channels_last: Optional[bool] = None,
                    compile: Optional[str] = None, cudnn_benchmark: Optional[bool] = None) -> SpeedSettings:
    """The device's :func:`default_settings` with what the command line gave put over them."""
    base = default_settings(device_type)
    settings = SpeedSettings(precision=precision or base.precision,
                             channels_last=base.channels_last if channels_last is None else channels_last,
                             compile=compile or base.compile,
                             cudnn_benchmark=base.cudnn_benchmark if cudnn_benchmark is None else cudnn_benchmark)
    settings.check_device(device_type)
    return settings


def add_speed_arguments(parser) -> None:
    """``--precision``, ``--channels-last``/``--no-channels-last`` and ``--compile`` on an argparse parser."""
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="arithmetic for every method of the run: fp32, tf32 (TF32 matmuls and convolutions; "
                             "CUDA only) or bf16 (autocast); default: fp32 on the CPU, tf32 on CUDA")
    channels_last = parser.add_mutually_exclusive_group()
    channels_last.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="channels-last memory format for weights and images (default on CUDA, off on the CPU)")
    channels_last.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        default=argparse.SUPPRESS,
                        help="keep the default (contiguous) memory format")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None,
                        help="torch.compile mode for each method's train step and inference path (reduce-overhead "
                             "uses CUDA graphs); a method that cannot be compiled runs eagerly and its trial says "
                             "why; compilation happens in untimed warm-up. Default: none")
    add_cudnn_benchmark_arguments(parser, "(in the untimed warm-up for the training batch)")


def add_cudnn_benchmark_arguments(parser, when: str) -> None:
    """``--cudnn-benchmark`` / ``--no-cudnn-benchmark`` (one value, None when neither is given); ``when``
    says in the help when the timing happens."""
    cudnn_benchmark = parser.add_mutually_exclusive_group()
    cudnn_benchmark.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", action="store_true", default=None,
                        help=f"CUDA: cuDNN times its convolution algorithms for each new input shape {when} and "
                             f"keeps the fastest. Default: off")
    cudnn_benchmark.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                        default=argparse.SUPPRESS,
                        help="cuDNN chooses convolution algorithms by heuristics (the default)")


@contextlib.contextmanager
def backend_flags(settings: SpeedSettings) -> Iterator[None]:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions, and cuDNN's autotuning, while the trial
    runs; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    tf32 = settings.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def _is_compiler_error(error: BaseException) -> bool:
    """Errors raised by torch.compile's tracing or code generation, not by the method's own code."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "Unsupported" in type(error).__name__


class CompiledCall:
    """A compiled entry point that runs eagerly from its first compiler error on, keeping the reason."""

    def __init__(self, name: str, eager: Callable, mode: str, on_fallback: Callable[[str, str], None]):
        self.name, self.eager, self.on_fallback = name, eager, on_fallback
        self.compiled: Optional[Callable] = torch.compile(eager, mode=mode)
        self.records_cuda_graphs = mode in CUDA_GRAPH_MODES

    def __call__(self, *args, **kwargs):
        if self.compiled is None or torch.compiler.is_compiling():
            # when traced into another compiled target, the eager code joins that one's graph
            return self.eager(*args, **kwargs)
        if recording_a_whole_call():
            # inside a whole-call recording (capture_targets): inductor's own CUDA graphs cannot nest in it
            # (the eager kernels become part of the outer graph anyway)
            if self.records_cuda_graphs:
                return self.eager(*args, **kwargs)
            if torch.cuda.is_current_stream_capturing():
                # an error here is the capture's to report, not a reason to stop compiling this target
                return self.compiled(*args, **kwargs)
        try:
            output = self.compiled(*args, **kwargs)
        except Exception as error:
            if not _is_compiler_error(error):
                raise
            self.compiled = None
            self.on_fallback(self.name, first_line(error))
            return self.eager(*args, **kwargs)
        # inductor's CUDA graphs hand out outputs that the next replay overwrites; a caller that keeps them
        # across calls (an evaluation's batches) would read another call's values, so they are copied out
        return clone_output(output) if self.records_cuda_graphs else output


def _resolve(method: torch.nn.Module, path: str, kind: str):
    """The object owning the attribute ``path`` (dotted, e.g. ``model.logits``) and the attribute's name;
    ``kind`` (e.g. ``compile target``) names the path in the error when it is not callable."""
    resolved = resolve_target(method, path)
    if resolved is None:  # built methods are checked for this (conformance.target_fixes)
        raise violation(type(method), [f"{kind} {path!r} is not a callable attribute of the method"])
    return resolved


def _graph_break_counts() -> Dict[str, int]:
    """torch.compile's process-wide graph-break counts, by the first line of each reason."""
    counts: Dict[str, int] = {}
    for reason, count in dict(getattr(torch._dynamo.utils, "counters", {}).get("graph_break", {})).items():
        line = str(reason).strip().splitlines()[0] if str(reason).strip() else "unknown"
        counts[line] = counts.get(line, 0) + int(count)
    return counts


class AppliedSpeed:
    """What :func:`apply_speed_settings` did to one method: what was compiled, what fell back and why."""

    def __init__(self, settings: SpeedSettings, say: Callable[[str], None] = lambda message: None):
        self.settings, self.say = settings, say
        self.compiled: List[str] = []
        self.fallbacks: Dict[str, str] = {}
        self.captured: List[str] = []
        self.capture_fallbacks: Dict[str, str] = {}
        self.captured_calls: Dict[str, CapturedCall] = {}
        self._graph_breaks_before = _graph_break_counts() if settings.compile != "none" else None

    def capturing(self, method: torch.nn.Module, path: str, function: Callable, update: bool) -> CapturedCall:
        """``function`` (the attribute ``path`` of ``method``) wrapped to be recorded as CUDA graphs."""
        call = CapturedCall(path, function, method, self.capture_fallback, update=update)
        self.captured_calls[path] = call
        return call

    def fallback(self, name: str, reason: str) -> None:
        self._ran_eagerly(self.compiled, self.fallbacks, "torch.compile", name, reason)

    def capture_fallback(self, name: str, reason: str) -> None:
        self._ran_eagerly(self.captured, self.capture_fallbacks, "CUDA graph capture", name, reason)

    def _ran_eagerly(self, done: List[str], reasons: Dict[str, str], what: str, name: str, reason: str) -> None:
        if name in done:
            done.remove(name)
        reasons[name] = reason
        self.say(f"{what} failed for {name}; it runs eagerly: {reason}")

    def record(self) -> Dict[str, Any]:
        """What the trial stores as ``speed_settings``; with CUDA graphs, ``capture_counts`` says per wrapped
        call how many graphs were recorded, how many calls replayed one or ran eagerly (a new signature
        past the recordings held) and the device memory the graphs held at the end reserve."""
        record = {**self.settings.as_dict(), "compiled": list(self.compiled), "compile_fallbacks": dict(self.fallbacks),
                  "captured": list(self.captured), "capture_fallbacks": dict(self.capture_fallbacks)}
        breaks = self.graph_breaks()
        if breaks:
            record["graph_breaks"] = breaks
        if self.captured_calls:
            record["capture_counts"] = {path: {"recordings": call.recorded, "replays": call.replays,
                                               "eager_calls": call.eager_calls, "pool_bytes": call.pool_bytes}
                                        for path, call in self.captured_calls.items()}
        return record

    def graph_breaks(self) -> Dict[str, int]:
        """Graph breaks torch.compile met in this method's code since the settings were applied, by reason
        (first line of torch's message): each splits a compiled target, and what dynamo could not trace there
        runs in Python (``Tensor.item()``, a data-dependent branch; ``backward()`` itself is handed to
        autograd, whose graphs are compiled too)."""
        if self._graph_breaks_before is None:
            return {}
        now = _graph_break_counts()
        return {reason: count - self._graph_breaks_before.get(reason, 0) for reason, count in now.items()
                if count > self._graph_breaks_before.get(reason, 0)}

    def update_pool_bytes(self) -> int:
        """Device memory reserved for the graphs of the recorded training updates (see ``Recording``)."""
        return sum(call.pool_bytes for call in self.captured_calls.values() if call.update)


def _wrap_entry(function: Callable, settings: SpeedSettings, device_type: str) -> Callable:
    """``function`` with channels-last inputs and bf16 autocast, as the settings ask."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        if settings.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last)
                         if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        if settings.precision == "bf16":
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                return function(*args, **kwargs)
        return function(*args, **kwargs)

    return wrapped


def _wrap_targets(method: torch.nn.Module, hook: str, kind: str, wrap: Callable[[str, Callable], Callable]) -> List[str]:
    """Replace each attribute path the method's ``hook`` (``compile_targets``/``capture_targets``) names by
    ``wrap(path, attribute)``; returns the paths."""
    paths = list(getattr(method, hook)()) if hasattr(method, hook) else []
    for path in paths:
        owner, name = _resolve(method, path, kind)
        setattr(owner, name, wrap(path, getattr(owner, name)))
    return paths


def captures_whole_calls(settings: SpeedSettings, device_type: str) -> bool:
    """Whether ``capture_targets()`` and ``capture_step_targets()`` are recorded as CUDA graphs: under
    ``--compile``, on CUDA."""
    return settings.compile != "none" and device_type == "cuda"


def apply_speed_settings(method: torch.nn.Module, settings: SpeedSettings, device_type: str,
                         say: Callable[[str], None] = lambda message: None) -> AppliedSpeed:
    """Put ``method`` under ``settings`` in place: memory format, compiled targets, autocast on entry points.

    Wrappers are instance attributes, so the class (and every other instance) stays as it was. Under
    ``--compile`` torch's compile caches are emptied first, so every trial compiles the same way. ``say``
    hears of every compile or capture target that falls back to eager.
    """
    applied = AppliedSpeed(settings, say)
    if settings.channels_last:
        method.to(memory_format=torch.channels_last)
    if settings.compile != "none":
        # code compiled for earlier methods of the process holds guards on their (dead) objects: left in
        # place, it would count towards torch's recompile limit on shared code such as Optimizer.step, and
        # later trials would quietly run those parts eagerly
        torch._dynamo.reset()
        applied.compiled = _wrap_targets(method, "compile_targets", "compile target", lambda path, function: (
            CompiledCall(path, function, settings.compile, applied.fallback)))
    if captures_whole_calls(settings, device_type):
        applied.captured = _wrap_targets(method, "capture_targets", "capture target", lambda path, function: (
            applied.capturing(method, path, function, update=False)))
        applied.captured += _wrap_targets(method, "capture_step_targets", "capture step target",
                                          lambda path, function: applied.capturing(method, path, function, update=True))
    if settings.channels_last or settings.precision == "bf16":
        for name in ENTRY_POINTS:
            if name in ("features", "predict_from_features") and not method.reuses_features():
                continue
            setattr(method, name, _wrap_entry(getattr(method, name), settings, device_type))
    return applied
