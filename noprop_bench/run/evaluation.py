"""Evaluating a method on a split: seeded apart from training, in batches that suit the device.

A pass that draws random numbers (a stochastic ``predict`` or ``predict_from_features``) always runs in
batches of ``EvaluationBatches.stochastic`` images, because its draws depend on the batch; deterministic
passes (``features``, and ``predict`` of a method that is not ``stochastic``) run in batches of
``EvaluationBatches.deterministic`` images, which on the CPU are small enough to stay in cache. Which
batch a deterministic pass uses does not change its result.
"""

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..conformance import logits_fixes, violation
from ..datasets import Normalizer, Split, eval_batches
from ..method import Method
from .evaluation_plan import EvaluationBatches
from .speed_settings import SpeedSettings

FeatureBatches = List[Tuple[torch.Tensor, torch.Tensor]]
ImagesDone = Callable[[int], None]  # an evaluation pass's progress: told the images done so far, after each batch


class Diverged(RuntimeError):
    """A training metric or the predictions became NaN or infinite."""


@contextlib.contextmanager
def evaluation_mode(method: Method) -> Iterator[None]:
    """``method`` in eval mode, given back its mode however the block ends: an evaluation that runs out of
    memory is retried, and training must not go on with dropout off and BatchNorm frozen."""
    was_training = method.training
    method.eval()
    try:
        yield
    finally:
        method.train(was_training)


def split_features(method: Method, split: Split, normalize: Normalizer, batches: Union[int, EvaluationBatches],
                   progress: Optional[ImagesDone] = None) -> Optional[FeatureBatches]:
    """``method.features`` of the whole split, computed in deterministic batches and handed out in
    stochastic ones, or None when the method keeps ``predict`` whole (see :meth:`Method.features`)."""
    if not method.reuses_features():
        return None
    batches = EvaluationBatches.of(batches)
    devices = [split.images.device] if split.images.device.type == "cuda" else []
    # forked: a plugin whose features draw random numbers (against the contract) still leaves training's RNG alone
    with evaluation_mode(method), torch.random.fork_rng(devices=devices), torch.inference_mode():
        parts, done = [], 0
        for x, _ in eval_batches(split, normalize, batches.deterministic):
            parts.append(method.features(x))
            if progress is not None:
                done += len(x)
                progress(done)
        features = torch.cat(parts)
    size = batches.stochastic
    return [(features[start:start + size], split.labels[start:start + size]) for start in range(0, len(split), size)]


def predictions(method: Method, split: Split, normalize: Normalizer, batches: Union[int, EvaluationBatches],
                seed: int, setting: Optional[Dict[str, Any]] = None,
                features: Optional[FeatureBatches] = None, progress: Optional[ImagesDone] = None) -> torch.Tensor:
    """The logits ``[N, classes]`` of ``method.predict(x, **setting)`` on ``split``, as :func:`evaluate` sees them.

    The RNG is forked and seeded, so evaluation is reproducible and never perturbs training. A method
    that splits out :meth:`Method.features` predicts from them (``features`` from :func:`split_features`
    when given, computed here otherwise), with the same result, as the features use no randomness.
    ``progress`` is told the images done after each batch (it reads no device value, so it adds no sync).
    """
    setting = setting or {}
    batches = EvaluationBatches.of(batches)
    if features is None:
        features = split_features(method, split, normalize, batches)
    devices = [split.images.device] if split.images.device.type == "cuda" else []
    outputs, done = [], 0
    with evaluation_mode(method), torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        if features is not None:
            pairs = ((method.predict_from_features(f, **setting), y) for f, y in features)
        else:
            size = batches.stochastic if method.stochastic else batches.deterministic
            pairs = ((method.predict(x, **setting), y) for x, y in eval_batches(split, normalize, size))
        for number, (logits, y) in enumerate(pairs):
            if number == 0:
                fixes = logits_fixes(logits, len(y), getattr(method.task, "num_classes", logits.shape[-1]))
                if fixes:
                    raise violation(type(method), fixes)
            outputs.append(logits)
            if progress is not None:
                done += len(y)
                progress(done)
    return torch.cat(outputs)


def evaluate(method: Method, split: Split, normalize: Normalizer, batches: Union[int, EvaluationBatches], seed: int,
             setting: Optional[Dict[str, Any]] = None, features: Optional[FeatureBatches] = None,
             require_finite: bool = True, progress: Optional[ImagesDone] = None) -> float:
    """Accuracy (%) of :func:`predictions` on ``split``. Non-finite logits raise :class:`Diverged` when
    ``require_finite`` (the checkpoints and the final evaluation; not the optional sweeps and diagnostics)."""
    logits = predictions(method, split, normalize, batches, seed, setting, features, progress)
    if require_finite and not bool(torch.isfinite(logits).all()):
        raise Diverged(f"non-finite predictions{' with ' + repr(setting) if setting else ''}")
    return 100.0 * (logits.argmax(dim=1) == split.labels).sum().item() / len(split)


def uses_inference_layout(device_type: str, settings: SpeedSettings) -> bool:
    """Whether evaluation switches convolution weights to channels-last: on the CPU, in eager mode, when
    the run does not train in channels-last already (oneDNN's CPU convolutions are faster in it, and
    compiled code would recompile for the new strides)."""
    return device_type == "cpu" and settings.compile == "none" and not settings.channels_last


@contextlib.contextmanager
def inference_layout(method: Method, device_type: str, settings: SpeedSettings) -> Iterator[None]:
    """Evaluate with the method's 4-D parameters in channels-last memory format where
    :func:`uses_inference_layout` says so. The values are the same; afterwards every parameter holds its
    original tensor again, so training resumes on exactly what it left and views of it stay valid."""
    if not uses_inference_layout(device_type, settings):
        yield
        return
    originals = [(parameter, parameter.data) for parameter in method.parameters()
                 if parameter.dim() == 4 and parameter.data.is_contiguous()]
    try:
        for parameter, data in originals:
            parameter.data = data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for parameter, data in originals:
            parameter.data = data
