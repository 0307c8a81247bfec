"""``noprop_bench.testing``: every built-in plugin passes the conformance checks, and each kind of
violation fails with its own fix."""

import functools
import importlib.util
import warnings

import pytest
import torch
from torch import nn

from noprop_bench import Dataset, Method, Split
from noprop_bench.executor import Executor, execute_job
from noprop_bench.plugins import load_plugins
from noprop_bench.testing import HostSyncWarning, check_dataset, check_executor, check_method
from noprop_bench_plugins.datasets.imagefolder import ImageFolder
from noprop_bench_plugins.datasets.torchvision_datasets import MNIST
from test_datasets import fake_idx_set, write_idx_gz
from test_imagefolder import write_tree

REGISTRY = load_plugins()
# small settings, so each built-in method is checked in about a second; a key a method lacks is ignored
SMALL = {"blocks": 2, "steps": 4, "eval_steps": 2, "time_dim": 8, "schedule_width": 8}


@pytest.mark.parametrize("name", sorted(REGISTRY.methods))
def test_every_registered_method_passes(name, one_thread):
    cls = REGISTRY.methods[name]
    small = {key: value for key, value in SMALL.items() if key in cls.defaults}
    with warnings.catch_warnings():
        warnings.simplefilter("error", HostSyncWarning)  # no built-in reads anything back in a train step
        check_method(cls, **small)


def test_the_mnist5k_dataset_passes():
    check_dataset(REGISTRY.datasets["mnist5k"])


def test_the_torchvision_family_passes_on_small_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "extra_dirs", (), raising=False)
    write_idx_gz(tmp_path / "MNIST", fake_idx_set())
    check_dataset(MNIST, root=str(tmp_path))


def test_the_imagefolder_dataset_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("NOPROP_BENCH_DATA", str(tmp_path / "cache"))
    write_tree(tmp_path / "tree")
    check_dataset(ImageFolder, argument=str(tmp_path / "tree"))


@pytest.mark.parametrize("options", [{}, {"workers": 2}, {"workers": "0"}], ids=["in-process", "workers=2", "text"])
def test_the_local_executor_passes(options):
    check_executor(REGISTRY.executors["local"], **options)


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed")
def test_the_submitit_executor_passes_on_its_local_cluster():
    check_executor(REGISTRY.executors["submitit"], cluster="local")


# --- methods that break the contract, each in one way -------------------------------------------

class HandWritten(Method):
    """Plain tensors updated by hand, no nn.Parameter: within the contract."""

    name = "hand_written"
    defaults = {"lr": 0.5}

    def __init__(self, task, **params):
        super().__init__(task, **params)
        generator = torch.Generator().manual_seed(task.seed)
        self.weight = (0.01 * torch.randn(task.image_dim, task.num_classes, generator=generator)).to(task.device)

    def train_step(self, x, y):
        probabilities = torch.softmax(x.flatten(1) @ self.weight, dim=1)
        target = nn.functional.one_hot(y, probabilities.shape[1]).float()
        self.weight -= self.params["lr"] * x.flatten(1).T @ (probabilities - target) / len(y)
        loss = -(target * probabilities.clamp_min(1e-12).log()).sum(dim=1).mean()
        return {"loss": loss}

    def predict(self, x):
        return x.flatten(1) @ self.weight


def _failure(cls, **params) -> str:
    with pytest.raises(AssertionError) as failure:
        check_method(cls, **params)
    return str(failure.value)


def test_plain_tensors_updated_by_hand_pass():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_method(HandWritten)


def test_a_skipped_super_init_is_named_with_its_fix():
    class NoSuper(HandWritten):
        name = "no_super"

        def __init__(self, task, **params):
            self.layer = nn.Linear(2, 2)

    message = _failure(NoSuper)
    assert "class test_conformance_kit." in message and "NoSuper" in message
    assert "call super().__init__(task, **params) first in __init__" in message


def test_speed_hook_targets_must_be_callable_attributes():
    class Misspelt(HandWritten):
        name = "misspelt"

        def compile_targets(self):
            return ["train_step", "weight", "model.logits"]

        def capture_targets(self):
            return "predict"

    message = _failure(Misspelt)
    assert "compile_targets() names 'weight', 'model.logits', which the method has no callable attribute of" in message
    assert "capture_targets() must return a list of attribute names such as ['train_step'], not 'predict'" in message


