import subprocess
import sys

import pytest
import torch
from torch import nn

from noprop_bench.backbones import create_backbone, feature_dim, timm_with_paper_cnn
from noprop_bench.datasets import BatchStream, Normalizer, Split, crop_flip
from noprop_bench.run.runner import hold_out
from noprop_bench_plugins.datasets.mnist5k import MNIST5k


def test_paper_cnn_is_a_timm_model_with_the_papers_parameter_count():
    timm = timm_with_paper_cnn()
    assert "noprop_cnn" in timm.list_models()
    # the image path of the paper's Figure 6 under unpadded 3x3 convolutions (reference section 5.3)
    mnist = timm.create_model("noprop_cnn", num_classes=0, in_chans=1, img_size=28)
    cifar = timm.create_model("noprop_cnn", num_classes=0, in_chans=3, img_size=32)
    assert sum(p.numel() for p in mnist.parameters()) == 320 + 18496 + 73856 + (128 * 4 * 4 * 256 + 256)
    assert sum(p.numel() for p in cifar.parameters()) == 896 + 18496 + 73856 + (128 * 5 * 5 * 256 + 256)
    assert mnist(torch.zeros(3, 1, 28, 28)).shape == (3, 256)


@pytest.mark.parametrize("in_chans, image_size", [(1, 28), (3, 32), (3, (32, 48))])
def test_the_paper_cnn_built_without_timm_is_the_one_timm_builds(in_chans, image_size):
    """``create_backbone("noprop_cnn")`` skips timm (it takes seconds to import); same seed, same network."""
    torch.manual_seed(0)
    direct = create_backbone("noprop_cnn", in_chans=in_chans, image_size=image_size)
    torch.manual_seed(0)
    through_timm = timm_with_paper_cnn().create_model("noprop_cnn", pretrained=False, num_classes=0,
                                                      in_chans=in_chans, img_size=image_size)
    assert type(direct) is type(through_timm) and repr(direct) == repr(through_timm)
    theirs = through_timm.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in direct.state_dict().items())
    assert direct.state_dict().keys() == theirs.keys()


def test_the_command_line_and_the_paper_cnn_import_neither_timm_nor_torchvision():
    """Both take seconds to import (with torch's compiler stack): ``--help``, ``--list``, a report and every
    worker of a run on the default backbone would pay for them; a resnet backbone still loads timm. What a
    worker imports to load the plugins leaves out pandas too (and pyarrow's allocator thread with it)."""
    script = """
import sys
from noprop_bench.backbones import create_backbone
from noprop_bench.executor import execute_job
from noprop_bench.plugins import load_plugins
registry = load_plugins()
create_backbone("noprop_cnn", in_chans=1, image_size=28)
heavy = ("timm", "torchvision", "torchdiffeq", "torch._dynamo", "pandas", "pyarrow")
print(sorted(name for name in heavy if name in sys.modules))
from noprop_bench.cli import build_parser
build_parser()
print(sorted(name for name in heavy[:4] if name in sys.modules))
create_backbone("resnet18", in_chans=1, image_size=28)
print(sorted(name for name in heavy if name in sys.modules))
"""
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    assert lines[:2] == ["[]", "[]"] and "'timm'" in lines[2] and "'torchvision'" in lines[2]


def test_trials_record_the_versions_the_libraries_state_without_importing_them():
    import pluggy
    import timm
    import torchvision

    from noprop_bench.run.store import environment

    found = environment(torch.device("cpu"))
    assert (found["torchvision"], found["timm"], found["pluggy"]) == (torchvision.__version__, timm.__version__,
                                                                     pluggy.__version__)


def test_backbones_take_images_that_are_not_square():
    """An image folder of 32x48 images: the paper CNN's FC layer is sized from both sides."""
    from noprop_bench.run.runner import backbone_width

    model = create_backbone("noprop_cnn", in_chans=3, image_size=(32, 48))
    assert model.fc[0].in_features == 128 * 5 * 9
    assert model(torch.zeros(2, 3, 32, 48)).shape == (2, 256)
    assert backbone_width("noprop_cnn", (3, 32, 48)) == 256 and backbone_width("resnet18", (3, 48, 32)) == 512


def test_small_images_get_a_stride_one_stem_without_max_pool():
    model = create_backbone("resnet18", in_chans=1, image_size=28)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert feature_dim(model, (1, 28, 28)) == 512
    large = create_backbone("resnet18", in_chans=3, image_size=224)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)


def test_mnist5k_is_a_fixed_stratified_split_of_real_digits():
    dataset = MNIST5k()
    train, test = dataset.load("train"), dataset.load("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    # real digits: mean brightness of MNIST is about 0.13 of full scale
    assert 0.10 < train.images.float().mean().item() / 255 < 0.16
    rows = lambda split: {bytes(image.numpy()) for image in split.images}  # noqa: E731
    assert not rows(train) & rows(test)
    assert torch.equal(MNIST5k().load("test").labels, test.labels)


def _split(n=64):
    images = torch.randint(1, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n)  # every image distinct
    return Split(images, torch.arange(n) % 4)


def test_batch_stream_is_seeded_and_covers_each_epoch_once():
    split = _split()
    normalize = Normalizer((0.5,) * 3, (0.5,) * 3, "cpu")
    first = BatchStream(split, 16, normalize, "none", seed=3)
    second = BatchStream(split, 16, normalize, "none", seed=3)
    seen = []
    for _ in range(4):
        (x1, y1), (x2, y2) = first.next(), second.next()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        seen.append(x1)
    epoch = torch.cat(seen)
    assert epoch.shape == (64, 3, 8, 8)
    assert len({bytes(row.numpy()) for row in epoch}) == 64  # every image exactly once
    first.next()
    assert first.epoch == 1


def _crop_flip_by_pixel(images, generator, padding=4):
    """The obvious per-pixel definition, to check the fast version against."""
    n, c, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand((n,), generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("shape", [(32, 3, 8, 8), (16, 1, 28, 28)])
def test_crop_flip_equals_the_per_pixel_definition(shape):
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    fast = crop_flip(images, torch.Generator().manual_seed(0))
    slow = _crop_flip_by_pixel(images, torch.Generator().manual_seed(0))
    assert fast.dtype == torch.uint8 and torch.equal(fast, slow)
    assert not torch.equal(fast, images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_crop_flip_never_waits_for_the_device_and_draws_what_the_cpu_draws():
    images = torch.randint(0, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    on_device = images.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast = crop_flip(on_device, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(fast.cpu(), crop_flip(images, torch.Generator().manual_seed(0)))


def test_hold_out_is_stratified_and_disjoint():
    split = _split(80)
    train, val = hold_out(split, 0.25, seed=0)
    assert len(train) == 60 and len(val) == 20
    assert torch.bincount(val.labels).tolist() == [5] * 4
    # every image is distinct (its first pixel is its index), so the two parts share none and miss none
    train_ids, val_ids = set(train.images[:, 0, 0, 0].tolist()), set(val.images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(80))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_clock_synchronises_before_reading():
    from noprop_bench.run.budget import TrainingClock
    clock = TrainingClock("cuda")
    a = torch.randn(4096, 4096, device="cuda")
    clock.start()
    for _ in range(20):
        a = a @ a
        a = a / a.norm()
    clock.stop()
    # without a synchronise the clock would read only the kernel launches, microseconds
    assert clock.elapsed() > 1e-3
