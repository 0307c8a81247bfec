"""One trial: seed, build, train under the budget, evaluate at checkpoints, evaluate at the end."""

import dataclasses
import gc
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import numpy as np
import torch

from ..backbones import create_backbone, feature_dim
from ..conformance import (MISSING_LOSS_WARNING, ContractViolation, build_method, describe_class,
                           logits_fixes, loss_fixes, step_metrics_fixes, violation)
from .budget import Budget, ClockReads, TrainingClock
from .cuda_graphs import no_new_recordings
from ..datasets import BatchStream, Dataset, Normalizer, Split, layout_fixes
from ..errors import UsageError
from .evaluation import (Diverged, EvaluationBatches, FeatureBatches, ImagesDone, evaluate, inference_layout,
                         split_features)
from .evaluation_plan import (DEFAULT_CHECKPOINT_SIZE, evaluation_batches, stratified_indices, stratified_subset,
                              train_accuracy_split)
from .memory import PeakMemory, with_graph_pools
from .speed_settings import SpeedSettings, apply_speed_settings, backend_flags
from .ticker import one_at_a_time, ticking
from .warmup import warm_up
from ..method import Method, row_label_with_settings, splits_features
from ..provenance import code_identity
from .interrupts import stop_cause, stoppable
from .jobs import note_exception
from .store import environment, trial_id
from ..task import Task

DIVERGENCE_CHECK_EVERY = 25  # steps between reads of the non-finite flag (each read syncs the device)
CUDA_CLOCK_READ_EVERY = 8  # most steps between clock reads on CUDA (each read synchronises); see ClockReads
FINAL_PROGRESS_AFTER_SECONDS = 5.0  # a final evaluation reports each inference run once it has run this long
HEARTBEAT_SECONDS = 30.0  # longest wall time between progress lines while training (and, batch by batch, evaluating)


VAL_SPLIT_SEED = 12345  # fixed, so every method and seed of a run holds out the same images


@dataclass
class RunData:
    """A dataset loaded once per run and shared by its trials, on the training device.

    With ``val_split`` > 0 a fixed, stratified fraction of the training split is held out as ``val``
    for methods that select something; the test split is only ever reported.
    """

    dataset: Dataset
    train: Split
    test: Split
    normalize: Normalizer
    load_seconds: float
    val: Optional[Split] = None

    @classmethod
    def load(cls, dataset: Dataset, device: torch.device, val_split: float = 0.0) -> "RunData":
        started = time.perf_counter()
        train, test = load_split(dataset, "train"), load_split(dataset, "test")
        val = None
        if val_split > 0:
            train, val = hold_out(train, val_split, VAL_SPLIT_SEED)
            val = val.to(device)
        normalize = Normalizer(dataset.mean, dataset.std, device)
        return cls(dataset, train.to(device), test.to(device), normalize, time.perf_counter() - started, val)


def load_split(dataset: Dataset, name: str) -> Split:
    """``dataset.load(name)``, checked: a dataset that fails to load, or hands back a split that breaks the
    contract (labels out of range, say, which would otherwise fail every method), is one line of error
    naming the dataset, not a traceback blaming a method."""
    try:
        split = dataset.load(name)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - a plugin's (or a download's) failure, said in one line
        detail = str(error).strip().splitlines()
        raise UsageError(f"dataset {dataset.name!r} could not load its {name} split: {type(error).__name__}"
                         f"{': ' + detail[0] if detail else ''}") from error
    if not isinstance(split, Split):
        raise UsageError(f"dataset {dataset.name!r}: load({name!r}) returned {type(split).__name__}, not a "
                         f"noprop_bench.Split")
    labels = split.labels
    layout = layout_fixes(split.images.shape[1:], dataset)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        problem = f"labels must be integers [N], not {labels.dtype} of shape {list(labels.shape)}"
    elif layout:
        problem = layout[0]
    elif len(labels) == 0:
        problem = "the split is empty"
    elif int(labels.min()) < 0 or int(labels.max()) >= dataset.num_classes:
        problem = (f"labels must lie in 0..{dataset.num_classes - 1} (one per name in classes); found "
                   f"{int(labels.min())}..{int(labels.max())}")
    else:
        return split
    raise UsageError(f"dataset {dataset.name!r} breaks the dataset contract in its {name} split: {problem} "
                     f"(noprop_bench.testing.check_dataset lists every fix)")


