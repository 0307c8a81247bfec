"""Choices the paper leaves open, as documented parameters: the schedule's weight decay, whole-class medoids."""

import pytest
import torch
from torch import nn

from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_bench_plugins.parts.noprop import class_medoids
from noprop_helpers import first_batch, mnist_shaped_task


def make_ct(**params):
    task = mnist_shaped_task(make_backbone=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU()),
                             features=16)
    torch.manual_seed(0)
    return NoPropCT(task, **NoPropCT.resolve_params(params))


def brute_force_medoid(group):
    distances = torch.cdist(group, group)
    n = len(group)
    others = distances[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    return group[others.median(dim=1).values.argmin()]


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_medoids_use_the_whole_class_whatever_the_chunk(chunk):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(300, 12, generator=generator)
    labels = torch.arange(300) % 3
    medoids = class_medoids(images, labels, 3, chunk=chunk)
    for c in range(3):
        torch.testing.assert_close(medoids[c], brute_force_medoid(images[labels == c]))


def test_schedule_has_its_own_parameter_group_without_decay_by_default():
    method = make_ct(weight_decay=0.01)
    groups = method.optimizer.param_groups
    schedule = {id(p) for p in method.schedule.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert {id(p) for p in groups[1]["params"]} == schedule
    assert not schedule & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(method.parameters()))


def test_schedule_weight_decay_pulls_the_schedule_when_asked():
    """With a zero gradient on the schedule, only decay can move it: it does with the parameter, not without."""
    moved = {}
    for decay in (0.0, 0.5):
        method = make_ct(schedule_weight_decay=decay)
        before = method.schedule.gamma0.detach().clone()
        x, y = first_batch(method.task, 8)
        method.optimizer.zero_grad()
        method.losses(x, y)["loss"].mul(0).backward()  # zero gradients everywhere: Adam moves by decay alone
        method.optimizer.step()
        moved[decay] = (method.schedule.gamma0.detach() - before).abs().item()
    assert moved[0.0] == 0.0 and moved[0.5] > 0