def test_params_that_do_not_resolve_or_serialise():
    assert "must resolve against defaults" in _failure(HandWritten, momentum=0.9)

    class Unserialisable(HandWritten):
        name = "unserialisable"
        defaults = {"lr": 0.5, "shape": {1, 2}}

    assert "resolved parameters must be plain JSON values" in _failure(Unserialisable)


def test_train_step_results_loss_and_host_syncs():
    class PythonNumbers(HandWritten):
        name = "python_numbers"

        def train_step(self, x, y):
            return {"loss": float(super().train_step(x, y)["loss"])}

    class NoLoss(HandWritten):
        name = "no_loss"

        def train_step(self, x, y):
            super().train_step(x, y)
            return {"accuracy": torch.tensor(1.0)}

    class Syncs(HandWritten):
        name = "syncs"

        def train_step(self, x, y):
            metrics = super().train_step(x, y)
            if metrics["loss"].item() > 1e9:
                raise RuntimeError
            return metrics

    with pytest.warns(HostSyncWarning, match=r"Tensor.__float__\(\)"):  # float(loss) waits for the device
        assert "train_step must return tensors (e.g. loss.detach(), not loss.item())" in _failure(PythonNumbers)
    assert "return the training loss as metrics['loss']" in _failure(NoLoss)
    with pytest.warns(HostSyncWarning, match=r"train_step forces a host synchronisation \(1x\): Tensor.item\(\)"):
        check_method(Syncs)


def test_predict_shape_and_determinism():
    class WrongShape(HandWritten):
        name = "wrong_shape"

        def predict(self, x):
            return super().predict(x).argmax(dim=1)

    class SecretlyStochastic(HandWritten):
        name = "secretly_stochastic"

        def predict(self, x):
            return super().predict(x) + torch.randn(len(x), self.task.num_classes)

    class NotStochastic(HandWritten):
        name = "not_stochastic"
        stochastic = True

    class UsesNumpyRandomness(HandWritten):
        name = "numpy_randomness"
        stochastic = True

        def predict(self, x):
            import numpy as np
            return super().predict(x) + torch.from_numpy(np.random.randn(len(x), self.task.num_classes)).float()

    class ReadsASeedArgument(HandWritten):
        name = "reads_a_seed_argument"

        def predict(self, x, seed):
            return super().predict(x)

    message = _failure(ReadsASeedArgument)  # named when built, not a TypeError from the harness's first call
    assert "predict must take (x) (def predict(self, x)), not (x, seed)" in message
    message = _failure(WrongShape)  # class indices: one fix that says so, not a shape and a dtype complaint
    assert ("predict must return floating logits of shape [B, num_classes] = [8, 3], not class indices (shape [8], "
            "dtype torch.int64): return the scores before argmax") in message
    assert "not dtype" not in message
    message = _failure(SecretlyStochastic)
    assert "set stochastic = True" in message
    assert "depend on the other images in its batch" not in message  # the draw, not a second cause
    assert "set stochastic = False" in _failure(NotStochastic)
    assert "draw randomness from torch's generator" in _failure(UsesNumpyRandomness)


def test_signatures_are_judged_as_the_harness_calls_them():
    def with_steps(function):  # a decorator that supplies an argument: callers pass x alone
        @functools.wraps(function)
        def wrapper(self, x):
            return function(self, x, steps=3)
        return wrapper

    class Decorated(HandWritten):
        name = "decorated"

        @with_steps
        def predict(self, x, steps):
            return super().predict(x)

    class NoSettings(HandWritten):
        name = "no_settings"

        def checkpoint_setting(self):
            return {"steps": 2}

    check_method(Decorated)
    assert ("predict must take (x, steps=...) (def predict(self, x, **setting)), not (x)"
            in _failure(NoSettings))


def test_features_must_reproduce_predict():
    class HalfSplit(HandWritten):
        name = "half_split"

        def features(self, x):
            return x.flatten(1)

    class BadSplit(HalfSplit):
        name = "bad_split"

        def predict_from_features(self, features):
            return features @ self.weight + 1.0

    assert "override both features and predict_from_features, or neither" in _failure(HalfSplit)
    assert "predict_from_features(features(x)) must equal predict(x)" in _failure(BadSplit)


