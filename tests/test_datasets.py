"""Dataset acquisition and readers: CIFAR-10 in every layout, ImageFolder, CelebA, downloads."""
import hashlib
import re
import shutil
import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffattr import datasets
from diffattr.data import build_splits, load_source
from diffattr.datasets import (CIFAR10_CLASSES, ChecksumError, DownloadError, fetch_cifar10,
                               load_celeba, load_cifar10, load_image_folder)
from diffattr.storage import read_array

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 4, "test": 2}  # images per class in the fake CIFAR-10


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fake():
    """A tiny CIFAR-10: random pixels, every class PER_CLASS times per split, labels shuffled."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in PER_CLASS.items():
        labels = rng.permutation(np.repeat(np.arange(10), n))
        out[split] = (rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)
    return out


def write_batches(folder: Path, fake) -> dict:
    """The official python batches of `fake` in `folder`; returns each file's md5."""
    folder.mkdir(parents=True)
    images, labels = fake["train"]
    parts = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(np.arange(len(labels)), 5))}
    for name, rows in [*parts.items(), ("test_batch", None)]:
        imgs, labs = (images[rows], labels[rows]) if rows is not None else fake["test"]
        entry = {b"batch_label": name.encode(), b"labels": [int(x) for x in labs],
                 b"data": imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072),
                 b"filenames": [f"{i}.png".encode() for i in range(len(imgs))]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {name: md5(folder / name) for name in datasets.CIFAR10_BATCH_MD5}


def python_tarball(path: Path, fake) -> Path:
    folder = path.parent / "_batches_src"
    write_batches(folder / datasets.CIFAR10_FOLDER, fake)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder / datasets.CIFAR10_FOLDER, arcname=datasets.CIFAR10_FOLDER)
    return path


def write_image_folder(root: Path, fake) -> Path:
    """`<split>/<class>/<k>.png` (lossless), k counting each class's images in source order."""
    for split, (images, labels) in fake.items():
        for c, name in enumerate(CIFAR10_CLASSES):
            (root / split / name).mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(labels == c)):
                Image.fromarray(images[i]).save(root / split / name / f"{k:04d}.png")
    (root / next(iter(fake)) / "airplane" / "notes.txt").write_text("not an image")
    return root


def pack(tree: Path, archive: Path, top: str | None = None) -> Path:
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    names = [(p, f"{top}/" * bool(top) + p.relative_to(tree).as_posix()) for p in files]
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            for p, name in names:
                z.write(p, name)
            z.writestr("__MACOSX/._junk", b"resource fork")
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as t:
            for p, name in names:
                t.add(p, name)
    return archive


def layout(kind: str, root: Path, fake, monkeypatch) -> Path:
    """The fake CIFAR-10 as `kind`; checksums of the fake python files are made the expected ones."""
    if kind == "tarball":
        path = python_tarball(root / "cifar-10-python.tar.gz", fake)
        monkeypatch.setattr(datasets, "CIFAR10_MD5", md5(path))
        return path
    if kind in ("batches", "batches_parent"):
        for name, digest in write_batches(root / "x" / datasets.CIFAR10_FOLDER, fake).items():
            monkeypatch.setitem(datasets.CIFAR10_BATCH_MD5, name, digest)
        return root / "x" / datasets.CIFAR10_FOLDER if kind == "batches" else root / "x"
    tree = write_image_folder(root / "tree", fake)
    if kind == "image_dir":
        return tree
    name = {"image_tgz": "c.tar.gz", "image_tar_top": "c.tar", "image_zip_top": "c.zip"}[kind]
    return pack(tree, root / name, top=None if kind == "image_tgz" else "cifar10")


def official(path, **kwargs):
    """load_cifar10 with the checksums in force at call time (monkeypatched for fakes)."""
    return load_cifar10(path, expected_md5=datasets.CIFAR10_MD5, **kwargs)


