"""The paper's block architectures exactly: per-block parameter counts of the reference's Table 5 with
``noprop_cnn`` (unpadded 3x3 convolutions), and other backbones keeping features -> FC(256) -> BN."""

import pytest
import torch
from torch import nn

from noprop_bench.backbones import create_backbone, feature_dim
from noprop_bench.datasets import Normalizer
from noprop_bench.task import Task
from noprop_bench_plugins.methods.noprop_ct import NoPropCT
from noprop_bench_plugins.methods.noprop_dt import NoPropDT

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
# (image shape, classes, embedding) -> (DT block, CT model): Table 5 of the paper, recounted exactly
PAPER_COUNTS = {
    (MNIST, 10, "one-hot"): (919_946, 867_722),
    (MNIST, 10, "learned"): (922_506, 870_282),
    (MNIST, 10, "prototype"): (1_401_738, 1_482_122),
    (CIFAR, 10, "one-hot"): (1_215_434, 1_163_210),
    (CIFAR, 10, "learned"): (1_217_994, 1_165_770),
    (CIFAR, 10, "prototype"): (1_992_714, 2_073_098),
    (CIFAR, 100, "one-hot"): (1_250_084, 1_197_860),
    (CIFAR, 100, "learned"): (1_229_604, 1_177_380),
    (CIFAR, 100, "prototype"): (2_004_324, 2_084_708),
}


def paper_cnn_task(shape, classes, backbone="noprop_cnn"):
    """A task with two random training images per class (enough for prototype medoids)."""
    def make_backbone():
        return create_backbone(backbone, in_chans=shape[0], image_size=shape[1])

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * classes, *shape), dtype=torch.uint8, generator=generator)
    return Task(classes, shape, torch.device("cpu"), backbone, make_backbone, feature_dim(make_backbone(), shape),
                Normalizer((0.5,) * shape[0], (0.25,) * shape[0], "cpu"), images, torch.arange(2 * classes) % classes)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape,classes,embedding", list(PAPER_COUNTS))
def test_one_block_has_the_papers_parameter_count(shape, classes, embedding):
    task = paper_cnn_task(shape, classes)
    dt_count, ct_count = PAPER_COUNTS[shape, classes, embedding]
    dt = NoPropDT(task, **NoPropDT.resolve_params({"embedding": embedding, "dim": 20, "blocks": 2}))
    ct = NoPropCT(task, **NoPropCT.resolve_params({"embedding": embedding, "dim": 20}))
    assert [count(block) for block in dt.blocks] == [dt_count, dt_count]
    assert dt.trial_metrics()["parameters_per_block"] == dt_count
    assert count(ct.model) == ct_count


def test_dt_image_path_is_conv_stack_fc_bn_with_the_paper_cnn():
    block = NoPropDT(paper_cnn_task(MNIST, 10), **NoPropDT.resolve_params({"blocks": 1})).blocks[0]
    layers = [m for m in nn.Sequential(block.backbone.fc, block.image_fc).modules()
              if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.ReLU))]
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d], "FC(256) -> BN, no ReLU, no second FC"


def test_other_backbones_keep_features_then_fc_bn():
    task = paper_cnn_task(CIFAR, 10, backbone="resnet18")
    block = NoPropDT(task, **NoPropDT.resolve_params({"blocks": 1})).blocks[0]
    assert [type(m) for m in block.image_fc] == [nn.Linear, nn.BatchNorm1d]
    assert block.image_fc[0].in_features == task.backbone_features == 512