def test_input_modified_in_place():
    class Normalises(HandWritten):
        name = "normalises_in_place"

        def train_step(self, x, y):
            x -= x.mean()
            return super().train_step(x, y)

    class NormalisesAtPrediction(HandWritten):
        name = "normalises_at_prediction"

        def predict(self, x):
            x -= x.mean()
            return super().predict(x)

    class TakesNoLabels(HandWritten):
        name = "takes_no_labels"

        def train_step(self, x):
            return super().train_step(x, torch.zeros(len(x), dtype=torch.long))

    message = _failure(Normalises)  # one fix: the changed x is not the other instance's state
    assert message.count("\n  - ") == 1 and "never modify the input batch in place" in message, message
    message = _failure(NormalisesAtPrediction)  # one fix: the rest would be the mutation's consequences
    assert message.count("\n  - ") == 1 and "never modify the input batch in place" in message, message
    assert "train_step must take (x, y) (def train_step(self, x, y)), not (x)" in _failure(TakesNoLabels)


SHARED_WEIGHT = torch.zeros(256, 3)


def test_instances_share_no_state():
    class ModuleLevel(HandWritten):
        name = "module_level"

        def __init__(self, task, **params):
            super().__init__(task, **params)
            self.weight = SHARED_WEIGHT

    class MutatesDefaults(HandWritten):
        name = "mutates_defaults"
        defaults = {"lr": 0.5, "history": []}

        def train_step(self, x, y):
            self.defaults["history"].append(1)
            return super().train_step(x, y)

    class ThroughTheClass(HandWritten):  # held by no instance: found by what the other instance predicts
        name = "through_the_class"
        offset = torch.zeros(3)

        def train_step(self, x, y):
            type(self).offset += 1.0
            return super().train_step(x, y)

        def predict(self, x):
            return super().predict(x) + type(self).offset

    class ThroughAModuleGlobal(HandWritten):
        name = "through_a_module_global"

        def train_step(self, x, y):
            SHARED_WEIGHT[0] += 1.0
            return super().train_step(x, y)

        def predict(self, x):
            return super().predict(x) + x.flatten(1) @ SHARED_WEIGHT

    for cls in (ThroughTheClass, ThroughAModuleGlobal):
        assert "two instances must share no state: training one changed the other" in _failure(cls), cls
    message = _failure(ModuleLevel)
    assert "two instances must share no state: create tensors in __init__" in message
    assert "training one changed the other" in message
    assert "never modify the class's defaults" in _failure(MutatesDefaults)


# --- datasets and executors that break the contract ---------------------------------------------

def test_dataset_violations_are_each_named():
    class Sloppy(Dataset):
        name = "sloppy"
        classes = ("a", "b")
        image_shape = (1, 4, 4)
        mean, std = (0.5, 0.5), (0.2,)

        def load(self, split):
            count = 6 if split == "train" else 3
            images = torch.zeros(count, 1, 4, 4 if split == "train" else 5, dtype=torch.uint8)
            return Split(images, torch.arange(count, dtype=torch.int32))

    with pytest.raises(AssertionError) as failure:
        check_dataset(Sloppy)
    message = str(failure.value)
    assert "train labels must be int64 [N] (torch.long), not torch.int32" in message
    assert "train labels must lie in 0..1 (one per name in classes); found 0..5" in message
    assert "train and test images must have the same shape [C, H, W]" in message
    assert "mean and std need one value per channel (1)" in message


def test_a_zero_std_and_a_single_class_are_named():
    class Degenerate(Dataset):
        name, classes, image_shape = "degenerate", ("only",), (1, 4, 4)
        mean, std = (0.5,), (0.0,)

        def load(self, split):
            return Split(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))

    with pytest.raises(AssertionError) as failure:
        check_dataset(Degenerate)
    message = str(failure.value)
    assert "std must hold positive numbers (normalisation divides by it)" in message and "got (0.0,)" in message
    assert "classes must name two classes or more (with one, every prediction is right); got ('only',)" in message


def test_a_parameter_defaulting_to_none_is_named():
    class Untyped(HandWritten):
        name, defaults = "untyped", {"lr": 0.5, "hidden": None}

    expected = ("give hidden a default of the type it takes (0, 0.0, '', False), not None: a value given as "
                "untyped[hidden=...] is converted to its default's type, and stays a string after None")
    assert expected in _failure(Untyped)