BATCH_LAYOUTS = ["tarball", "batches", "batches_parent"]
FOLDER_LAYOUTS = ["image_dir", "image_tgz", "image_tar_top", "image_zip_top"]


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("kind", BATCH_LAYOUTS + FOLDER_LAYOUTS)
def test_every_layout_gives_the_same_pixels_and_labels(kind, fake, tmp_path, monkeypatch):
    data = official(layout(kind, tmp_path, fake, monkeypatch))
    assert set(data) == {"train", "test"}
    for split, (images, labels) in fake.items():
        got = data[split]
        assert got.images.dtype == np.uint8 and got.images.shape == images.shape
        # the python batches keep the source order; an ImageFolder is ordered by class then file
        order = np.arange(len(labels)) if kind in BATCH_LAYOUTS else np.argsort(labels, kind="stable")
        np.testing.assert_array_equal(got.images, images[order])
        np.testing.assert_array_equal(got.labels, labels[order])
        np.testing.assert_array_equal(got.index, np.arange(len(labels)))


@pytest.mark.parametrize("kind", ["tarball", "batches", "image_zip_top"])
def test_class_subset_is_relabelled_in_the_given_order(kind, fake, tmp_path, monkeypatch):
    data = official(layout(kind, tmp_path, fake, monkeypatch), classes=["horse", "automobile"])
    for split, (images, labels) in fake.items():
        got = data[split]
        assert len(got.labels) == 2 * PER_CLASS[split]
        want = np.where(labels == 7, 0, np.where(labels == 1, 1, -1))  # horse -> 0, automobile -> 1
        if kind in BATCH_LAYOUTS:
            np.testing.assert_array_equal(got.index, np.flatnonzero(want >= 0))
            np.testing.assert_array_equal(got.images, images[got.index])
            np.testing.assert_array_equal(got.labels, want[got.index])
        else:  # index: position in the class-sorted listing of all ten classes
            order = np.argsort(labels, kind="stable")
            np.testing.assert_array_equal(got.images, images[order][got.index])
            np.testing.assert_array_equal(got.labels, want[order][got.index])
            assert got.labels.tolist() == [0] * PER_CLASS[split] + [1] * PER_CLASS[split]


def test_resize_matches_pil_bilinear(fake, tmp_path, monkeypatch):
    got = official(layout("batches", tmp_path, fake, monkeypatch), size=16)["test"]
    image = fake["test"][0][3]
    expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(got.images[3], expected)
    assert got.images.shape == (20, 16, 16, 3)


def test_unknown_class_is_named(fake, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"classes: \['unicorn'\].*available: airplane"):
        official(layout("image_dir", tmp_path, fake, monkeypatch), classes=["horse", "unicorn"])


def test_wrong_tarball_checksum_unpacks_nothing(fake, tmp_path, monkeypatch):
    path = python_tarball(tmp_path / "cifar-10-python.tar.gz", fake)
    before = snapshot(tmp_path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled a file that failed its checksum")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    with pytest.raises(ChecksumError) as error:
        load_cifar10(path)  # the published md5, which the fake cannot have
    message = str(error.value)
    assert str(path) in message and datasets.CIFAR10_MD5 in message and md5(path) in message
    assert snapshot(tmp_path) == before


def test_truncated_tarball_is_a_checksum_error(fake, tmp_path):
    good = python_tarball(tmp_path / "good.tar.gz", fake)
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ChecksumError, match=md5(good)):
        load_cifar10(path, expected_md5=md5(good))