def hold_out(split: Split, fraction: float, seed: int) -> Tuple[Split, Split]:
    """Split off ``fraction`` of every class (at least one image each) as a validation split."""
    labels = split.labels.cpu()
    for label in labels.unique():
        members = int((labels == label).sum())
        if max(1, int(round(fraction * members))) >= members:
            raise UsageError(f"--val-split {fraction} leaves no training image of class {int(label)}")
    keep, held = stratified_indices(labels, fraction, seed)
    return (Split(split.images[keep], split.labels[keep]), Split(split.images[held], split.labels[held]))


@dataclass
class TrialSpec:
    """Everything that defines one trial; ``config()`` is what makes two trials the same."""

    method: Type[Method]
    params: Dict[str, Any]
    dataset: str
    backbone: str
    budget: Budget
    seed: int
    batch_size: int
    device: torch.device
    augment: str
    inference_runs: int = 5
    eval_batch_size: Optional[int] = None  # None: sized for the device (evaluation_plan.evaluation_batch_size)
    checkpoints: int = 8
    checkpoint_size: int = DEFAULT_CHECKPOINT_SIZE  # test images per checkpoint evaluation; 0: all
    train_accuracy: bool = False
    inference_sweep: bool = False
    val_split: float = 0.0
    command: str = ""
    preset: Optional[Dict[str, Any]] = None  # {"name": ..., "overrides": [...]}; not part of the identity
    speed_settings: Optional[Dict[str, Any]] = None  # SpeedSettings fields; None: eager fp32
    dataset_content: Optional[str] = None  # the dataset's content_id where its files can change

    @property
    def speed(self) -> SpeedSettings:
        return SpeedSettings.from_dict(self.speed_settings)

    def config(self) -> Dict[str, Any]:
        speed = self.speed.identity()  # only when not eager fp32, so older trial ids stay valid
        return {**({"speed": speed} if speed else {}),
            **({"dataset_content": self.dataset_content} if self.dataset_content else {}),
            "method": self.method.name, "params": self.params, "dataset": self.dataset,
            "backbone": self.backbone, "budget": str(self.budget), "seed": self.seed,
            "batch_size": self.batch_size, "augment": self.augment,
            "inference_runs": self.inference_runs if self.method.stochastic else 1,
            "device_type": torch.device(self.device).type, "train_accuracy": self.train_accuracy,
            "inference_sweep": self.inference_sweep, "val_split": self.val_split,
            # train accuracy is measured on at most twice the test split's size (evaluation_plan)
            **({"train_accuracy_size": "2x test"} if self.train_accuracy else {}),
        }

    @property
    def trial_id(self) -> str:
        return trial_id(self.config())

    def plain_fields(self) -> Dict[str, Any]:
        """The fields as plain data (method by name, budget as text, device by type), for other processes."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(method=self.method.name, budget=str(self.budget), device=torch.device(self.device).type)
        return fields

    def describe(self) -> str:
        return f"{row_label_with_settings(self.method, self.params)} seed {self.seed}"


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_fractions(count: int) -> List[float]:
    """Budget fractions at which the test accuracy is observed: roughly log-spaced, ending before 1."""
    if count <= 0:
        return []
    return [float(f) for f in np.geomspace(0.02, 1.0, count + 1)[:-1]]


def backbone_width(backbone: str, shape: Tuple[int, ...]) -> int:
    """The feature width of ``backbone`` on images of ``shape`` (C, H, W); a clear error if it cannot take them."""
    try:
        return feature_dim(create_backbone(backbone, in_chans=shape[0], image_size=tuple(shape[1:])), shape)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"backbone {backbone!r} cannot take {shape[1]}x{shape[2]} images: {error}") from None


def build_task(spec: TrialSpec, data: RunData) -> Task:
    shape = tuple(data.train.images.shape[1:])

    def make_backbone():
        return create_backbone(spec.backbone, in_chans=shape[0], image_size=tuple(shape[1:]))

    width = backbone_width(spec.backbone, shape)
    return Task(
        num_classes=data.dataset.num_classes, image_shape=shape, device=torch.device(spec.device),
        backbone_name=spec.backbone, make_backbone=make_backbone, backbone_features=width,
        normalize=data.normalize, train_images=data.train.images, train_labels=data.train.labels,
        val_images=None if data.val is None else data.val.images,
        val_labels=None if data.val is None else data.val.labels, seed=spec.seed,
    )


PROBE_IMAGES = 8  # images of the eager warm-up's inference probe


def _warm_up_inference(method: Method, x: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """The inference path at the checkpoint setting, checked against the contract, so a ``predict`` that
    returns the wrong thing fails the trial before its budget is spent, not at its first evaluation.

    Compiled, it runs on two batch sizes of ``x``: torch.compile then makes the batch dimension dynamic, and
    every evaluation batch size reuses that graph; eager, on a few images. Call it under ``inference_mode``:
    the clones are then inference tensors, as evaluation batches are. Whole calls are not recorded as CUDA
    graphs here: evaluations run on other batch shapes."""
    setting = method.checkpoint_setting()
    sizes = sorted({min(len(x), max(2, len(x) // 2)), len(x)}) if compiled else [min(len(x), PROBE_IMAGES)]

    def inference():
        with no_new_recordings():
            for size in sizes:
                images = x[:size].clone()
                if method.reuses_features():
                    logits = method.predict_from_features(method.features(images), **setting)
                else:
                    logits = method.predict(images, **setting)
                fixes = logits_fixes(logits, size, method.task.num_classes)
                if fixes:
                    raise violation(type(method), fixes)

    return inference


def _finite(value: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(value.detach()).all()


def trial_header(spec: TrialSpec) -> Dict[str, Any]:
    """The fields of a trial's record that follow from its spec alone (known before it runs anywhere)."""
    return {
        "trial_id": spec.trial_id, "status": "pending", "error": None,
        "method": spec.method.name, "method_label": spec.method.label or spec.method.name,
        "row_label": spec.method.row_label(spec.params), "family": spec.method.family,
        "stochastic": spec.method.stochastic, "params": spec.params,
        "param_defaults": dict(spec.method.defaults), "dataset": spec.dataset,
        **({"dataset_content": spec.dataset_content} if spec.dataset_content else {}),
        "backbone": spec.backbone, "budget": str(spec.budget), "budget_unit": spec.budget.unit,
        "seed": spec.seed, "batch_size": spec.batch_size, "augment": spec.augment, "val_split": spec.val_split,
        "inference_runs": spec.inference_runs if spec.method.stochastic else 1, "command": spec.command,
        "preset": spec.preset, "checkpoints": spec.checkpoints,
        "speed_settings": spec.speed.as_dict(),
    }


