"""``imagefolder:PATH`` on small trees of real PNG and JPEG files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noprop_bench import UsageError
from noprop_bench.cli import main
from noprop_bench_plugins.datasets import imagefolder
from noprop_bench_plugins.datasets.imagefolder import ImageFolder


def write_tree(path: Path, classes=("cat", "dog"), per_class=(3, 2), mode="RGB", size=(8, 6), fmt="png", seed=0):
    """``path/{train,test}/<class>/NNN.<fmt>`` with random pixels; returns ``{file: array}``."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    written = {}
    for split, count in zip(("train", "test"), per_class):
        for name in classes:
            folder = path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
                file = folder / f"{index:03d}.{fmt}"
                Image.fromarray(pixels, mode).save(file)
                written[file] = pixels
    return written


def as_chw(pixels: np.ndarray) -> torch.Tensor:
    array = torch.from_numpy(pixels)
    return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1)


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NOPROP_BENCH_DATA", str(tmp_path / "data-root"))
    return tmp_path / "data-root"


def test_png_tree_loads_exactly(tmp_path):
    written = write_tree(tmp_path / "tree")
    dataset = ImageFolder(str(tmp_path / "tree"))
    train, test = dataset.load("train"), dataset.load("test")
    assert dataset.classes == ("cat", "dog") and dataset.label == "tree"
    assert dataset.image_shape == (3, 6, 8) and train.images.shape == (6, 3, 6, 8) and len(test) == 4
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first_dog = tmp_path / "tree" / "train" / "dog" / "000.png"
    assert torch.equal(train.images[3], as_chw(written[first_dog]))
    everything = np.stack([written[f] for f in sorted(written) if "/train/" in str(f)]).astype(np.float64) / 255
    assert np.allclose(dataset.mean, everything.mean(axis=(0, 1, 2)))
    assert np.allclose(dataset.std, everything.std(axis=(0, 1, 2)))


def test_jpeg_and_grayscale(tmp_path):
    write_tree(tmp_path / "gray", mode="L", fmt="jpg")
    dataset = ImageFolder(str(tmp_path / "gray"))
    assert dataset.load("train").images.shape == (6, 1, 6, 8) and len(dataset.mean) == 1


def test_mixed_grayscale_and_colour_become_rgb(tmp_path, capsys):
    write_tree(tmp_path / "mixed", mode="L")
    colour = np.full((6, 8, 3), 200, dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(tmp_path / "mixed" / "test" / "dog" / "009.png")
    gray_file = tmp_path / "mixed" / "train" / "cat" / "000.png"
    gray = np.array(Image.open(gray_file))
    train = ImageFolder(str(tmp_path / "mixed")).load("train")
    assert train.images.shape[1] == 3
    assert all(torch.equal(train.images[0, c], torch.from_numpy(gray)) for c in range(3))
    assert (f"imagefolder: 1 of 11 images are colour, so all become RGB (3 channels); the first: "
            f"{tmp_path / 'mixed' / 'test' / 'dog' / '009.png'}") in capsys.readouterr().err


def test_second_run_reads_the_cache(tmp_path, monkeypatch, data_root):
    write_tree(tmp_path / "tree")
    first = ImageFolder(str(tmp_path / "tree")).load("train")
    assert len(list((data_root / "decoded").glob("imagefolder-*.npz"))) == 1

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is current")
    monkeypatch.setattr(imagefolder, "_decode", no_decoding)
    again = ImageFolder(str(tmp_path / "tree"))
    assert torch.equal(again.load("train").images, first.images) and again.mean is not None


def test_stale_cache_is_rebuilt(tmp_path, data_root):
    write_tree(tmp_path / "tree")
    before = ImageFolder(str(tmp_path / "tree")).load("train")
    changed = tmp_path / "tree" / "train" / "cat" / "000.png"
    stat = changed.stat()
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8), "RGB").save(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = ImageFolder(str(tmp_path / "tree")).load("train")
    assert before.images[0].any() and not after.images[0].any()
    assert len(list((data_root / "decoded").glob("imagefolder-*.npz"))) == 1  # the stale one is gone


def test_a_damaged_cache_is_rebuilt_not_a_traceback(tmp_path, data_root):
    """A cache cut short (a full disk, a copy interrupted) is a broken zip file: it is decoded again."""
    write_tree(tmp_path / "tree")
    before = ImageFolder(str(tmp_path / "tree")).load("train")
    cached = next((data_root / "decoded").glob("imagefolder-*.npz"))
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    assert torch.equal(ImageFolder(str(tmp_path / "tree")).load("train").images, before.images)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_not_clipped(tmp_path):
    tree = tmp_path / "deep"
    pixels = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1365).astype(np.uint16)  # 0 .. 64155
    for split in ("train", "test"):
        for name in ("a", "b"):  # two classes, as classification needs
            (tree / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tree / split / name / "000.png")
    assert Image.open(tree / "train" / "a" / "000.png").mode == "I;16"
    images = ImageFolder(str(tree)).load("train").images
    assert images.shape == (2, 1, 6, 8)
    assert images[0, 0].tolist() == np.round(pixels.astype(np.float64) / 257).astype(np.uint8).tolist()