def test_corrupt_extracted_batch_is_refused_before_unpickling(fake, tmp_path, monkeypatch):
    folder = tmp_path / datasets.CIFAR10_FOLDER
    digests = write_batches(folder, fake)
    blob = bytearray((folder / "data_batch_3").read_bytes())
    blob[-100] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(blob))
    before = snapshot(tmp_path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled before checking"))
    with pytest.raises(ChecksumError, match=f"data_batch_3: md5 {md5(folder / 'data_batch_3')}, "
                                             f"expected {digests['data_batch_3']}"):
        load_cifar10(folder, batch_md5=digests)
    assert snapshot(tmp_path) == before
    with pytest.raises(ChecksumError, match="c99cafc152244af753f735de768cd75f"):
        load_cifar10(folder)  # the published md5s


# ---------------------------------------------------------------- download

def test_fetch_writes_the_verified_archive(fake, tmp_path):
    source = python_tarball(tmp_path / "src" / "cifar.tar.gz", fake)
    dest = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    assert fetch_cifar10(dest, url=source.as_uri(), expected_md5=md5(source)) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_fetch_corrupt_download_leaves_nothing(fake, tmp_path):
    source = python_tarball(tmp_path / "src" / "cifar.tar.gz", fake)
    dest = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    with pytest.raises(ChecksumError, match=f"md5 {md5(source)}, expected {'0' * 32}"):
        fetch_cifar10(dest, url=source.as_uri(), expected_md5="0" * 32)
    assert list(dest.parent.iterdir()) == []


class Broken(io.BytesIO):
    """A response that dies after its first block."""

    def read(self, size=-1):
        if self.tell():
            raise ConnectionResetError("connection reset by peer")
        return super().read(10)


@pytest.mark.parametrize("failure", ["offline", "interrupted"])
def test_fetch_network_failure_says_how_to_use_a_local_copy(failure, tmp_path, monkeypatch):
    def urlopen(url, timeout):
        if failure == "offline":
            raise URLError("[Errno -3] Temporary failure in name resolution")
        return Broken(b"x" * 100)

    monkeypatch.setattr(datasets, "urlopen", urlopen)
    dest = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    with pytest.raises(DownloadError, match="set `dataset.path`") as error:
        fetch_cifar10(dest)
    assert datasets.CIFAR10_URL in str(error.value) and str(dest) in str(error.value)
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------- ImageFolder and CelebA

def test_image_folder_reads_only_the_asked_classes(fake, tmp_path, monkeypatch):
    tree = write_image_folder(tmp_path / "tree", fake)
    decoded = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda f, *a: decoded.append(1) or real_open(f, *a))
    got = load_image_folder(tree, "test", classes=["ship", "cat"])
    assert len(decoded) == 2 * PER_CLASS["test"]
    images, labels = fake["test"]
    np.testing.assert_array_equal(got.images, np.concatenate([images[labels == 8], images[labels == 3]]))
    assert got.labels.tolist() == [0, 0, 1, 1]
    assert got.index.tolist() == [16, 17, 6, 7]  # ship and cat are the 9th and 4th sorted classes


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_long_names(fmt, fake, tmp_path):
    """ustar prefixes, GNU long names and pax records all name the same files."""
    tree = write_image_folder(tmp_path / "tree", {"test": fake["test"]})
    top = "a-long-top-level-folder-name-" * (3 if fmt == tarfile.USTAR_FORMAT else 6)
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz", format=fmt) as archive:
        for path in sorted(tree.rglob("*.png"), reverse=True):  # archive order is not file order
            archive.add(path, f"{top}/{path.relative_to(tree).as_posix()}")
    names = datasets.Tree(tmp_path / "t.tar.gz").names()
    assert len(names) == 20 and all(n.startswith(f"{top}/test/") for n in names)
    got = load_image_folder(tmp_path / "t.tar.gz", "test")
    np.testing.assert_array_equal(got.images, load_image_folder(tree, "test").images)
    assert got.labels.tolist() == np.repeat(np.arange(10), PER_CLASS["test"]).tolist()


@pytest.fixture
def celeba(tmp_path):
    """A CelebA folder of six 29x40 faces: partitions 0,0,0,1,2,2."""
    rng = np.random.default_rng(1)
    (tmp_path / "img_align_celeba").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 29, 3), dtype=np.uint8)).save(
            tmp_path / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=90)
    (tmp_path / "list_eval_partition.txt").write_text(
        "".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate([0, 0, 0, 1, 2, 2])))
    return tmp_path


def test_celeba_center_crop_then_resize(celeba):
    got = load_celeba(celeba, "test", crop=20, size=8)
    assert got.index.tolist() == [0, 1] and got.labels.tolist() == [0, 0]
    for k, name in enumerate(["000005.jpg", "000006.jpg"]):
        image = Image.open(celeba / "img_align_celeba" / name).convert("RGB")
        by_hand = image.crop((4, 10, 24, 30)).resize((8, 8), Image.BILINEAR)  # left round(4.5) = 4
        np.testing.assert_array_equal(got.images[k], np.asarray(by_hand))
    assert len(load_celeba(celeba, "train", crop=20, size=8).images) == 3


