"""Image datasets from local copies, and the md5-checked download of the CIFAR-10 archive.

Readers:
- CIFAR-10 from the official python tarball, its extracted `cifar-10-batches-py` folder, or an
  ImageFolder tree or archive (`load_cifar10`, `open_cifar10`);
- any ImageFolder tree `<split>/<class>/<image>`, as a folder or a .tar, .tar.gz/.tgz or .zip
  archive, possibly under one top-level folder (`load_image_folder`, `open_image_folder`);
- CelebA in its official layout (`load_celeba`, `open_celeba`).

Images come back as uint8 RGB (N, H, W, 3); scaling and the train/val split are `diffattr.data`'s
job. The `open_*` functions list a split without decoding it: labels and indices up front, pixels
on demand (`SplitSource.read`), so that a 5000-image sample of a large source decodes 5000 images.
Each image keeps `index`, its position in the source's own split over all classes: batch order for
the python batches (data_batch_1..5), sorted class then sorted file name for ImageFolder trees,
the order of `list_eval_partition.txt` for CelebA.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import posixpath
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import NamedTuple
from urllib.request import urlopen

import numpy as np

from .storage import atomic_output, file_digest

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_FOLDER = "cifar-10-batches-py"
# md5 of each file of the extracted archive, as torchvision publishes them.
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class ChecksumError(ValueError):
    """A file whose md5 is not the published one."""

    def __init__(self, what, expected: str, actual: str):
        super().__init__(f"{what}: md5 {actual}, expected {expected}: the file is corrupt, truncated "
                         "or not the official release; nothing was unpacked from it")
        self.expected, self.actual = expected, actual


class DownloadError(RuntimeError):
    """A download that could not complete (network, server)."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,): positions in the class list
    index: np.ndarray   # int64 (N,): positions in the source's own split, over all classes


@dataclass
class SplitSource:
    """One split of a source, listed but not decoded: `read(select)` decodes the images asked for."""
    labels: np.ndarray
    index: np.ndarray
    classes: tuple[str, ...]
    _read: Callable[[np.ndarray], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, select=None) -> np.ndarray:
        """uint8 images (n, H, W, 3) at positions `select` (all when None), in that order."""
        positions = np.arange(len(self)) if select is None else np.asarray(select, dtype=np.int64)
        return self._read(positions)

    def load(self, select=None) -> Split:
        positions = np.arange(len(self)) if select is None else np.asarray(select, dtype=np.int64)
        return Split(self.read(positions), self.labels[positions], self.index[positions])


# ---------------------------------------------------------------- checksums and download

def md5sum(path) -> str:
    return file_digest(path, "md5")


def fetch_cifar10(dest, url: str = CIFAR10_URL, expected_md5: str = CIFAR10_MD5,
                  timeout: float = 60.0) -> Path:
    """Download the CIFAR-10 python tarball to `dest`, md5-checked.

    The bytes go to a hidden temporary beside `dest`, renamed into place only when the md5
    matches: an interrupted or corrupt download never leaves a finished-looking `dest`.
    """
    dest = Path(dest)
    with atomic_output(dest) as tmp:
        digest, size = hashlib.md5(), 0
        try:
            with urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        except (OSError, HTTPException) as error:
            raise DownloadError(
                f"could not download {url}: {error}\n"
                "Without network access, use a local copy instead: set `dataset.path` in the "
                "experiment's config to the official cifar-10-python.tar.gz (md5 "
                f"{expected_md5}), an extracted {CIFAR10_FOLDER} folder, or an ImageFolder tree or "
                f"archive (train/<class>/*, test/<class>/*); or put the tarball at {dest}."
            ) from error
        if digest.hexdigest() != expected_md5:
            raise ChecksumError(f"download of {url} ({size} bytes)", expected_md5, digest.hexdigest())
        print(f"downloaded {url}: {size} bytes, md5 {expected_md5} verified", file=sys.stderr)
    return dest


# ---------------------------------------------------------------- files of folders and archives

