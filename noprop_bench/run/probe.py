"""A quick speed probe: a few timed training steps and one small evaluation per method, scaled up to an
estimate of a whole run's wall time (so a user knows whether a run is minutes or a day)."""

import time
from typing import Dict, List, Sequence, Tuple

import torch

from ..datasets import BatchStream
from ..method import row_label_with_settings
from .evaluation_plan import train_accuracy_split
from .runner import RunData, TrialSpec, build_task, seed_everything
from .warmup import WARMUP_STEPS

PROBE_STEPS = 2
PROBE_IMAGES = 128


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def probe_trial(spec: TrialSpec, data: RunData) -> Tuple[float, float]:
    """Estimated ``(training seconds, evaluation and warm-up seconds)`` of one trial of ``spec``.

    Training: the median of ``PROBE_STEPS`` timed steps after a warm-up one, times the steps the budget
    buys (a budget in seconds is its own estimate). Evaluation: ``predict`` timed on ``PROBE_IMAGES`` test
    images at each setting the trial evaluates, scaled to the images that setting sees: the final
    evaluation (the test split, and the training split with train accuracy, times the runs), the
    checkpoints (``checkpoints`` x the checkpoint subset, at the method's checkpoint setting), the
    diagnostics, the sweep, and the warm-up (its untimed steps, and under ``--compile`` inference calls).
    """
    seed_everything(spec.seed)
    method = spec.method(build_task(spec, data), **spec.params).to(spec.device)
    method.train()
    stream = BatchStream(data.train, spec.batch_size, data.normalize, spec.augment, seed=spec.seed)
    batches = [stream.next() for _ in range(PROBE_STEPS + 1)]
    step_times = sorted(_timed(lambda b=batch: method.train_step(*b)) for batch in batches)[:-1]
    step = step_times[len(step_times) // 2]
    budget = spec.budget
    if budget.unit == "seconds":
        training = float(budget.amount)
    else:
        samples = {"samples": budget.amount, "steps": budget.amount * spec.batch_size,
                   "epochs": budget.amount * len(data.train)}[budget.unit]
        training = step * samples / spec.batch_size
    method.eval()
    x = data.normalize(data.test.images[:PROBE_IMAGES])

    def per_image(setting: dict) -> float:
        with torch.inference_mode():
            return _timed(lambda: method.predict(x, **setting)) / len(x)

    test = len(data.test)
    runs = spec.inference_runs if spec.method.stochastic else 1
    final = per_image({})
    checkpoint_setting = method.checkpoint_setting()
    checkpoint = per_image(checkpoint_setting) if checkpoint_setting else final
    final_images = test + (len(train_accuracy_split(data.train, test)) if spec.train_accuracy else 0)
    checkpoint_images = spec.checkpoint_size if 0 < spec.checkpoint_size < test else test
    evaluation = (final * final_images * runs + checkpoint * checkpoint_images * spec.checkpoints
                  + sum(per_image(setting) for setting in method.diagnostic_settings().values()) * test
                  + WARMUP_STEPS * step)
    if spec.speed.compile != "none":  # the inference path is compiled on a batch at two sizes while warming up
        evaluation += checkpoint * 1.5 * spec.batch_size
    if spec.inference_sweep:
        evaluation += sum(per_image(setting) for setting in method.sweep_settings()) * test * runs
    return training, evaluation


def estimate_run(specs: Sequence[TrialSpec], data: RunData) -> Tuple[float, List[Tuple[str, int, float]]]:
    """Total estimated seconds of ``specs`` and, per method row, ``(row label, trials, seconds per trial)``;
    each row is probed once (on its first seed)."""
    rows: Dict[str, List[TrialSpec]] = {}
    for spec in specs:
        key = row_label_with_settings(spec.method, spec.params) + repr(sorted(spec.params.items()))
        rows.setdefault(key, []).append(spec)
    total, lines = 0.0, []
    for group in rows.values():
        training, evaluation = probe_trial(group[0], data)
        total += (training + evaluation) * len(group)
        lines.append((row_label_with_settings(group[0].method, group[0].params), len(group), training + evaluation))
    return total, lines


def duration_text(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h`` or ``2.1 days``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_text(specs: Sequence[TrialSpec], data: RunData) -> str:
    """The probe's report: the total, then each row's trials and time per trial."""
    started = time.perf_counter()
    total, lines = estimate_run(specs, data)
    rows = "; ".join(f"{label} {n} x {duration_text(seconds)}" for label, n, seconds in lines)
    return (f"speed probe ({time.perf_counter() - started:.0f} s): about {duration_text(total)} of training and "
            f"evaluation for {len(specs)} trial(s), run one after another on this machine ({rows})")