def test_celeba_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_celeba(tmp_path / "celeba")
    message = str(error.value)
    for needle in ["img_align_celeba.zip", "list_eval_partition.txt", "mmlab.ie.cuhk.edu.hk",
                   "drive.google.com", "browser", f"{tmp_path / 'celeba'}/img_align_celeba/000001.jpg"]:
        assert needle in message


# ---------------------------------------------------------------- splits of partitioned sources

def outputs(tmp_path):
    return {f"{split}_{kind}": tmp_path / "out" / f"{split}.{'zarr' if kind == 'images' else 'csv'}"
            for split in ("train", "val") for kind in ("images", "index")}


def test_build_splits_cifar10_subset_draws_val_from_the_test_partition(fake, tmp_path, monkeypatch):
    fake, rng = {}, np.random.default_rng(2)  # 20 train and 10 test images per class
    for split, n in (("train", 20), ("test", 10)):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        fake[split] = (rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)
    path = layout("batches", tmp_path, fake, monkeypatch)
    spec = {"source": "cifar10", "path": str(path), "classes": ["automobile", "horse"],
            "n_train": 20, "n_val": 10, "split_seed": 42}
    build_splits(spec, outputs(tmp_path))
    chosen = {}
    for split, part, n in (("train", "train", 20), ("val", "test", 10)):
        images, attrs = read_array(outputs(tmp_path)[f"{split}_images"])
        table = pd.read_csv(outputs(tmp_path)[f"{split}_index"])
        assert list(table.columns) == ["position", "original_index", "label", "source_split"]
        assert images.shape == (n, 3, 32, 32) and images.dtype == np.float32
        assert attrs["source_split"] == part and attrs["classes"] == ["automobile", "horse"]
        assert set(table["source_split"]) == {part} and list(table["position"]) == list(range(n))
        original = table["original_index"].to_numpy()
        assert np.all(np.diff(original) > 0)
        source_images, source_labels = fake[part]
        # relabelled automobile -> 0, horse -> 1; stratified: half of each
        np.testing.assert_array_equal(table["label"], np.where(source_labels[original] == 1, 0, 1))
        assert set(source_labels[original]) == {1, 7}
        assert np.bincount(table["label"]).tolist() == [n // 2, n // 2]
        np.testing.assert_allclose(images, source_images[original].transpose(0, 3, 1, 2) / 127.5 - 1,
                                   rtol=0, atol=1e-6)
        chosen[split] = original
    # the val images are the test partition's, none of the train partition's
    val_images = read_array(outputs(tmp_path)["val_images"])[0]
    train_pool = fake["train"][0].transpose(0, 3, 1, 2) / 127.5 - 1
    assert not any(np.allclose(v, t) for v in val_images for t in train_pool)
    # reproducible with split_seed, different with another
    def train_index(spec):
        build_splits(spec, outputs(tmp_path))
        return pd.read_csv(outputs(tmp_path)["train_index"])["original_index"].to_numpy()

    np.testing.assert_array_equal(train_index(spec), chosen["train"])
    assert not np.array_equal(train_index({**spec, "split_seed": 1}), chosen["train"])


@pytest.mark.parametrize("change, message", [
    ({"classes": ["automobile", "unicorn"]}, r"dataset\.classes: \['unicorn'\] not in"),
    ({"classes": "horse"}, r"dataset\.classes: expected null or a non-empty list"),
    ({"n_val": 5}, r"dataset\.n_val \(from the 4 test images\): 5 images asked for, expected 1 to 4"),
    ({"path": "nowhere/cifar"}, r"dataset\.path: nowhere/cifar does not exist"),
    ({"path": None}, r"dataset\.path: null stands for the official CIFAR-10 archive"),
    ({"image_size": 0}, r"dataset\.image_size: expected a positive integer"),
    ({"crop": 20}, r"dataset\.crop: not supported for source cifar10"),
])
def test_bad_dataset_settings_name_the_key(change, message, fake, tmp_path, monkeypatch):
    tree = write_image_folder(tmp_path / "tree", fake)
    spec = {"source": "cifar10", "path": str(tree), "classes": ["automobile", "horse"],
            "n_train": 8, "n_val": 4, "split_seed": 0, **change}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_splits(spec, outputs(tmp_path))
    assert not (tmp_path / "out").exists()


def test_image_folder_and_celeba_sources(fake, tmp_path, celeba):
    tree = write_image_folder(tmp_path / "tree", fake)
    data = load_source({"source": "image_folder", "path": str(tree), "classes": ["frog"], "image_size": 16})
    images, labels = fake["test"]
    frog = images[labels == 6]
    expected = np.stack([np.asarray(Image.fromarray(i).resize((16, 16), Image.BILINEAR)) for i in frog])
    np.testing.assert_allclose(data["test"][0], expected.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    assert data["test"][1].tolist() == [0, 0]
    spec = {"source": "celeba", "path": str(celeba), "crop": 20, "image_size": 8,
            "n_train": 2, "n_val": 1, "split_seed": 0}
    build_splits(spec, outputs(tmp_path))
    val = pd.read_csv(outputs(tmp_path)["val_index"])
    assert val["source_split"].tolist() == ["test"] and val["original_index"].iloc[0] in (0, 1)
    assert read_array(outputs(tmp_path)["train_images"])[0].shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="img_align_celeba.zip"):
        build_splits({**spec, "path": str(tmp_path / "no_celeba")}, outputs(tmp_path))


# ---------------------------------------------------------------- the real data

@pytest.mark.skipif(not REAL_CIFAR10.exists(), reason=f"{REAL_CIFAR10} is absent")
def test_real_cifar2_from_the_jpeg_archive():
    data = load_cifar10(REAL_CIFAR10, classes=["automobile", "horse"])
    for split, n in (("train", 5000), ("test", 1000)):
        got = data[split]
        assert got.images.shape == (2 * n, 32, 32, 3) and got.images.dtype == np.uint8
        assert np.bincount(got.labels).tolist() == [n, n]
        # class-sorted listing of all ten classes: automobile is the 2nd, horse the 8th
        np.testing.assert_array_equal(got.index, np.r_[n:2 * n, 7 * n:8 * n])
        assert 60 < got.images.mean() < 190 and got.images.std() > 30
        assert len(np.unique(got.images.reshape(2 * n, -1)[:, :64], axis=0)) > 0.99 * 2 * n


# ---------------------------------------------------------------- corrupt inputs, one table

def _cut(path: Path, out: Path, keep: float = 0.5) -> Path:
    out.write_bytes(path.read_bytes()[: int(len(path.read_bytes()) * keep)])
    return out


def _png(path: Path, width: int = 32, height: int = 32):
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(path)


def _tree(root: Path, fake, edit=None) -> Path:
    tree = write_image_folder(root / "tree", fake)
    if edit:
        edit(tree)
    return tree


def _cifar_splits(path, tmp_path):
    build_splits({"source": "cifar10", "path": str(path), "classes": None, "n_train": 10, "n_val": 10,
                  "split_seed": 0}, outputs(tmp_path))


def _folder_splits(path, tmp_path):
    build_splits({"source": "image_folder", "path": str(path), "n_train": 10, "n_val": 10, "split_seed": 0},
                 outputs(tmp_path))


def _celeba(tmp_path, edit):
    """A CelebA folder of 32x32 faces, partitions 0,0,0,1,2,2, edited by `edit(root)`."""
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    for i in range(6):
        _png(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate([0, 0, 0, 1, 2, 2])))
    edit(root)
    return root