def _archive_kind(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ValueError(f"{path}: not a folder nor a readable .tar, .tar.gz/.tgz or .zip archive "
                     "(truncated, corrupt or another format)")


def _normalize(name: str) -> str | None:
    """An archive member's path relative to the archive root; None for metadata (__MACOSX, .files)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return "/".join(parts)


def _tar_files(path, want: Callable[[str], bool] = lambda name: False
               ) -> Iterator[tuple[str, bytes | None]]:
    """(path, bytes or None) of each regular file of a (compressed) tar archive, in archive order.

    One sequential pass (tarfile's stream mode); only the files `want` accepts are read out.
    """
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile():
                    yield member.name, archive.extractfile(member).read() if want(member.name) else None
    except (EOFError, OSError, tarfile.TarError) as error:
        raise tarfile.ReadError(f"{path}: corrupt or truncated archive ({error})") from None


@functools.lru_cache(maxsize=8)
def _archive_names(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """Normalized path -> member name of each file in an archive (cached per file version)."""
    names = {}
    if _archive_kind(Path(path)) == "zip":
        with zipfile.ZipFile(path) as archive:
            members = [(i.filename, not i.is_dir()) for i in archive.infolist()]
    else:
        members = [(name, True) for name, _ in _tar_files(path)]
    for member, is_file in members:
        if is_file and (key := _normalize(member)) is not None:
            names[key] = member
    return names


class Tree:
    """The files of a folder or of a .tar, .tar.gz/.tgz or .zip archive, by relative POSIX path.

    Nothing is extracted to disk: archive members are read into memory, a tar archive in one
    sequential pass whatever the order asked for.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        self.kind = "dir" if self.path.is_dir() else _archive_kind(self.path)

    def names(self) -> list[str]:
        """Every file's relative path, sorted (hidden files and __MACOSX left out)."""
        if self.kind != "dir":
            return sorted(self._members())
        found = []
        for folder, dirs, files in os.walk(self.path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
            rel = Path(folder).relative_to(self.path).as_posix()
            found += [f if rel == "." else f"{rel}/{f}" for f in files if not f.startswith(".")]
        return sorted(found)

    def _members(self) -> dict[str, str]:
        stat = self.path.stat()
        return _archive_names(str(self.path), stat.st_size, stat.st_mtime_ns)

    def where(self, name: str) -> str:
        """A file of the tree as error messages name it."""
        return str(self.path / name) if self.kind == "dir" else f"{self.path} (member {name})"

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each file in `names`; a tar archive yields them in archive order."""
        wanted = set(names)
        if self.kind == "dir":
            for name in wanted:
                yield name, (self.path / name).read_bytes()
        elif self.kind == "zip":
            members = self._members()
            with zipfile.ZipFile(self.path) as archive:
                for name in wanted:
                    yield name, archive.read(members[name])
        else:
            members = self._members()
            raw = {members[name]: name for name in wanted}
            for member, blob in _tar_files(self.path, raw.__contains__):
                if blob is not None and raw.get(member) in wanted:
                    wanted.discard(raw[member])
                    yield raw[member], blob
            if wanted:
                raise FileNotFoundError(f"{self.path}: missing {sorted(wanted)[:5]}")


# ---------------------------------------------------------------- decoding

def center_crop(image, size: int):
    """The central size x size square of a PIL image (torchvision's CenterCrop offsets)."""
    width, height = image.size
    if size > width or size > height:
        raise ValueError(f"crop {size} is larger than the {width}x{height} image")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


SHORT_SIDE = "short_side"  # a crop to the central square of each image's short side


def _fit(image, crop: int | str | None, size: int | None):
    """`image` center-cropped to `crop` (SHORT_SIDE: its short side), then resized to `size`; on a square
    image of side `size` (ArtBench-10's 256 px) this is the identity, as torchvision's Resize(size) +
    CenterCrop(size) are."""
    from PIL import Image

    if crop == SHORT_SIDE:
        crop = min(image.size)
    if crop is not None:
        image = center_crop(image, crop)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return image


def _decode(items: Iterable[tuple[int, str, bytes]], n: int, crop=None, size=None,
            expect: tuple[int, int] | None = None) -> np.ndarray:
    """Decode (position, file, bytes) items to RGB into one preallocated uint8 array (n, H, W, 3).

    Every image must decode and come out at one size: `expect` (width, height) when given, else the
    first image's. Errors name the file.
    """
    from PIL import Image

    out, first = None, None
    for position, name, blob in items:
        try:
            with Image.open(io.BytesIO(blob)) as image:
                pixels = np.asarray(_fit(image.convert("RGB"), crop, size))
        except Image.UnidentifiedImageError:
            raise ValueError(f"{name}: unreadable image (not a format PIL can decode)") from None
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for cut or corrupt files
            raise ValueError(f"{name}: unreadable image ({error})") from None
        shape = pixels.shape[1::-1]  # (width, height)
        if expect is not None and shape != expect:
            raise ValueError(f"{name}: {shape[0]}x{shape[1]} pixels; expected {expect[0]}x{expect[1]}, "
                             "or set image_size to resize every image")
        if out is None:
            out, first = np.empty((n, *pixels.shape), dtype=np.uint8), name
        elif pixels.shape != out.shape[1:]:
            raise ValueError(f"{name}: {shape[0]}x{shape[1]} pixels, but {first} has "
                             f"{out.shape[2]}x{out.shape[1]}; set image_size to resize them all")
        out[position] = pixels
    return np.empty((0, 0, 0, 3), dtype=np.uint8) if out is None else out


def _resize_array(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(_fit(Image.fromarray(image), None, size))
    return out


# ---------------------------------------------------------------- ImageFolder

def _split_root(names: Sequence[str], split: str, where) -> str:
    """The prefix under which `<split>/` lies: '' or a single top-level folder."""
    if any(n.startswith(f"{split}/") for n in names):
        return ""
    tops = sorted({n.split("/")[0] for n in names if "/" in n})
    if len(tops) == 1 and any(n.startswith(f"{tops[0]}/{split}/") for n in names):
        return f"{tops[0]}/"
    raise FileNotFoundError(f"{where}: no '{split}/' folder at the top or under one top-level "
                            f"folder (found: {', '.join(tops[:10]) or 'no folders'})")


def _class_files(tree: Tree, split: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths under `<split>/<class>/`, classes sorted."""
    names = tree.names()
    prefix = _split_root(names, split, tree.path) + f"{split}/"
    found: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(prefix) and name.lower().endswith(IMAGE_EXTENSIONS):
            rest = name[len(prefix):]
            if "/" in rest:
                found.setdefault(rest.split("/")[0], []).append(name)
    return {c: sorted(found[c]) for c in sorted(found)}


def _check_classes(classes, available: Sequence[str], where) -> tuple[str, ...]:
    if classes is None:
        return tuple(available)
    if isinstance(classes, str) or not len(classes):
        raise ValueError(f"classes: expected a non-empty list of class names, got {classes!r}")
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: {list(classes)} names a class twice")
    missing = [c for c in classes if c not in available]
    if missing:
        raise ValueError(f"classes: {missing} not in {where} (available: {', '.join(available)})")
    return classes


def open_image_folder(path, split: str, classes=None, crop: int | str | None = None,
                      size: int | None = None) -> SplitSource:
    """List `<split>/<class>/*` of a folder or archive; labels follow `classes` (default: all, sorted).

    Files are ordered by sorted class name then sorted file name; only the classes asked for are
    decoded. Images are converted to RGB, center-cropped to `crop` (pixels, or SHORT_SIDE) and resized
    to `size` (bilinear) when given.
    """
    tree = Tree(path)
    return _image_folder(tree, split, _class_files(tree, split), classes, crop, size)


def _image_folder(tree: Tree, split: str, files: dict[str, list[str]], classes, crop, size,
                  expect: tuple[int, int] | None = None) -> SplitSource:
    if not files:
        raise FileNotFoundError(f"{tree.path}: no images under '{split}/<class>/'")
    classes = _check_classes(classes, list(files), f"{tree.path} ({split})")
    start = np.cumsum([0, *(len(f) for f in files.values())])
    offset = dict(zip(files, start[:-1]))
    names = [name for c in classes for name in files[c]]
    labels = np.concatenate([np.full(len(files[c]), k, dtype=np.int64) for k, c in enumerate(classes)])
    index = np.concatenate([offset[c] + np.arange(len(files[c]), dtype=np.int64) for c in classes])

    def read(positions: np.ndarray) -> np.ndarray:
        where = {}
        for i, p in enumerate(positions):
            where.setdefault(names[p], []).append(i)
        items = ((i, tree.where(name), blob) for name, blob in tree.read(where) for i in where[name])
        return _decode(items, len(positions), crop, size, expect)

    return SplitSource(labels, index, classes, read)


def load_image_folder(path, split: str, classes=None, crop: int | None = None,
                      size: int | None = None) -> Split:
    """Every image of `<split>/<class>/*` (see `open_image_folder`)."""
    return open_image_folder(path, split, classes, crop, size).load()


# ---------------------------------------------------------------- CIFAR-10

def _unpickle_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    entry = pickle.loads(blob, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{name}: expected data (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(CIFAR10_CLASSES):
        raise ValueError(f"{name}: labels outside 0..{len(CIFAR10_CLASSES) - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows hold R, G, B planes


def _batches(read: Callable[[str], bytes], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_unpickle_batch(read(name), name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _batch_folder(path: Path) -> Path | None:
    for folder in (path, path / CIFAR10_FOLDER):
        if (folder / "data_batch_1").is_file():
            return folder
    return None


def cifar10_layout(path, expected_md5: str = CIFAR10_MD5) -> str:
    """'tarball', 'batches' (extracted folder) or 'image_folder' (tree or archive), from what `path` is.

    A file is the official tarball when its md5 matches; another archive holding python batches
    raises ChecksumError (it is never unpacked), any other archive is read as an ImageFolder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return "batches" if _batch_folder(path) else "image_folder"
    actual = md5sum(path)
    if actual == expected_md5:
        return "tarball"
    try:
        names = Tree(path)._members()
    except (ValueError, OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        if "cifar-10-python" in path.name:
            raise ChecksumError(path, expected_md5, actual) from None
        message = str(error)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if any(posixpath.basename(n) in CIFAR10_BATCH_MD5 for n in names):
        raise ChecksumError(path, expected_md5, actual)
    return "image_folder"


def open_cifar10(path, classes=None, size: int | None = None, expected_md5: str = CIFAR10_MD5,
                 batch_md5: dict = CIFAR10_BATCH_MD5) -> dict[str, SplitSource]:
    """CIFAR-10's train and test splits from a local source (see `cifar10_layout`).

    `classes`: a subset of CIFAR10_CLASSES; labels are positions in it (default: all ten, in the
    canonical order). `size`: resize (bilinear) to size x size. The tarball's md5 (`expected_md5`)
    and each extracted batch's md5 (`batch_md5`) are checked before anything is unpickled, always.
    An ImageFolder copy needs `<split>/<class>/` for each class used, images 32x32 unless `size`.
    """
    path = Path(path)
    layout = cifar10_layout(path, expected_md5)
    if layout == "image_folder":
        classes = _check_classes(classes, CIFAR10_CLASSES, "CIFAR-10")
        tree, sources = Tree(path), {}
        for split in ("train", "test"):
            files = _class_files(tree, split)
            if unknown := sorted(set(files) - set(CIFAR10_CLASSES)):
                raise ValueError(f"{path} ({split}): class folders {unknown} are not CIFAR-10 classes "
                                 f"({', '.join(CIFAR10_CLASSES)})")
            if missing := [c for c in classes if c not in files]:
                raise FileNotFoundError(f"{tree.where(f'{split}/{missing[0]}/')}: no such class folder, or no "
                                        f"images in it; a CIFAR-10 ImageFolder needs {split}/<class>/ for "
                                        f"every class used (missing: {', '.join(missing)})")
            sources[split] = _image_folder(tree, split, files, classes, None, size,
                                           (32, 32) if size is None else None)
        return sources

    classes = _check_classes(classes, CIFAR10_CLASSES, "CIFAR-10")
    wanted = [name for names in CIFAR10_BATCHES.values() for name in names]
    if layout == "tarball":  # md5 verified: read the six batches in one pass, nothing written
        blobs = {}
        accept = lambda member: posixpath.basename(_normalize(member) or "") in wanted  # noqa: E731
        for member, blob in _tar_files(path, accept):
            if blob is not None:
                blobs[posixpath.basename(_normalize(member))] = blob
        if missing := [name for name in wanted if name not in blobs]:
            raise FileNotFoundError(f"{path}: no {CIFAR10_FOLDER}/{missing[0]} in the archive")
    else:  # every file checked before any is unpickled
        folder = _batch_folder(path)
        blobs = {}
        for name in wanted:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name}")
            blobs[name] = (folder / name).read_bytes()
            actual = hashlib.md5(blobs[name]).hexdigest()
            if actual != batch_md5[name]:
                raise ChecksumError(folder / name, batch_md5[name], actual)
    data = {split: _batches(blobs.__getitem__, names) for split, names in CIFAR10_BATCHES.items()}
    del blobs

    relabel = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int64)
    relabel[[CIFAR10_CLASSES.index(c) for c in classes]] = np.arange(len(classes))
    sources = {}
    for split, (images, labels) in data.items():
        index = np.flatnonzero(relabel[labels] >= 0)
        kept = images[index]
        sources[split] = SplitSource(relabel[labels[index]], index, classes,
                                     lambda positions, kept=kept: _resize_array(kept[positions], size))
    return sources


def load_cifar10(path, classes=None, size: int | None = None, expected_md5: str = CIFAR10_MD5,
                 batch_md5: dict = CIFAR10_BATCH_MD5) -> dict[str, Split]:
    """{"train": Split, "test": Split} of CIFAR-10 from a local source (see `open_cifar10`)."""
    sources = open_cifar10(path, classes, size, expected_md5, batch_md5)
    return {split: source.load() for split, source in sources.items()}


# ---------------------------------------------------------------- CelebA

def celeba_help(root) -> str:
    return (
        f"CelebA is not at {root}. It cannot be downloaded without a browser: on "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html follow the Google Drive (or Baidu Drive) "
        "link of 'Align&Cropped Images' and download\n"
        "  Img/img_align_celeba.zip      (1.4 GB, md5 00d2c5bc6d35e252742224ab0c1e8fcb)\n"
        "    https://drive.google.com/file/d/0B7EVK8r0v71pZjFTYXZWM3FlRnM\n"
        "  Eval/list_eval_partition.txt  (md5 d32c9cbf5e040fd4025c592c306e6668)\n"
        "    https://drive.google.com/file/d/0B7EVK8r0v71pY0NSMzRuSXJEVkk\n"
        f"then `unzip img_align_celeba.zip -d {root}` and copy list_eval_partition.txt into {root}, "
        f"so that {root}/img_align_celeba/000001.jpg and {root}/list_eval_partition.txt exist "
        "(or set `dataset.path` to the folder that holds them)."
    )


ARTBENCH_URL = "https://github.com/liaopeiyuan/artbench"


def artbench_help(root) -> str:
    """One line: what `dataset.path` must hold for source artbench and where ArtBench-10 is published."""
    return (f"expected ArtBench-10's 256x256 ImageFolder release (artbench-10-imagefolder-split.tar, linked "
            f"from {ARTBENCH_URL}) or the folder it extracts to, holding train/<style>/*.jpg and "
            f"test/<style>/*.jpg (e.g. {'<path>' if root is None else root}/train/ukiyo_e/)")


def open_celeba(root, split: str = "train", crop: int | None = 140,
                size: int | None = 64) -> SplitSource:
    """CelebA's `split` (train, valid or test of list_eval_partition.txt) from its official layout.

    Images are center-cropped to `crop` then resized to `size` (bilinear) on reading; labels are
    all 0 (one class).
    """
    root = Path(root)
    images, partition = root / "img_align_celeba", root / "list_eval_partition.txt"
    if not (images.is_dir() and partition.is_file()):
        raise FileNotFoundError(celeba_help(root))
    if split not in CELEBA_PARTITIONS:
        raise ValueError(f"CelebA split '{split}': expected one of {', '.join(CELEBA_PARTITIONS)}")
    names = []
    for line_number, line in enumerate(partition.read_text().splitlines(), 1):
        if line.strip():
            try:
                name, part = line.split()
                part = int(part)
            except ValueError:
                raise ValueError(f"{partition}:{line_number}: expected '<file> <0|1|2>', "
                                 f"got {line!r}") from None
            if part == CELEBA_PARTITIONS[split]:
                names.append(name)

    def read(positions: np.ndarray) -> np.ndarray:
        items = ((i, str(images / names[p]), _read_file(images / names[p])) for i, p in enumerate(positions))
        return _decode(items, len(positions), crop, size)

    return SplitSource(np.zeros(len(names), dtype=np.int64), np.arange(len(names), dtype=np.int64),
                       ("face",), read)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: listed in list_eval_partition.txt but missing") from None


def load_celeba(root, split: str = "train", crop: int | None = 140, size: int | None = 64) -> Split:
    """Every image of a CelebA split (see `open_celeba`)."""
    return open_celeba(root, split, crop, size).load()