def test_a_sixteen_bit_png_that_an_older_pillow_opens_as_32_bit_is_scaled_too(tmp_path, monkeypatch):
    """Pillow before 10.3 opens a 16-bit grayscale PNG in mode "I": it is still 16-bit, not refused."""
    pixels = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1365).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    real_open = Image.open

    def as_older_pillow(path):
        with real_open(path) as opened:
            widened = opened.convert("I")
        widened.format = "PNG"
        return widened

    monkeypatch.setattr(imagefolder.Image, "open", as_older_pillow)
    decoded = imagefolder._decode(tmp_path / "deep.png", (tmp_path / "deep.png").read_bytes())
    assert decoded[0].tolist() == np.round(pixels.astype(np.float64) / 257).astype(np.uint8).tolist()


@pytest.mark.parametrize("pixels, what", [(np.full((6, 8), 70000, dtype=np.int32), "32-bit integer"),
                                          (np.full((6, 8), 0.5, dtype=np.float32), "floating-point")])
def test_images_without_a_fixed_range_are_refused(tmp_path, pixels, what):
    tree = tmp_path / "wide"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tree / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tree / split / name / "000.tiff")
    with pytest.raises(UsageError, match=f"000.tiff holds {what} grayscale pixels"):
        ImageFolder(str(tree)).load("train")


def test_a_cache_of_an_older_decoding_is_not_used(tmp_path, monkeypatch, data_root):
    write_tree(tmp_path / "tree")
    ImageFolder(str(tmp_path / "tree")).load("train")
    monkeypatch.setattr(imagefolder, "DECODER_VERSION", imagefolder.DECODER_VERSION + 1)
    decoded = []
    real_decode = imagefolder._decode
    monkeypatch.setattr(imagefolder, "_decode", lambda path, content: decoded.append(path) or real_decode(path, content))
    ImageFolder(str(tmp_path / "tree")).load("train")
    assert len(decoded) == 10  # every file decoded again
    assert len(list((data_root / "decoded").glob("imagefolder-*.npz"))) == 1  # the old cache is gone


def test_classes_must_agree(tmp_path):
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "dog").rename(tmp_path / "tree" / "test" / "wolf")
    with pytest.raises(UsageError, match="only in train: dog; only in test: wolf"):
        ImageFolder(str(tmp_path / "tree"))


def test_one_class_is_refused(tmp_path):
    """Every prediction is right with one class: a run reported 100.00% for it."""
    write_tree(tmp_path / "tree", classes=("cat",))
    with pytest.raises(UsageError, match="one class \\(cat\\); classification needs at least two class folders"):
        ImageFolder(str(tmp_path / "tree"))


def test_empty_class(tmp_path):
    write_tree(tmp_path / "tree")
    empty = tmp_path / "tree" / "train" / "bird"
    empty.mkdir()
    with pytest.raises(UsageError, match=f"class folder {empty} is empty"):
        ImageFolder(str(tmp_path / "tree"))


def test_non_image_file_is_named(tmp_path):
    write_tree(tmp_path / "tree")
    stray = tmp_path / "tree" / "test" / "cat" / "notes.txt"
    stray.write_text("not a picture")
    (tmp_path / "tree" / "test" / "cat" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored
    dataset = ImageFolder(str(tmp_path / "tree"))
    with pytest.raises(UsageError, match=f"{stray} is not an image"):
        dataset.load("train")


def test_images_of_different_sizes(tmp_path):
    write_tree(tmp_path / "tree")
    odd = tmp_path / "tree" / "test" / "dog" / "001.png"
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8), "RGB").save(odd)
    with pytest.raises(UsageError, match=f"{odd} is 5x5 pixels"):
        ImageFolder(str(tmp_path / "tree")).load("test")


@pytest.mark.parametrize("layout, says", [("missing", "no such directory"), ("no-test", "it has no test/ folder"),
                                          ("loose-file", "is not a class folder"), ("a-file", "a file, not a folder"),
                                          ("empty", "imagefolder needs a folder")])
def test_bad_layouts_exit_2_without_traceback(tmp_path, capsys, layout, says):
    tree = tmp_path / "tree"
    if layout != "missing":
        write_tree(tree)
    if layout == "no-test":
        for file in (tree / "test").rglob("*.png"):
            file.unlink()
        for folder in (tree / "test").iterdir():
            folder.rmdir()
        (tree / "test").rmdir()
    if layout == "loose-file":
        (tree / "train" / "readme.txt").write_text("hello")
    given = {"a-file": tree / "train" / "cat" / "000.png", "empty": ""}.get(layout, tree)
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", f"imagefolder:{given}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and says in err
    assert str(given) in err if given else "imagefolder:PATH" in err