def test_channels_last_images_are_told_to_be_permuted_not_to_change_image_shape():
    class ChannelsLast(Dataset):
        name, classes, image_shape = "channels_last", ("a", "b"), (1, 4, 4)

        def load(self, split):
            return Split(torch.zeros(4, 4, 4, 1, dtype=torch.uint8), torch.arange(4) % 2)

    with pytest.raises(AssertionError) as failure:
        check_dataset(ChannelsLast)
    message = str(failure.value)
    assert "the images look channels-last [N, H, W, C] ([4, 4, 1] per image): store images.permute(0, 3, 1, 2)" \
        in message
    assert "image_shape must be" not in message and "one value per channel" not in message


def test_an_executor_that_loses_a_record_is_named():
    class Forgetful(Executor):
        name = "forgetful"

        def run(self, jobs, deliver, say):
            for job in jobs[1:]:
                deliver(job, execute_job(job, progress=say))

    with pytest.raises(AssertionError, match="run\\(\\) must call deliver\\(job, record\\) exactly once per job"):
        check_executor(Forgetful)


def test_an_executor_that_swallows_ctrl_c_is_named():
    class Deaf(Executor):
        name = "deaf"

        def run(self, jobs, deliver, say):
            for job in jobs:
                try:
                    deliver(job, execute_job(job, progress=say))
                except KeyboardInterrupt:
                    pass

    with pytest.raises(AssertionError, match="on Ctrl-C .* run\\(\\) must stop its jobs, deliver each one that began "
                                             "and is not yet delivered .* and raise it again; it returned"):
        check_executor(Deaf)
    check_executor(Deaf, interrupt=False)  # the rest of the contract it keeps


def test_an_executor_that_drops_a_begun_job_at_ctrl_c_is_named():
    class Hasty(Executor):
        """Begins every trial before delivering any, and at Ctrl-C re-raises without delivering the rest."""
        name = "hasty"

        def run(self, jobs, deliver, say):
            records = [execute_job(job, progress=say) for job in jobs]
            for job, record in zip(jobs, records):
                deliver(job, record)

    with pytest.raises(AssertionError, match="after Ctrl-C, run\\(\\) must deliver each job that began .* these "
                                             "began and were not delivered: \\['"):
        check_executor(Hasty)



def test_evaluation_left_in_training_mode_is_named_with_the_eval_mode_fix():
    """The forgotten eval mode a plugin author writes: a BatchNorm the harness's eval() cannot reach (kept in
    a Python list), a predict that switches training back on, dropout left on in predict."""
    class _Normed(HandWritten):
        def __init__(self, task, **params):
            super().__init__(task, **params)
            self.norm = nn.BatchNorm1d(task.num_classes).to(task.device)

        def predict(self, x):
            return self.norm(super().predict(x))

    class ListedNorm(_Normed):
        name = "listed_norm"

        def __init__(self, task, **params):
            super().__init__(task, **params)
            self.listed = [self.norm]  # a plain list: method.eval() does not reach it
            del self.norm

        def predict(self, x):
            return self.listed[0](HandWritten.predict(self, x))

    class TrainsInPredict(_Normed):
        name = "trains_in_predict"

        def predict(self, x):
            self.train()
            return super().predict(x)

    class DropoutInPredict(HandWritten):
        name = "dropout_in_predict"

        def predict(self, x):
            return nn.functional.dropout(super().predict(x), 0.5)

    assert "depend on the other images in its batch" in _failure(ListedNorm)
    trains = _failure(TrainsInPredict)
    assert "predict changed the method's state" in trains and "never call train() in predict" in trains
    assert "pass training=self.training to F.dropout" in _failure(DropoutInPredict)
    check_method(_Normed)  # registered and in eval mode: within the contract


def test_float_images_are_a_finding_with_the_conversion_not_a_bare_error():
    class FloatImages(Dataset):
        name, classes, image_shape, mean, std = "float_images", ("a", "b"), (1, 4, 4), (0.5,), (0.2,)

        def load(self, split):
            return Split(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))

    with pytest.raises(AssertionError) as failure:
        check_dataset(FloatImages)
    message = str(failure.value)
    assert "FloatImages breaks the dataset contract" in message
    assert ("load('train'): images must be a uint8 tensor [N, C, H, W], not torch.float32: pass "
            "images.mul(255).round().to(torch.uint8) for values in 0..1") in message
