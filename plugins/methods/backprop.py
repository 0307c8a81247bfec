"""A plain back-propagation reference: the run's backbone plus a linear classifier, trained end to end.

Not the paper's Backprop rows: those are ``backprop_dt`` (NoProp-DT's blocks trained end to end).
"""

import torch
from torch import nn

from noprop_bench import Method, hookimpl
from noprop_bench_plugins.parts.optim import optimizer_options


class Backprop(Method):
    """Backbone features -> linear layer -> logits; cross-entropy; AdamW (lr 1e-3, wd 1e-3).

    Labelled "Backprop with linear head" so it is never read as the paper's Backprop (one-hot) row; it has
    no label embedding, so its row label carries none.
    """

    name = "backprop"
    label = "Backprop with linear head"
    family = "discrete-time"
    defaults = {"lr": 1e-3, "weight_decay": 1e-3}

    def __init__(self, task, **params):
        super().__init__(task, **params)
        self.backbone = task.make_backbone()
        self.classifier = nn.Linear(task.backbone_features, task.num_classes)
        self.to(task.device)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=self.params["lr"],
                                           weight_decay=self.params["weight_decay"], **optimizer_options(task.device))

    def forward(self, x):
        return self.classifier(self.backbone(x))

    def train_step(self, x, y):
        loss = nn.functional.cross_entropy(self(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x):
        return self(x)

    def capture_step_targets(self):
        return ["train_step"]

    @classmethod
    def row_label(cls, params):
        return cls.label


@hookimpl
def register_methods(register):
    register(Backprop)
