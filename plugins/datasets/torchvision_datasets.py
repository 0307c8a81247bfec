"""``mnist``, ``fashion_mnist``, ``cifar10`` and ``cifar100`` through torchvision's dataset classes.

Files are read from the data root (``--data-root``, ``$NOPROP_BENCH_DATA`` or a per-user cache) in
torchvision's layout, and downloaded there when they are missing and downloads are allowed. Before
downloading, copies already on the machine are used: gzipped IDX files in the dataset's own folder
(``MNIST/`` or ``FashionMNIST/`` in the data root; never loose in the root, where MNIST's and
Fashion-MNIST's files, which share their names, could be taken for each other) and, for Fashion-MNIST,
Debian's ``dataset-fashion-mnist`` package; a CIFAR archive in the data root is checked and extracted. Torchvision's checksums guard the CIFAR files; IDX files are checked
against the sizes their headers declare.
"""

import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from noprop_bench import Dataset, Split, UsageError, hookimpl
from noprop_bench.data_root import ENV_VAR, data_root, publish

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal
shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())

# What torchvision raises when files are missing, corrupt or cannot be downloaded (URLError is an OSError).
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AssertionError)


class TorchvisionClass:
    """A torchvision dataset class, named here and imported on first use: importing torchvision takes seconds
    (it loads torch's compiler stack), which every run would pay for merely listing these datasets."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance, owner):
        import torchvision.datasets
        return getattr(torchvision.datasets, self.name)


class TorchvisionDataset(Dataset):
    """Shared loading and error reporting; subclasses say where the files live and what they are."""

    source = None  # the torchvision dataset class
    how_to_get = ""  # an offline way to get the files, for the error message
    files_note = ""  # what else is accepted in place of the expected files

    def load(self, split: str) -> Split:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}")
        root = data_root(self.root)
        self.prepare(root)
        try:
            loaded = self.source(str(root), train=split == "train", download=self.download)
        except _LOAD_ERRORS as error:
            raise self.explain(root, error) from None
        images = self.images_of(loaded.data)
        labels = torch.as_tensor(np.asarray(loaded.targets), dtype=torch.long)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise UsageError(f"{self.name}: labels outside 0..{self.num_classes - 1} in {self.folder(root)}")
        return Split(images, labels)

    # --- what subclasses provide ---

    def folder(self, root: Path) -> Path:
        """The directory torchvision reads the files from."""
        raise NotImplementedError

    def expected_files(self) -> List[str]:
        raise NotImplementedError

    def search_dirs(self, root: Path) -> List[Path]:
        """Every directory looked in, for the error message."""
        return [self.folder(root)]

    def prepare(self, root: Path) -> None:
        """Make copies already on the machine visible to torchvision, checking them on the way."""

    def corrupt_files(self, root: Path) -> List[Path]:
        return []

    def images_of(self, data) -> torch.Tensor:
        raise NotImplementedError

    # --- error reporting ---

    def explain(self, root: Path, error: Exception) -> UsageError:
        corrupt = self.corrupt_files(root)
        if corrupt:
            return UsageError(
                f"{self.name}: {', '.join(map(str, corrupt))} truncated or corrupt (checksum differs from "
                f"torchvision's record); delete the file(s) and download again")
        folder = self.folder(root)
        missing = [name for name in self.expected_files() if not (folder / name).exists()]
        if not missing:
            return UsageError(f"{self.name}: could not read the files in {folder}: {_summary(error)}")
        reason = f"download failed: {_summary(error)}" if self.download else "downloads are off (--no-download)"
        searched = ", ".join(str(d) for d in self.search_dirs(root))
        hint = f"; or {self.how_to_get}" if self.how_to_get else ""
        return UsageError(
            f"{self.name} is not on this machine and {reason}. Searched: {searched}. Expected files: "
            f"{', '.join(missing)}{self.files_note}. Put them in {folder} (or give --data-root / ${ENV_VAR}), "
            f"or run once where downloads work{hint}")


class IdxDataset(TorchvisionDataset):
    """MNIST-like data: four IDX files, ``train``/``t10k`` images and labels."""

    extra_dirs = ()  # system directories that may hold the gzipped files
    files_note = " (each may also be gzipped, NAME.gz, in any directory searched)"

    def folder(self, root):
        return root / self.source.__name__ / "raw"

    def expected_files(self):
        return [_strip_gz(os.path.basename(name)) for name, _ in self.source.resources]

    def search_dirs(self, root):
        # not the root itself: MNIST and Fashion-MNIST name their files alike
        return [self.folder(root), root / self.source.__name__, *self.extra_dirs]

    def explain(self, root, error):
        explained = super().explain(root, error)
        loose = [name for name in self.expected_files() if (root / name).exists() or (root / f"{name}.gz").exists()]
        if not loose or (self.folder(root) / loose[0]).exists():
            return explained
        return UsageError(f"{explained}. Files of these names lie loose in {root}; MNIST and Fashion-MNIST name "
                          f"their files alike, so they are not taken from there: move them into "
                          f"{root / self.source.__name__} if they are {self.name}")

    def prepare(self, root):
        raw = self.folder(root)
        for name in self.expected_files():
            if not (raw / name).exists():
                found = self._find(name, root)
                if found is not None:
                    _install(found, raw / name)
        present = {name: _idx_shape(raw / name) for name in self.expected_files() if (raw / name).exists()}
        for prefix in ("train", "t10k"):
            images, labels = present.get(f"{prefix}-images-idx3-ubyte"), present.get(f"{prefix}-labels-idx1-ubyte")
            if images and labels and images[0] != labels[0]:
                raise UsageError(f"{self.name}: {raw / f'{prefix}-images-idx3-ubyte'} holds {images[0]} images "
                                 f"but the labels file beside it {labels[0]} labels")

    def _find(self, name: str, root: Path) -> Optional[Path]:
        for directory in self.search_dirs(root):
            for candidate in (directory / f"{name}.gz", directory / name):
                if candidate.is_file():
                    return candidate
        return None

    def images_of(self, data):
        return torch.as_tensor(data, dtype=torch.uint8).unsqueeze(1).contiguous()


class PickledCifar(TorchvisionDataset):
    """CIFAR-10/100 in the pickled ``python`` version, checked against torchvision's checksums."""

    image_shape = (3, 32, 32)
    augment = "crop_flip"
    how_to_get = ("with a copy of the images as files, --dataset imagefolder:PATH reads PATH/{train,test}/<class>/* "
                  "(add --augment crop_flip to train as here)")

    def folder(self, root):
        return root / self.source.base_folder

    def _checked_files(self):
        meta = self.source.meta
        return [*self.source.train_list, *self.source.test_list, [meta["filename"], meta["md5"]]]

    def expected_files(self):
        return [name for name, _ in self._checked_files()]

    def search_dirs(self, root):
        return [self.folder(root), root / self.source.filename]

    def prepare(self, root):
        archive = root / self.source.filename
        folder = self.folder(root)
        if archive.is_file() and any(not (folder / name).exists() for name in self.expected_files()):
            from torchvision.datasets.utils import check_integrity, extract_archive
            if not check_integrity(str(archive), self.source.tgz_md5):
                raise UsageError(f"{self.name}: {archive} is truncated or corrupt (checksum differs from "
                                 f"torchvision's record); delete it and download again")
            extract_archive(str(archive), str(root))

    def corrupt_files(self, root):
        from torchvision.datasets.utils import check_integrity
        folder = self.folder(root)
        return [folder / name for name, md5 in self._checked_files()
                if (folder / name).exists() and not check_integrity(str(folder / name), md5)]

    def images_of(self, data):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).transpose(0, 3, 1, 2)))