def run_trial(spec: TrialSpec, data: RunData, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train and evaluate one trial; always returns a record, whatever happened inside.

    ``status`` is ``ok``, ``diverged`` (a non-finite loss), ``failed`` (the method raised) or
    ``interrupted`` (Ctrl-C: the caller should store the record and stop).
    """
    say = progress or (lambda message: None)
    record: Dict[str, Any] = {
        **trial_header(spec), "status": "running",
        "dataset_label": data.dataset.display_name,
        "num_classes": data.dataset.num_classes, "image_shape": list(data.train.images.shape[1:]),
        "train_size": len(data.train), "test_size": len(data.test),
        "environment": environment(spec.device), "code": code_identity(spec.method),
        "data_load_seconds": data.load_seconds,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "curve": [], "steps": 0, "samples": 0, "epochs": 0.0,
        "train_seconds": 0.0, "eval_seconds": 0.0, "setup_seconds": 0.0,
    }
    if torch.device(spec.device).type == "cuda" and not torch.cuda.is_available():
        record.update(status="failed", error=f"no CUDA device on host {record['environment']['host']}",
                      finished_at=record["started_at"])
        return record
    if spec.dataset_content and data.dataset.content_id != spec.dataset_content:  # files changed since planning
        record.update(status="failed", finished_at=record["started_at"],
                      error=f"the files of {spec.dataset} changed after the run was planned (content "
                            f"{str(data.dataset.content_id)[:12]}, planned {spec.dataset_content[:12]}); run again")
        return record
    trial = _TrialRun(spec, data, record, say)
    try:
        with backend_flags(spec.speed), stoppable():  # a worker's stop signal interrupts only the trial itself
            trial.run()
        record["status"] = "ok"
    except Diverged as error:
        record["status"] = "diverged"
        record["error"] = str(error)
    except ContractViolation as error:
        record["status"] = "failed"
        record["error"] = f"contract violation: {error}"
    except MethodUsageError as error:
        record["status"] = "failed"
        record["error"] = f"bad input: {error}"
    except KeyboardInterrupt:  # the caller stores the record and stops the run
        record["status"] = "interrupted"
        record["error"] = stop_cause()
    except UsageError:
        raise
    except Exception as error:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        note_exception(record, error, spec.method)
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        trial.finish()
    return record


class MethodUsageError(Exception):
    """A :class:`UsageError` raised while the method was built: this trial fails, the grid goes on."""


def build_trial_method(cls: Type[Method], task: Task, params: Dict[str, Any]) -> Method:
    """``build_method`` for one trial (or speed row): a :class:`UsageError` of the method's own becomes a
    :class:`MethodUsageError` naming its plugin, so only that trial fails."""
    try:
        return build_method(cls, task, params)
    except UsageError as error:
        raise MethodUsageError(f"{describe_class(cls)}: {error}") from None


class _TrialRun:
    """The mutable state of one trial while it trains, so ``run_trial`` only handles outcomes."""

    def __init__(self, spec: TrialSpec, data: RunData, record: Dict[str, Any], say):
        self.spec, self.data, self.record = spec, data, record
        self.say = one_at_a_time(say)  # the final evaluation's tick speaks from another thread (a worker's pipe)
        self.clock = TrainingClock(spec.device)
        self.memory = PeakMemory(spec.device)
        self.method: Optional[Method] = None
        self.steps = self.samples = 0
        self.test_features: Optional[FeatureBatches] = None
        self.evaluation_started = self.evaluation_said_at = 0.0  # the final evaluation's start, last line
        self.evaluation_pass: Optional[Tuple[str, int, int]] = None  # (what, images done, images) of the pass
        self.evaluation_lock = threading.Lock()  # the tick's progress lines and the passes' own
        self.speed = None
        self.checkpoint_test = stratified_subset(data.test, spec.checkpoint_size)
        if torch.device(spec.device).type == "cuda":
            # an earlier trial's method may still sit in a reference cycle (it holds the wrappers of its
            # captured calls, which hold it), with its device memory and CUDA graphs: free it before sizing
            gc.collect()
        self.eval_batch = EvaluationBatches.of(spec.eval_batch_size or evaluation_batches(
            spec.device, tuple(data.test.images.shape[1:]), spec.method.stochastic and splits_features(spec.method)))
        record["checkpoint_size"] = len(self.checkpoint_test)
        record["eval_batch_size"] = self.eval_batch.stochastic
        record["eval_feature_batch_size"] = self.eval_batch.deterministic

    def run(self):
        spec, data, record = self.spec, self.data, self.record
        setup_started = time.perf_counter()
        seed_everything(spec.seed)
        task = build_task(spec, data)
        self.method = method = build_trial_method(spec.method, task, spec.params).to(spec.device)
        method.train()
        record["params_total"] = sum(p.numel() for p in method.parameters())
        record["params_trainable"] = sum(p.numel() for p in method.parameters() if p.requires_grad)
        record["backbone_features"] = task.backbone_features
        record["checkpoint_setting"] = dict(method.checkpoint_setting())  # the curve's points before the last
        batch_size = spec.batch_size
        stream = BatchStream(data.train, batch_size, data.normalize, spec.augment, seed=spec.seed)
        record["setup_seconds"] = time.perf_counter() - setup_started
        self._warm_up(method, batch_size)

        fractions = checkpoint_fractions(spec.checkpoints)
        loss_sum = torch.zeros((), device=spec.device)
        loss_count = 0
        finite = torch.ones((), dtype=torch.bool, device=spec.device)
        reads = ClockReads(CUDA_CLOCK_READ_EVERY if torch.device(spec.device).type == "cuda" else 1)
        spent = 0.0
        heartbeat = time.monotonic()
        with self.memory:
            self.clock.start()
            while True:
                x, y = stream.next()
                metrics = method.train_step(x, y)
                if self.steps == 0:
                    self._check_first_step(metrics)
                self.steps += 1
                self.samples += batch_size
                steps, samples = self.steps, self.samples
                loss = metrics.get("loss") if isinstance(metrics, dict) else None
                if loss is not None:
                    loss = torch.as_tensor(loss, device=spec.device)
                    loss_sum = loss_sum + loss.detach().float()
                    loss_count += 1
                    finite = finite & _finite(loss)
                if spec.budget.unit != "seconds" or reads.due(steps):
                    elapsed = self.clock.elapsed()
                    spent = spec.budget.progress(elapsed, samples, steps, len(data.train))
                    reads.read(steps, spent)
                    if time.monotonic() - heartbeat >= HEARTBEAT_SECONDS and spent < 1.0:
                        # a long stretch without checkpoints still says it is alive
                        heartbeat = time.monotonic()
                        self.say(f"{spec.describe()}: {spent * 100:5.1f}% of {spec.budget} "
                                 f"({elapsed:.1f}s, {steps} steps) training")
                if steps % DIVERGENCE_CHECK_EVERY == 0 and not bool(finite):
                    raise Diverged(f"non-finite loss by step {steps}")
                done = spent >= 1.0
                if fractions and (spent >= fractions[0]) and not done:
                    while fractions and spent >= fractions[0]:
                        fractions.pop(0)
                    self.clock.stop()
                    if not bool(finite):
                        raise Diverged(f"non-finite loss by step {steps}")
                    self._checkpoint(steps, samples, loss_sum, loss_count, spent)
                    loss_sum, loss_count = torch.zeros((), device=spec.device), 0
                    heartbeat = time.monotonic()
                    self.clock.start()
                if done:
                    break
            self.clock.stop()
        if not bool(finite):
            raise Diverged(f"non-finite loss by step {self.steps}")
        self._update_counts()
        self._note_merged_checkpoints()
        self._final_evaluation(loss_sum, loss_count)

    def _note_merged_checkpoints(self):
        evaluated, planned = len(self.record["curve"]), self.spec.checkpoints
        if evaluated < planned:  # a step crossed several checkpoint times at once, or the budget ended first
            warning = (f"{evaluated} of {planned} checkpoints were evaluated: several checkpoint times fell "
                       f"within one step or between two reads of the clock (or the budget has fewer steps than "
                       f"checkpoints), and each is evaluated once")
            self.record.setdefault("warnings", []).append(warning)
            self.say(f"note: {self.spec.describe()}: {warning}")

    def _check_first_step(self, metrics):
        fixes = step_metrics_fixes(metrics) or loss_fixes(metrics)
        if fixes:
            raise violation(type(self.method), fixes)
        if "loss" not in metrics:
            warning = f"{describe_class(type(self.method))}: {MISSING_LOSS_WARNING}"
            self.record.setdefault("warnings", []).append(warning)
            self.say(f"warning: {warning}")

    def _warm_up(self, method: Method, batch_size: int):
        """Apply the speed settings and run untimed warm-up steps on the first training images; the
        method's state is restored afterwards, so nothing is learned off the clock."""
        spec, data, record = self.spec, self.data, self.record
        self.speed = apply_speed_settings(method, spec.speed, torch.device(spec.device).type, self.say)
        x, y = data.normalize(data.train.images[:batch_size]), data.train.labels[:batch_size]
        # under --compile the inference path is compiled now too, not during the evaluations
        inference = _warm_up_inference(method, x, compiled=spec.speed.compile != "none")
        timing = warm_up(method, x, y, inference=inference, synchronize=self.clock.synchronize,
                         method_calls=bool(self.speed.captured))
        record["warmup_seconds"] = timing["warmup_seconds"]
        record["compile_seconds"] = timing["first_step_seconds"] if spec.speed.compile != "none" else 0.0

    def _update_counts(self):
        record = self.record
        steps, samples = self.steps, self.samples
        record["steps"], record["samples"] = steps, samples
        record["epochs"] = samples / len(self.data.train)
        record["train_seconds"] = self.clock.elapsed()
        record["samples_per_second"] = samples / max(record["train_seconds"], 1e-9)
        record["seconds_per_epoch"] = len(self.data.train) / max(record["samples_per_second"], 1e-9)

    def _checkpoint(self, steps, samples, loss_sum, loss_count, spent):
        started = time.perf_counter()
        self.memory.pause()  # evaluation batches are not the training's memory
        try:
            accuracy = self._fitting_memory(lambda: evaluate(
                self.method, self.checkpoint_test, self.data.normalize, self.eval_batch,
                seed=self.spec.seed * 1000, setting=self.method.checkpoint_setting()))
        finally:  # an evaluation stopped halfway was still time spent evaluating, and not training's memory
            self.record["eval_seconds"] += time.perf_counter() - started
            self.memory.resume()
        train_seconds = self.clock.elapsed()
        self.record["curve"].append({
            "train_seconds": train_seconds, "steps": steps, "samples": samples,
            "epochs": samples / len(self.data.train), "test_acc": accuracy,
            "test_images": len(self.checkpoint_test),
            "train_loss": (loss_sum / max(loss_count, 1)).item() if loss_count else None,
            **self.method.curve_metrics(),
        })
        self.say(f"{self.spec.describe()}: {min(spent, 1.0) * 100:5.1f}% of {self.spec.budget} "
                 f"({train_seconds:.1f}s, {steps} steps) test acc {accuracy:.2f}%")

    def _fitting_memory(self, evaluation: Callable[[], Any]) -> Any:
        """``evaluation()`` in the evaluation layout; when the device runs out of memory, again with the
        evaluation batches halved (kept for the rest of the trial, and recorded with a warning)."""
        while True:
            try:
                with inference_layout(self.method, torch.device(self.spec.device).type, self.spec.speed):
                    return evaluation()
            except torch.cuda.OutOfMemoryError:
                self.test_features = None
                if self.eval_batch.stochastic == 1 and self.eval_batch.deterministic == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.eval_batch = self.eval_batch.halved()
                self.record["eval_batch_size"] = self.eval_batch.stochastic
                self.record["eval_feature_batch_size"] = self.eval_batch.deterministic
                warning = (f"evaluation ran out of device memory; retried with batches of "
                           f"{self.eval_batch.stochastic} (sampling) and {self.eval_batch.deterministic} images")
                self.record.setdefault("warnings", []).append(warning)
                self.say(f"warning: {self.spec.describe()}: {warning}")

    def _final_evaluation(self, loss_sum, loss_count):
        self.say(f"{self.spec.describe()}: training done ({self.steps} steps); final evaluation on "
                 f"{len(self.data.test)} test images ...")
        started = self.evaluation_said_at = time.perf_counter()
        try:
            with ticking(self._say_pass_progress):  # one batch may outlast the heartbeat (a split on the CPU)
                self._fitting_memory(self._final_accuracies)
        finally:  # an evaluation stopped halfway was still time spent evaluating
            self.record["eval_seconds"] += time.perf_counter() - started
        self.evaluation_pass = None
        self.test_features = None
        spec, data, record = self.spec, self.data, self.record
        record["curve"].append({
            "train_seconds": record["train_seconds"], "steps": record["steps"], "samples": record["samples"],
            "epochs": record["epochs"], "test_acc": record["test_acc"], "test_images": len(data.test),
            "train_loss": (loss_sum / max(loss_count, 1)).item() if loss_count else None,
            **self.method.curve_metrics(),
        })
        self.say(f"{spec.describe()}: done, {record['train_seconds']:.1f}s training, {record['steps']} steps, "
                 f"test acc {record['test_acc']:.2f}%")

    def _final_accuracies(self):
        """Test accuracy over the inference runs, and what else was asked for, into the record."""
        spec, data, record = self.spec, self.data, self.record
        runs = spec.inference_runs if spec.method.stochastic else 1
        self.evaluation_started = time.perf_counter()
        # every test evaluation below shares one pass of the setting-independent part (the backbone)
        self.test_features = split_features(self.method, data.test, data.normalize, self.eval_batch,
                                            self._progress_reporter("test features", len(data.test)))
        test = []
        for run in range(runs):
            what = f"test inference run {run + 1}/{runs}"
            test.append(self._test_accuracy(spec.seed * 1000 + 1 + run, what))
            self._evaluation_progress(f"{what}: {test[-1]:.2f}%")
        record["test_acc_runs"] = test
        record["test_acc"] = float(np.mean(test))
        if spec.train_accuracy:
            train_split = train_accuracy_split(data.train, len(data.test))
            record["train_acc_size"] = len(train_split)
            train_features = split_features(self.method, train_split, data.normalize, self.eval_batch,
                                            self._progress_reporter("train features", len(train_split)))
            train = []
            for run in range(runs):
                what = f"train inference run {run + 1}/{runs}"
                train.append(evaluate(self.method, train_split, data.normalize, self.eval_batch,
                                      seed=spec.seed * 1000 + 501 + run, features=train_features,
                                      progress=self._progress_reporter(what, len(train_split))))
                self._evaluation_progress(f"{what}: {train[-1]:.2f}%")
            del train_features
            record["train_acc_runs"] = train
            record["train_acc"] = float(np.mean(train))
        if self.data.val is not None:
            record["val_acc"] = evaluate(self.method, self.data.val, data.normalize, self.eval_batch,
                                         seed=spec.seed * 1000 + 701,
                                         progress=self._progress_reporter("validation", len(self.data.val)))
        record["diagnostics"] = {name: self._test_accuracy(spec.seed * 1000 + 801, f"diagnostic {name}", setting,
                                                           require_finite=False)
                                 for name, setting in self.method.diagnostic_settings().items()}
        if spec.inference_sweep:
            record["inference_sweep"] = [self._sweep_point(setting, runs) for setting in self.method.sweep_settings()]

    def _evaluation_progress(self, what: str) -> None:
        """A line per inference run once a final evaluation has run for a while (a 1000-step sampler on
        the CPU takes minutes), so a long one is not silent."""
        with self.evaluation_lock:
            now = time.perf_counter()
            if now - self.evaluation_started >= FINAL_PROGRESS_AFTER_SECONDS:
                self.evaluation_said_at = now
                self.say(f"{self.spec.describe()}: final evaluation, {what} ({now - self.evaluation_started:.0f}s "
                         f"so far)")

    def _progress_reporter(self, what: str, images: int) -> ImagesDone:
        """The progress of one pass of the final evaluation: a line with the images done whenever
        :data:`HEARTBEAT_SECONDS` have passed since the evaluation last said anything, after a batch or,
        from a background tick, during one, so that one long inference run is not silent either."""
        self.evaluation_pass = (what, 0, images)

        def report(done: int) -> None:
            self.evaluation_pass = (what, done, images)
            self._say_pass_progress()
        return report

    def _say_pass_progress(self) -> None:
        """The running pass's images done, if the evaluation has said nothing for :data:`HEARTBEAT_SECONDS`
        (called after each batch, and every second by the tick during the final evaluation)."""
        with self.evaluation_lock:
            now = time.perf_counter()
            if self.evaluation_pass is None or now - self.evaluation_said_at < HEARTBEAT_SECONDS:
                return
            what, done, images = self.evaluation_pass
            if done < images:
                self.evaluation_said_at = now
                self.say(f"{self.spec.describe()}: final evaluation, {what}: {done}/{images} images "
                         f"({now - self.evaluation_started:.0f}s so far)")

    def _sweep_point(self, setting: Dict[str, Any], runs: int) -> Dict[str, Any]:
        spec = self.spec
        started = time.perf_counter()
        accuracies = [self._test_accuracy(spec.seed * 1000 + 1 + r, f"sweep {setting} run {r + 1}/{runs}", setting,
                                          require_finite=False)
                      for r in range(runs)]
        return {"setting": setting, "test_acc_runs": accuracies, "test_acc": float(np.mean(accuracies)),
                "eval_seconds": time.perf_counter() - started}

    def _test_accuracy(self, seed: int, what: str, setting: Optional[Dict[str, Any]] = None,
                       require_finite: bool = True) -> float:
        """Accuracy on the test split, from the shared features, saying how far a long pass (``what``) is."""
        return evaluate(self.method, self.data.test, self.data.normalize, self.eval_batch, seed=seed,
                        setting=setting, features=self.test_features, require_finite=require_finite,
                        progress=self._progress_reporter(what, len(self.data.test)))

    def finish(self):
        """Fill in what is known even when the trial stopped early."""
        record = self.record
        self.clock.stop()
        if record["steps"] != self.steps:
            self._update_counts()
        if self.speed is not None:
            record["speed_settings"] = self.speed.record()
        pools = self.speed.update_pool_bytes() if self.speed is not None else 0
        record["peak_memory_bytes"], record["memory_kind"] = with_graph_pools(self.memory.kind,
                                                                              self.memory.peak_bytes, pools)
        if self.method is not None:
            try:
                record["method_metrics"] = self.method.trial_metrics()
            except Exception as error:  # metrics are secondary: never lose the trial over them
                record["method_metrics"] = {"error": f"{type(error).__name__}: {error}"}
            for warning in record["method_metrics"].get("warnings") or []:
                self.say(f"warning: {self.spec.describe()}: {warning}")
