"""Small plugins for the tests: a tiny in-memory dataset and methods that misbehave on purpose."""

import time

import torch

from noprop_bench import Dataset, Split, hookimpl
from noprop_bench.testing.tiny import ConformanceMethod

FINISHED = []  # records seen by the trial_finished hook


class Tiny(Dataset):
    """Four classes of 16x16 grayscale images, each class a distinct brightness pattern plus noise."""

    name = "tiny"
    label = "Tiny"
    classes = ("a", "b", "c", "d")
    image_shape = (1, 16, 16)
    mean, std = (0.5,), (0.25,)
    default_backbone = "noprop_cnn"

    def load(self, split):
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 256 if split == "train" else 64
        labels = torch.arange(n) % 4
        base = torch.zeros(n, 1, 16, 16)
        for c in range(4):
            base[labels == c, :, (c * 4):(c * 4 + 4), :] = 200.0
        noise = torch.randint(0, 50, (n, 1, 16, 16), generator=generator).float()
        return Split((base + noise).clamp(0, 255).to(torch.uint8), labels)


class Linear(ConformanceMethod):
    """A linear classifier on raw pixels: small and deterministic."""

    name = "linear"
    label = "Linear"
    defaults = {"lr": 0.05, "embedding": "one-hot"}


class Explode(Linear):
    name = "explode"
    label = "Explode"

    def train_step(self, x, y):
        raise RuntimeError("boom in train_step")


class DeepError(Linear):
    """Fails inside torch, many frames below its own line (a shape mistake)."""

    name = "deep_error"
    label = "DeepError"

    def train_step(self, x, y):
        return self._project(x)

    def _project(self, x):
        return torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(3, 2))(x)  # the mistake


class NaNLoss(Linear):
    name = "nan_loss"
    label = "NaN"

    def train_step(self, x, y):
        super().train_step(x, y)
        return {"loss": torch.tensor(float("nan"))}


class Sleepy(Linear):
    """Trains in 10 ms steps, evaluates very slowly: the clock must not charge evaluation."""

    name = "sleepy"
    label = "Sleepy"
    defaults = {"lr": 0.05, "predict_sleep": 0.3, "step_sleep": 0.01}

    def train_step(self, x, y):
        time.sleep(self.params["step_sleep"])
        return super().train_step(x, y)

    def predict(self, x):
        time.sleep(self.params["predict_sleep"])
        return super().predict(x)


class Steady(Sleepy):
    """A reference method with the same step time as Sleepy, for relative-throughput checks."""

    name = "steady"
    label = "Steady"


class Interrupt(Linear):
    """Simulates Ctrl-C during training on seed 1."""

    name = "interrupt"
    label = "Interrupt"

    def train_step(self, x, y):
        if self.task.seed == 1:
            raise KeyboardInterrupt
        return super().train_step(x, y)


class Noisy(Linear):
    """A stochastic method: predictions carry random noise, so repeated evaluations differ."""

    name = "noisy"
    label = "Noisy"
    family = "continuous-time"
    stochastic = True

    def predict(self, x):
        logits = super().predict(x)
        return logits + 3 * torch.randn_like(logits)


class SlowStart(Linear):
    """Its first train step in a process takes 1 s (as lazy initialisation or compilation would)."""

    name = "slow_start"
    label = "SlowStart"
    started = False

    def train_step(self, x, y):
        if not SlowStart.started:
            SlowStart.started = True
            time.sleep(1.0)
        return super().train_step(x, y)


class OutOfMemory(Linear):
    """Runs out of (CUDA) memory when it predicts on more than 16 images at once."""

    name = "out_of_memory"
    label = "OutOfMemory"

    def predict(self, x):
        if len(x) > 16:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory predicting {len(x)} images")
        return super().predict(x)


class OutOfMemoryNotesModes(OutOfMemory):
    """:class:`OutOfMemory` that notes whether each train step ran in training mode."""

    name = "out_of_memory_notes_modes"
    label = "OutOfMemoryNotesModes"
    modes = []

    def train_step(self, x, y):
        self.modes.append(self.training)
        return super().train_step(x, y)


@hookimpl
def register_methods(register):
    for cls in (Linear, Explode, DeepError, NaNLoss, Sleepy, Steady, Interrupt, Noisy, SlowStart, OutOfMemory,
                OutOfMemoryNotesModes):
        register(cls)


@hookimpl
def register_datasets(register):
    register(Tiny)


@hookimpl
def trial_finished(record, out_dir):
    FINISHED.append((record["trial_id"], out_dir))
    if record["params"].get("lr") == 0.123:
        raise RuntimeError("observer broke")