def _celeba_splits(root, tmp_path):
    build_splits({"source": "celeba", "path": str(root), "crop": 20, "image_size": 8, "n_train": 3,
                  "n_val": 2, "split_seed": 0}, outputs(tmp_path))


def corrupt_input(case: str, tmp_path: Path, fake):
    """(a call that reads the corrupt input, the exception type, the exact start of its message)."""
    if case == "truncated official tarball":
        good = python_tarball(tmp_path / "good.tar.gz", fake)
        path = _cut(good, tmp_path / "cifar-10-python.tar.gz")
        return (lambda: load_cifar10(path, expected_md5=md5(good)), ChecksumError,
                f"{path}: md5 {md5(path)}, expected {md5(good)}: the file is corrupt, truncated")
    if case == "tarball with the wrong md5":
        path = python_tarball(tmp_path / "cifar-10-python.tar.gz", fake)
        return (lambda: load_cifar10(path), ChecksumError,
                f"{path}: md5 {md5(path)}, expected {datasets.CIFAR10_MD5}: the file is corrupt")
    if case == "corrupt extracted batch":
        folder = tmp_path / datasets.CIFAR10_FOLDER
        digests = write_batches(folder, fake)
        _cut(folder / "test_batch", folder / "test_batch", 0.9)
        return (lambda: load_cifar10(folder, batch_md5=digests), ChecksumError,
                f"{folder / 'test_batch'}: md5 {md5(folder / 'test_batch')}, expected {digests['test_batch']}")
    if case == "missing extracted batch":
        folder = tmp_path / datasets.CIFAR10_FOLDER
        digests = write_batches(folder, fake)
        (folder / "data_batch_4").unlink()
        return lambda: load_cifar10(folder, batch_md5=digests), FileNotFoundError, f"{folder}: no data_batch_4"
    if case == "truncated ImageFolder .tar.gz":
        path = _cut(pack(_tree(tmp_path, fake), tmp_path / "c.tar.gz"), tmp_path / "cut.tar.gz")
        return (lambda: _cifar_splits(path, tmp_path), ValueError,
                f"{path}: corrupt or truncated archive (")
    if case == "truncated ImageFolder .zip":
        path = _cut(pack(_tree(tmp_path, fake), tmp_path / "c.zip"), tmp_path / "cut.zip")
        return (lambda: _cifar_splits(path, tmp_path), ValueError,
                f"{path}: not a folder nor a readable .tar, .tar.gz/.tgz or .zip archive (truncated, "
                "corrupt or another format)")
    if case == "empty archive":
        path = tmp_path / "cifar.tar.gz"
        path.write_bytes(b"")
        return lambda: _cifar_splits(path, tmp_path), ValueError, f"{path}: not a folder nor a readable"
    if case in ("ImageFolder missing a class", "ImageFolder class folder without images"):
        def edit(tree):
            shutil.rmtree(tree / "test" / "frog")
            if case.endswith("without images"):
                (tree / "test" / "frog").mkdir()
                (tree / "test" / "frog" / "readme.txt").write_text("no images")
        tree = _tree(tmp_path, fake, edit)
        return (lambda: _cifar_splits(tree, tmp_path), FileNotFoundError,
                f"{tree / 'test' / 'frog'}: no such class folder, or no images in it; a CIFAR-10 ImageFolder "
                "needs test/<class>/ for every class used (missing: frog)")
    if case == "ImageFolder class missing from one split":
        tree = _tree(tmp_path, fake, lambda tree: shutil.rmtree(tree / "test" / "frog"))
        return (lambda: _folder_splits(tree, tmp_path), FileNotFoundError,
                f"{tree}: train/ and test/ hold different class folders (only in train: frog; only in test: "
                "none); add the missing folders or list the classes to use in dataset.classes")
    if case == "unreadable image":
        tree = _tree(tmp_path, fake, lambda tree: (tree / "train" / "cat" / "0001.png").write_bytes(b"junk"))
        return (lambda: _cifar_splits(tree, tmp_path), ValueError,
                f"{tree / 'train' / 'cat' / '0001.png'}: unreadable image (not a format PIL can decode)")
    if case == "truncated image":
        def edit(tree):
            _cut(tree / "test" / "dog" / "0000.png", tree / "test" / "dog" / "0000.png")
        tree = _tree(tmp_path, fake, edit)
        return (lambda: _cifar_splits(tree, tmp_path), ValueError,
                f"{tree / 'test' / 'dog' / '0000.png'}: unreadable image (")
    if case == "unreadable image in a zip":
        tree = _tree(tmp_path, fake, lambda tree: (tree / "train" / "cat" / "0001.png").write_bytes(b"junk"))
        path = pack(tree, tmp_path / "c.zip", top="cifar")
        return (lambda: _cifar_splits(path, tmp_path), ValueError,
                f"{path} (member cifar/train/cat/0001.png): unreadable image (not a format PIL can decode)")
    if case == "mis-sized image":
        tree = _tree(tmp_path, fake, lambda tree: _png(tree / "train" / "ship" / "0002.png", 24, 20))
        return (lambda: _cifar_splits(tree, tmp_path), ValueError,
                f"{tree / 'train' / 'ship' / '0002.png'}: 24x20 pixels; expected 32x32, or set image_size "
                "to resize every image")
    if case == "mis-sized image, any ImageFolder":
        # three images: whichever is decoded first, the message names the odd one and a 32x32 one
        root = tmp_path / "tree"
        for split in ("train", "test"):
            (root / split / "a").mkdir(parents=True)
            _png(root / split / "a" / "0.png")
            _png(root / split / "a" / "1.png")
            _png(root / split / "a" / "2.png", *((24, 20) if split == "train" else (32, 32)))
        odd = root / "train" / "a" / "2.png"
        return (lambda: build_splits({"source": "image_folder", "path": str(root), "n_train": 3, "n_val": 3,
                                      "split_seed": 0}, outputs(tmp_path)),
                ValueError, re.compile(rf"^({re.escape(str(odd))}: 24x20 pixels, but {re.escape(str(root))}/"
                                       rf"train/a/[01]\.png has 32x32|{re.escape(str(root))}/train/a/[01]\.png: "
                                       rf"32x32 pixels, but {re.escape(str(odd))} has 24x20)"))
    if case == "CelebA image missing":
        root = _celeba(tmp_path, lambda root: (root / "img_align_celeba" / "000005.jpg").unlink())
        return (lambda: _celeba_splits(root, tmp_path), FileNotFoundError,
                f"{root / 'img_align_celeba' / '000005.jpg'}: listed in list_eval_partition.txt but missing")
    if case == "CelebA unreadable image":
        root = _celeba(tmp_path, lambda root: (root / "img_align_celeba" / "000002.jpg").write_bytes(b""))
        return (lambda: _celeba_splits(root, tmp_path), ValueError,
                f"{root / 'img_align_celeba' / '000002.jpg'}: unreadable image (not a format PIL can decode)")
    if case == "CelebA partition line":
        root = _celeba(tmp_path, lambda root: (root / "list_eval_partition.txt").write_text(
            "000001.jpg 0\n000002.jpg 0\n000003.jpg train\n"))
        return (lambda: _celeba_splits(root, tmp_path), ValueError,
                f"{root / 'list_eval_partition.txt'}:3: expected '<file> <0|1|2>', got '000003.jpg train'")
    raise AssertionError(case)


CORRUPT_INPUTS = ["truncated official tarball", "tarball with the wrong md5", "corrupt extracted batch",
                  "missing extracted batch", "truncated ImageFolder .tar.gz", "truncated ImageFolder .zip",
                  "empty archive", "ImageFolder missing a class", "ImageFolder class folder without images",
                  "ImageFolder class missing from one split", "unreadable image", "truncated image",
                  "unreadable image in a zip", "mis-sized image", "mis-sized image, any ImageFolder",
                  "CelebA image missing", "CelebA unreadable image", "CelebA partition line"]


@pytest.mark.parametrize("case", CORRUPT_INPUTS)
def test_corrupt_input_is_named_and_nothing_is_written(case, fake, tmp_path, monkeypatch):
    call, error_type, message = corrupt_input(case, tmp_path, fake)
    if isinstance(error_type, type) and issubclass(error_type, ChecksumError):
        monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled before the md5 matched"))
    with pytest.raises(error_type) as error:
        call()
    if isinstance(message, re.Pattern):
        assert message.match(str(error.value)), str(error.value)
    else:
        assert str(error.value).startswith(message), str(error.value)
    assert not (tmp_path / "out").exists()