def test_end_to_end_training_run(tmp_path, capsys):
    write_tree(tmp_path / "tree", per_class=(8, 4), size=(16, 16))
    with pytest.raises(SystemExit) as exit_info:
        main(["--methods", "backprop", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--backbone", "noprop_cnn",
              "--budget", "2steps", "--seeds", "1", "--batch-size", "4", "--checkpoints", "0",
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "trials.jsonl").exists()


def test_a_folder_is_one_dataset_however_its_path_is_spelled(tmp_path, capsys, monkeypatch):
    """Records name the folder by its absolute path: relative spellings of it are the same dataset (the
    reruns skip it); one relative path from another working directory is another folder, and a link is a
    name of its own (links are not followed: a cluster's nodes may reach their own copies through one)."""
    write_tree(tmp_path / "tree", per_class=(8, 4), size=(16, 16))
    (tmp_path / "elsewhere").mkdir()
    write_tree(tmp_path / "elsewhere" / "tree", per_class=(8, 4), size=(16, 16), seed=1)
    run = ["--methods", "backprop", "--backbone", "noprop_cnn", "--budget", "2steps", "--seeds", "1",
           "--batch-size", "4", "--checkpoints", "0", "--out", str(tmp_path / "out")]
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    spellings = ((tmp_path, "tree"), (tmp_path, str(tmp_path / "tree")), (tmp_path / "elsewhere", "../tree"),
                 (tmp_path / "elsewhere", "tree"), (tmp_path, "link"))
    for cwd, spelling in spellings:
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as exit_info:
            main([*run, "--dataset", f"imagefolder:{spelling}"])
        assert exit_info.value.code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert err.count("skip ") == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records] == [f"imagefolder:{tmp_path / 'tree'}",
                                               f"imagefolder:{tmp_path / 'elsewhere' / 'tree'}",
                                               f"imagefolder:{tmp_path / 'link'}"]


def test_the_first_decode_says_what_it_does_and_a_cached_load_says_nothing(tmp_path, capsys, monkeypatch):
    """The host decodes a folder while planning, before any other line: 60,000 JPEGs sat silent for 11 s."""
    write_tree(tmp_path / "tree")
    monkeypatch.setattr(imagefolder, "PROGRESS_SECONDS", 0.0)  # a line per image, as a long decode has
    ImageFolder(str(tmp_path / "tree")).load("train")
    err = capsys.readouterr().err
    assert f"imagefolder: decoding the 10 images of {tmp_path / 'tree'} ..." in err
    assert "imagefolder: train: 6 of 6 images decoded" in err and "imagefolder: decoded 10 images in" in err
    assert "later runs read them from" in err
    ImageFolder(str(tmp_path / "tree")).load("train")
    assert capsys.readouterr().err == ""


def test_changed_files_make_new_trials_and_a_column_of_their_own(tmp_path, capsys):
    """A rerun after the folder's files changed trains again (it used to skip, then pool old and new data in
    one cell); a copy of the folder, with other modification times, is the same data; the report gives each
    content a column of its own."""
    tree = tmp_path / "tree"
    write_tree(tree, per_class=(8, 4), size=(16, 16))
    run = ["--methods", "backprop", "--backbone", "noprop_cnn", "--budget", "2steps", "--seeds", "1",
           "--batch-size", "4", "--checkpoints", "0", "--out", str(tmp_path / "out"), "--dataset", f"imagefolder:{tree}"]

    def run_and_read():
        with pytest.raises(SystemExit) as exit_info:
            main(run)
        assert exit_info.value.code == 0, capsys.readouterr().err
        return [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]

    first = run_and_read()
    before = first[0]["dataset_content"]
    assert before == ImageFolder(str(tree)).content_id and len(before) == 64
    os.utime(tree / "train" / "cat" / "000.png", ns=(1, 1))  # touched, not changed: the same data
    assert len(run_and_read()) == 1 and "skip " in capsys.readouterr().err
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tree / "train" / "cat" / "000.png")
    records = run_and_read()
    assert len(records) == 2 and records[1]["dataset_content"] not in (None, before)
    assert records[1]["trial_id"] != records[0]["trial_id"]
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")])
    header = (tmp_path / "report" / "table1.md").read_text().splitlines()[2]
    assert f"tree (data {before[:8]}) test" in header
    assert f"tree (data {records[1]['dataset_content'][:8]}) test" in header


def test_a_trial_whose_files_changed_after_planning_fails_saying_so(tmp_path):
    from noprop_bench.plugins import load_plugins
    from noprop_bench.run.budget import Budget
    from noprop_bench.run.runner import RunData, TrialSpec, run_trial

    write_tree(tmp_path / "tree", per_class=(8, 4), size=(16, 16))
    dataset = ImageFolder(str(tmp_path / "tree"))
    backprop = load_plugins().method("backprop")
    spec = TrialSpec(method=backprop, params=backprop.resolve_params({}), dataset=dataset.spec, backbone="noprop_cnn",
                     budget=Budget.parse("1steps"), seed=0, batch_size=4, device=torch.device("cpu"), augment="none",
                     checkpoints=0, dataset_content="0" * 64)
    record = run_trial(spec, RunData.load(dataset, torch.device("cpu")))
    assert record["status"] == "failed" and record["steps"] == 0
    assert record["error"].startswith(f"the files of {dataset.spec} changed after the run was planned")
