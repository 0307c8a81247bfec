"""Methods that break the contract in the ways a new plugin author might, for the host's checks."""

import torch
from torch import nn

from noprop_bench import Method, UsageError, hookimpl


class _Pixels(Method):
    defaults = {"lr": 0.05}

    def __init__(self, task, **params):
        super().__init__(task, **params)
        self.layer = nn.Linear(task.image_dim, task.num_classes)

    def train_step(self, x, y):
        loss = nn.functional.cross_entropy(self.layer(x.flatten(1)), y)
        self.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter -= self.params["lr"] * parameter.grad
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.layer(x.flatten(1))


class NoSuperInit(_Pixels):
    name, label = "no_super_init", "NoSuperInit"

    def __init__(self, task, **params):
        self.layer = nn.Linear(task.image_dim, task.num_classes)  # before super().__init__: torch refuses


class FloatLoss(_Pixels):
    name, label = "float_loss", "FloatLoss"

    def train_step(self, x, y):
        return {"loss": super().train_step(x, y)["loss"].item()}


class WrongShape(_Pixels):
    name, label = "wrong_shape", "WrongShape"

    def predict(self, x):
        return super().predict(x)[:, :2]


class NaNPredictions(_Pixels):
    name, label = "nan_predictions", "NaNPredictions"

    def predict(self, x):
        return super().predict(x) * float("nan")


class NaNDiagnostic(_Pixels):
    """Sound predictions, except in an optional diagnostic setting."""

    name, label = "nan_diagnostic", "NaNDiagnostic"

    def predict(self, x, broken=False):
        return super().predict(x) * (float("nan") if broken else 1.0)

    def diagnostic_settings(self):
        return {"broken": {"broken": True}}


class NoLoss(_Pixels):
    name, label = "no_loss", "NoLoss"

    def train_step(self, x, y):
        super().train_step(x, y)
        return {}


class RefusesSeed(_Pixels):
    """A bad parameter combination found only once the task is known: seed 1 is refused."""

    name, label = "refuses_seed", "RefusesSeed"

    def __init__(self, task, **params):
        super().__init__(task, **params)
        if task.seed == 1:
            raise UsageError("refuses_seed cannot train seed 1")


class MisspeltTarget(_Pixels):
    """Names a compile target it does not have: found when it is built, under any speed setting."""

    name, label = "misspelt_target", "MisspeltTarget"

    def compile_targets(self):
        return ["haed", "train_step"]


class ItemInStep(_Pixels):
    """Reads a number back in its train step: under --compile, torch.compile breaks its graph there."""

    name, label = "item_in_step", "ItemInStep"

    def compile_targets(self):
        return ["train_step"]

    def train_step(self, x, y):
        metrics = super().train_step(x, y)
        if metrics["loss"].item() > 1e6:  # never true; the read alone splits the compiled code
            metrics["loss"] = metrics["loss"] * 0
        return metrics


@hookimpl
def register_methods(register):
    for cls in (NoSuperInit, FloatLoss, WrongShape, NaNPredictions, NaNDiagnostic, NoLoss, RefusesSeed,
                MisspeltTarget, ItemInStep):
        register(cls)