class MNIST(IdxDataset):
    name = "mnist"
    label = "MNIST"
    source = TorchvisionClass("MNIST")
    classes = tuple(str(digit) for digit in range(10))
    image_shape = (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)


class FashionMNIST(IdxDataset):
    name = "fashion_mnist"
    label = "F-MNIST"
    source = TorchvisionClass("FashionMNIST")
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
    image_shape = (1, 28, 28)
    mean, std = (0.2860,), (0.3530,)
    extra_dirs = (DEBIAN_FASHION_MNIST,)
    how_to_get = "on Debian/Ubuntu: apt-get install dataset-fashion-mnist"


class CIFAR10(PickledCifar):
    name = "cifar10"
    label = "CIFAR-10"
    source = TorchvisionClass("CIFAR10")
    classes = CIFAR10_CLASSES
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100(PickledCifar):
    name = "cifar100"
    label = "CIFAR-100"
    source = TorchvisionClass("CIFAR100")
    classes = CIFAR100_CLASSES
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _summary(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _idx_shape(path: Path):
    """The dimensions an uncompressed uint8 IDX file declares, after checking its size matches them."""
    with open(path, "rb") as file:
        header = file.read(4)
        if len(header) < 4 or header[:2] != b"\0\0" or header[2] != 0x08 or not 1 <= header[3] <= 3:
            raise UsageError(f"{path} is not a uint8 IDX file (bad header); delete it so it is fetched again")
        dims_bytes = file.read(4 * header[3])
    if len(dims_bytes) < 4 * header[3]:
        raise UsageError(f"{path} is truncated (header cut short); delete it so it is fetched again")
    dims = tuple(int.from_bytes(dims_bytes[i:i + 4], "big") for i in range(0, len(dims_bytes), 4))
    expected = 4 + len(dims_bytes) + int(np.prod(dims))
    actual = path.stat().st_size
    if actual != expected:
        raise UsageError(f"{path} is truncated or corrupt: its header declares {expected} bytes, the file has "
                         f"{actual}; delete it so it is fetched again")
    return dims


def _install(found: Path, target: Path) -> None:
    """Decompress or copy ``found`` to ``target``, checking it, so torchvision reads it without a download."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".part")
    except OSError as error:
        raise UsageError(f"cannot write {target.parent} to unpack {found}: {error}; give a writable --data-root")
    temporary = Path(temporary)
    try:
        opener = gzip.open if found.suffix == ".gz" else open
        with opener(found, "rb") as source, os.fdopen(handle, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        _idx_shape(temporary)
        publish(temporary, target)
    except (OSError, EOFError, zlib.error) as error:
        raise UsageError(f"{found} could not be unpacked into {target.parent} ({error}): "
                         f"is it truncated or corrupt?") from None
    except UsageError:
        raise UsageError(f"{found} is truncated or corrupt: its IDX content does not match its header") from None
    finally:
        temporary.unlink(missing_ok=True)


@hookimpl
def register_datasets(register):
    for dataset in (MNIST, FashionMNIST, CIFAR10, CIFAR100):
        register(dataset)
