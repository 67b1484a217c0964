"""Datasets for ``dtl-train``: built-in offline sets and the usual folder layouts.

* ``elpv`` / ``elpv-binary`` — PyPI ``elpv-dataset``: 2,624 grayscale 300×300 solar-cell
  electroluminescence images with a defect probability in {0, 1/3, 2/3, 1}. ``elpv`` maps
  it to 4 classes (``round(3·p)``); ``elpv-binary`` to functional (p < 0.5) / defective.
  Split: fixed, stratified, 75 % train / 25 % test, seed 0 (independent of ``--seed``).
* ``fashion-mnist`` — Debian ``dataset-fashion-mnist`` (idx files): 60k / 10k, 10 classes.
* ``vtab:NAME`` — VTAB-1K: ``<root>/NAME/{train800val200,test}.txt`` (SPEC §5).
* ``fewshot:NAME`` — ``<root>/NAME/annotations/train_meta.list.num_shot_<k>.seed_<s>`` and
  ``test_meta.list`` (paths relative to ``<root>/NAME``).
* ``folder`` — an ImageFolder tree ``<root>/{train,test}/<class>/<image>`` (``val`` is
  accepted for ``test``).

Transform (:mod:`~dtl_kernels.train.transforms`, timm's own): gray → 3 channels, resize to
the model input (by default the whole image to a square, with the weights' filter),
scale to [0, 1], normalise with the weights' mean / std; training may add timm's
augmentation (off by default). 16-bit images are scaled to 8 bits (``v · 255 / 65535``),
float images from [0, 1] (or, outside that range, from their own min…max), never clipped.

File-based datasets (``vtab:`` / ``fewshot:`` / ``folder``) are streamed: the file list
is read and every image's header checked up front (missing, unreadable or non-image files
stop the run before training, naming the file), and images are decoded per batch (in
``--workers`` processes), so a split larger than RAM trains. A file that fails to decode
later (a truncated body) is a :class:`DataError` naming it. Built-in sets live in memory.
Every other problem (missing list file, malformed line, label out of range, empty split,
a bad idx file) is raised before training starts, naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._untrusted import NotRegularFile, open_regular
from ..models.choices import LIMITS
from .transforms import IMAGENET, Augmentation, Preprocessing, to_tensor

IMAGENET_MEAN, IMAGENET_STD = IMAGENET
HALF = (0.5, 0.5, 0.5)
# The suffixes of image files, and Pillow's format for each. A file is decoded only as one
# of these formats, so no other Pillow plugin parses a user's file (EPS runs Ghostscript
# on it; ICO, TGA… would be read under any image suffix otherwise)
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".ppm": "PPM",
                 ".pgm": "PPM", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}  # fmt: skip
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
# and GIF, a suffix not listed but a format often found behind .jpg / .png in collected data
READ_FORMATS = sorted({*IMAGE_FORMATS.values(), "GIF"})
ELPV_TEST_FRACTION = 0.25
ELPV_SPLIT_SEED = 0
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DataError(ValueError):
    """A dataset problem found before training: names the file and what is wrong."""


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std of ``--normalize imagenet`` or ``half``."""
    return (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else (HALF, HALF)


# -- tensors in memory ---------------------------------------------------------------------
class TensorImages(Dataset):
    """Images already decoded and resized, kept as ``uint8`` ``(N, C, S, S)`` (C = 1 or 3);
    normalised to float on access (gray is repeated to 3 channels), or first augmented by
    ``augment`` (a PIL → tensor transform, :meth:`Augmentation.image_transform`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, classes=None,
                 augment=None):  # fmt: skip
        if len(images) == 0:
            raise DataError("empty split")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.classes = classes
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> TensorImages:
        out = TensorImages.__new__(TensorImages)
        out.images, out.labels = self.images[index], self.labels[index]
        out.mean, out.std, out.classes = self.mean, self.std, self.classes
        out.augment = self.augment
        return out

    def __getitem__(self, i: int):
        if self.augment is not None:
            return self.augment(_pil_rgb(self.images[i])), int(self.labels[i])
        return to_tensor(self.images[i], self.mean, self.std), int(self.labels[i])


def _pil_rgb(image: torch.Tensor):
    """``(C, S, S)`` uint8 (C = 1 or 3) → an RGB PIL image."""
    from PIL import Image

    arr = image.numpy()
    return Image.fromarray(arr[0]).convert("RGB") if arr.shape[0] == 1 else Image.fromarray(
        np.ascontiguousarray(arr.transpose(1, 2, 0))
    )  # fmt: skip


def resize_uint8(images: torch.Tensor, size: int, resize=None) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 → ``(N, C, size, size)`` uint8, each channel through
    ``resize`` (a PIL transform: :meth:`Preprocessing.resize`; default: PIL's bicubic
    filter on the whole image, the same resampling as for image files)."""
    from PIL import Image

    if resize is None and images.shape[-2:] == (size, size):
        return images
    if resize is None:
        resize = functools.partial(Image.Image.resize, size=(size, size), resample=Image.BICUBIC)
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i, img in enumerate(images.numpy()):
        for c in range(img.shape[0]):
            small = resize(Image.fromarray(img[c]))
            out[i, c] = torch.from_numpy(np.array(small))
    return out


# -- image files ---------------------------------------------------------------------------
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


#: how many times longer than its short side an image's long side may be where the resize
#: keeps the aspect (timm's center / border crop): it makes the long side that many times
#: the model's input (a 274-byte 200000×1 PNG took 1.3 GB); a squashing resize has no limit
MAX_ASPECT = 64


def check_aspect(img, keeps_aspect: bool) -> None:
    """``ValueError`` for an image with no pixels, or past :data:`MAX_ASPECT` when its resize
    ``keeps_aspect`` (:meth:`Preprocessing.keeps_aspect`)."""
    check_aspect_of_size(img.size, keeps_aspect)


def check_aspect_of_size(size: tuple[int, int], keeps_aspect: bool) -> None:
    """:func:`check_aspect` of an image ``size`` ``(w, h)`` read before."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"{w}x{h} pixels")
    if keeps_aspect and max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w}x{h} pixels: more than {MAX_ASPECT} times as long as it is wide")


def eight_bit(img):
    """A PIL image as 8-bit ``RGB``: 16-bit gray scaled by 255/65535, float gray from
    [0, 1] (or from its own min…max when outside), 32-bit integer gray beyond the 16-bit
    range from its own min…max, never clipped as ``convert("RGB")`` alone would; other
    modes through ``convert("RGB")``. It holds the pixels in their own dtype, the 8-bit
    result and one float64 block of :data:`_SCALE_BLOCK` pixels: 4 bytes a 16-bit pixel,
    8 a 32-bit one at the peak (float64 copies of the whole image took 32: 1.1 GB for a
    6000×6000 16-bit PNG), with the same result bit for bit."""
    from PIL import Image

    if img.mode not in _HIGH_BIT_MODES:
        return img.convert("RGB")
    arr = np.asarray(img)  # uint16, int32 or float32: 2 or 4 bytes a pixel
    if img.mode.startswith("I;16"):
        return Image.fromarray(_sixteen_to_eight()[arr], mode="L").convert("RGB")
    low, high = arr.min(), arr.max()
    if not (np.isfinite(low) and np.isfinite(high)):  # a NaN or ±inf reaches min or max
        raise ValueError("the image holds NaN or infinite values")
    if img.mode == "I" and low >= 0 and high <= 65535:  # 16-bit (a PNG / TIFF may open as I)
        gray = _sixteen_to_eight()[arr]
    elif img.mode == "F" and low >= 0 and high <= 1:
        gray = _scaled(arr, 0.0, 1.0)
    else:  # float, or 32-bit integers beyond 16 bits: their own min…max
        gray = _scaled(arr, float(low), float(high))
    return Image.fromarray(gray, mode="L").convert("RGB")


#: pixels scaled at a time by :func:`_scaled` (its float64 block: 8 MiB)
_SCALE_BLOCK = 2**20


def _scaled(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """``arr`` mapped from ``low…high`` to 0…255 (rounded half to even, clipped) as
    ``uint8``: in float64 as ever (the same numbers bit for bit), a block at a time."""
    scale = 255.0 / max(high - low, 1e-12)
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    work = np.empty(min(flat.size, _SCALE_BLOCK), dtype=np.float64)  # one block, reused
    for start in range(0, flat.size, _SCALE_BLOCK):
        part = flat[start : start + _SCALE_BLOCK]
        block = work[: part.size]
        np.copyto(block, part)  # exact: every uint16, int32 and float32 is a float64
        block -= low
        block *= scale
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[start : start + _SCALE_BLOCK] = block  # whole numbers in 0…255: cast exactly
    return out.reshape(arr.shape)


@functools.cache
def _sixteen_to_eight() -> np.ndarray:
    """The 8-bit value of each 16-bit one (:func:`_scaled` over 0…65535), looked up per
    pixel."""
    return _scaled(np.arange(65536), 0.0, 65535.0)


def load_image(path: Path, size: int, resize=None, keeps_aspect: bool = False) -> torch.Tensor:
    """Read one image file → ``(3, size, size)`` uint8, resized by ``resize`` (a PIL
    transform, :meth:`Preprocessing.resize`; default: the whole image, bicubic; whether it
    ``keeps_aspect``: :func:`check_aspect`); ``DataError`` naming the file."""
    from PIL import Image

    with opened_image(path) as img:
        check_aspect(img, keeps_aspect)
        img = eight_bit(img)
        img = resize(img) if resize is not None else img.resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def check_image_header(path: Path, keeps_aspect: bool = False) -> tuple[int, int]:
    """Open ``path`` far enough to know it is an image (no decoding) and its size one the
    resize takes (:func:`check_aspect`); ``DataError``. Returns its size ``(w, h)``."""
    with opened_image(path) as img:
        check_aspect(img, keeps_aspect)
        return img.size


@contextlib.contextmanager
def opened_image(path: str | bytes | os.PathLike):
    """``Image.open(path)`` of an image file from a user, for every reader of one
    (training, ``dtl-predict``): any failure, also one in the ``with`` block (a corrupt
    body found while decoding), is a ``DataError`` naming the file. Only a regular file is
    opened: opening a FIFO blocks until something writes to it, i.e. forever. It is read
    only as one of the formats of :data:`IMAGE_FORMATS` (whatever its suffix: a PNG saved
    as ``.jpg`` is common and harmless), so that no other Pillow plugin parses a user's
    file; a file of another format is refused naming the format it holds."""
    from PIL import Image, UnidentifiedImageError

    name = os.fsdecode(path)
    try:  # checked on the open descriptor: a FIFO swapped in after a check by name blocks
        file = open_regular(path)
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except NotRegularFile:
        raise DataError(f"cannot read image: {name} is not a regular file (a FIFO, a device, "
                        "a folder?)") from None  # fmt: skip
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    try:
        with file, Image.open(file, formats=READ_FORMATS) as img:
            yield img
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        allowed = f"one of {', '.join(READ_FORMATS)}, the formats read"
        found = _format_by_signature(name)
        if found is None or found in READ_FORMATS:  # no known format, or a corrupt one
            # (Pillow's own message names the open file object, not the path)
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: not an image "
                            f"Pillow identifies (read as {allowed})") from exc  # fmt: skip
        raise DataError(f"cannot read image {path}: its first bytes are those of the {found} "
                        f"format, not {allowed}") from None  # fmt: skip
    except Exception as exc:  # PIL raises several types for corrupt files
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _format_by_signature(path: str) -> str | None:
    """The Pillow format whose signature starts the file (its plugins' checks of the first
    16 bytes, as ``Image.open`` makes them: nothing is parsed); ``None``: none matches."""
    from PIL import Image

    Image.init()
    try:
        with open_regular(path) as f:
            prefix = f.read(16)
    except (OSError, ValueError):
        return None
    for name, (_, accept) in Image.OPEN.items():
        try:  # a plugin's check may assume more bytes than a short file has (DIB's: 4)
            if accept is not None and accept(prefix) is True:
                return name
        except Exception:
            continue
    return None


class FileImages(Dataset):
    """Image files decoded on access: item ``i`` is ``(image (3, S, S) float32, label)``.

    Holds only the paths and labels (``labels``: ``(N,)`` int64), so memory does not grow
    with the split; a ``DataLoader`` with workers decodes batches in parallel.
    """

    def __init__(self, samples: list[tuple[Path, int]], size: int, mean, std, classes=None,
                 prep: Preprocessing | None = None, augment=None):  # fmt: skip
        if not samples:
            raise DataError("empty split")
        self.paths = [Path(p) for p, _ in samples]
        self.labels = torch.tensor([int(label) for _, label in samples], dtype=torch.long)
        self.size = int(size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.classes = classes
        # the resize of ``prep`` (None: the whole image, bicubic); named in the fingerprint
        # only when it is another (earlier fingerprints stay valid)
        self.resize = prep.resize() if prep is not None else None
        self.keeps_aspect = prep is not None and prep.keeps_aspect()
        default = prep is None or (prep.whole_image() and prep.interpolation == "bicubic")
        self.resize_id = "" if default else repr(prep.identity().get("resize"))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> FileImages:
        out = FileImages.__new__(FileImages)
        out.__dict__.update(self.__dict__)
        out.__dict__.pop("_data_fingerprint", None)  # another subset, another fingerprint
        out.paths = [self.paths[i] for i in index.tolist()]
        out.labels = self.labels[index]
        return out

    def __getitem__(self, i: int):
        image = load_image(self.paths[i], self.size, self.resize, self.keeps_aspect)
        if self.augment is not None:
            return self.augment(_pil_rgb(image)), int(self.labels[i])
        return to_tensor(image, self.mean, self.std), int(self.labels[i])

    def fingerprint(self) -> str:
        """sha256 over every file's path, size, modification time, label and a sampled
        hash of its bytes (:func:`sampled_file_hash`), without decoding anything: a
        replaced or edited file changes it, also one of the same size whose modification
        time was put back if the edit reaches the sampled 4 KiB at its start, middle or
        end (an edit elsewhere that keeps size and time is not seen: whole files are not
        read, as a large dataset would cost a full read per run)."""
        import hashlib

        h = hashlib.sha256(f"{self.size}|{self.mean.flatten().tolist()}|"
                           f"{self.std.flatten().tolist()}|{self.resize_id}".encode())  # fmt: skip
        for p, label in zip(self.paths, self.labels.tolist(), strict=True):
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{label}|{sampled_file_hash(p)}\n"
                     .encode())  # fmt: skip
        return h.hexdigest()


SAMPLE_BYTES = 4096  # per sampled range of a file's content


def sampled_file_hash(path: Path, chunk: int = SAMPLE_BYTES) -> str:
    """sha256 of a file's first, middle and last ``chunk`` bytes (all of a small file):
    cheap for large datasets, and a changed image almost always differs there (its
    header, or compressed data that changes throughout)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        starts = [0] if size <= 3 * chunk else [0, (size - chunk) // 2, size - chunk]
        for start in starts:
            f.seek(start)
            h.update(f.read(chunk if len(starts) > 1 else size))
    return h.hexdigest()


def data_fingerprint(dataset: Dataset) -> dict:
    """What identifies a split's data (cache keys, ``--resume``): the sample count and a
    content hash: of every file (:meth:`FileImages.fingerprint`), of all decoded images and
    labels when the dataset holds them as tensors (``images`` / ``labels``), else of its
    first and last samples. Computed once per dataset object."""
    memo = getattr(dataset, "_data_fingerprint", None)
    if memo is not None:
        return dict(memo)
    import hashlib

    h = hashlib.sha256()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if callable(getattr(dataset, "fingerprint", None)):  # files
        h.update(dataset.fingerprint().encode())
        content = "files"
    elif isinstance(images, torch.Tensor):
        h.update(f"{images.dtype}|{tuple(images.shape)}|".encode())
        h.update(images.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        for attr in ("mean", "std"):
            v = getattr(dataset, attr, None)
            if isinstance(v, torch.Tensor):
                h.update(f"{attr}={v.flatten().tolist()}".encode())
        content = "images"
    else:
        for i in sorted({0, len(dataset) - 1}):
            x = dataset[i][0]
            if not isinstance(x, torch.Tensor):
                raise DataError(f"the dataset returns {type(x).__name__}, not a tensor")
            x = x.contiguous()
            h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().data)
        content = "first+last samples"
    if isinstance(labels, torch.Tensor):
        h.update(labels.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    memo = {"samples": len(dataset), "content": content, "content_sha256": h.hexdigest()}
    try:
        dataset._data_fingerprint = memo
    except AttributeError:  # a dataset with __slots__: computed again next time
        pass
    return dict(memo)


def file_images(samples: list[tuple[Path, int]], size: int, mean, std, classes=None,
                prep: Preprocessing | None = None, augment=None):  # fmt: skip
    """Check every file of ``(path, label)`` now (exists, has an image header: a bad one
    stops the run before training, naming the file) → a streaming :class:`FileImages`."""
    if not samples:
        raise DataError("empty split")
    keeps = prep is not None and prep.keeps_aspect()
    for p, _ in samples:
        check_image_header(p, keeps)
    return FileImages(samples, size, mean, std, classes, prep, augment)


#: labels a list file may give: as many classes as ``--num-classes`` (and an adapter) allows
MAX_CLASSES = LIMITS["num_classes"]


def read_list(path: Path, base: Path) -> list[tuple[Path, int]]:
    """Lines ``<relative path> <label>`` → samples; ``DataError`` for a missing file or a
    malformed line (with its number)."""
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"list file {path} is not UTF-8 text") from None
    samples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            label = int(parts[1])
        except (IndexError, ValueError) as exc:
            raise DataError(f"{path}:{n}: expected '<path> <label>', got {line[:200]!r}") from exc
        if not 0 <= label < MAX_CLASSES:  # the class count is the largest label + 1
            raise DataError(f"{path}:{n}: label {parts[1][:40]} is not in 0…{MAX_CLASSES - 1}")
        samples.append((base / parts[0], label))
    if not samples:
        raise DataError(f"list file {path} is empty")
    return samples


def images_under(folder: Path) -> list[Path]:
    """The files with an image's suffix under ``folder`` (recursively, sorted); one that is
    not a readable file (a dangling link, a FIFO, a device) is a ``DataError``, not a
    sample left out without a word. Linked subfolders are followed (``rglob`` skipped them
    without a word), each real folder once: one reached without a link keeps that path, a
    link into a folder already listed (a loop) adds nothing, and a link to a folder that
    holds ``folder`` itself (its parent, ``/``) is a ``DataError``: it would list what is
    beside ``folder`` too (another class's images, under this class's label)."""
    return _images_and_folders(folder)[0]


def _images_and_folders(folder: Path) -> tuple[list[Path], set[str]]:
    """:func:`images_under`, and the real paths of the folders it listed."""
    found, seen = [], set()
    inside = Path(os.path.realpath(folder))
    tops = [folder]  # the folder, then, round by round, the linked folders met on the way
    while tops:
        links = []
        for top in tops:
            # os.walk enters no link; the links to folders are kept for the next round
            for where, subfolders, files in os.walk(top, onerror=_unreadable_folder):
                real = os.path.realpath(where)
                if real in seen:
                    subfolders.clear()
                    continue
                seen.add(real)
                entered = []  # the subfolders os.walk goes on into: those not linked
                for d in sorted(subfolders):
                    link = os.path.join(where, d)
                    if not os.path.islink(link):
                        entered.append(d)
                        continue
                    target = Path(os.path.realpath(link))
                    if inside != target and inside.is_relative_to(target):
                        raise DataError(f"{link} links to {target}, which holds {folder} "
                                        "itself: its other images would be listed too "
                                        "(remove the link)")  # fmt: skip
                    links.append(link)
                subfolders[:] = entered
                found += [Path(where, f) for f in files]
        tops = sorted(links)
    images = []
    for f in sorted(found):
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not f.is_file():
            raise DataError(
                f"{f} has an image's name but is not a readable file (a dangling link, a "
                "FIFO or a device?): remove or restore it"
            )
        images.append(f)
    return images, seen


def _unreadable_folder(exc: OSError) -> None:
    """os.walk's error hook: a folder it cannot list would be left out without a word."""
    raise DataError(
        f"cannot list the folder {exc.filename}: {exc.strerror or exc} (its images "
        "would be left out: fix its permissions, or move it out of the image "
        "folder)"
    ) from exc


def scan_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    found, owner = {}, {}  # owner: the class each real folder was listed for
    for name in classes:
        found[name], folders = _images_and_folders(root / name)
        for real in folders:
            other = owner.setdefault(real, name)
            if other != name:  # a link: its images would be trained under both labels
                raise DataError(f"the folder {real} is listed for class '{other}' and for "
                                f"class '{name}' (through a link): remove the link")  # fmt: skip
    if not any(found.values()):
        raise DataError(f"no images under {root} (expected {root}/<class>/<image>)")
    for name in classes:  # an empty class's label would shift every later class's
        if not found[name]:
            raise DataError(
                f"class folder {root / name} holds no images: add some or remove the folder"
            )
    samples = [(f, label) for label, name in enumerate(classes) for f in found[name]]
    return samples, classes


def check_labels(splits: dict[str, torch.Tensor], num_classes: int | None, where: str) -> int:
    """``num_classes`` (given or ``max label + 1``); ``DataError`` if a label is outside."""
    top = max(int(lab.max()) for lab in splits.values())
    n = top + 1 if num_classes is None else num_classes
    for name, lab in splits.items():
        bad = ((lab < 0) | (lab >= n)).nonzero().flatten()
        if len(bad):
            raise DataError(
                f"{where}: {name} split has label {int(lab[bad[0]])} (sample {int(bad[0])}) "
                f"outside the class range 0…{n - 1}"
            )
    return n


# -- built-in datasets ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def elpv_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (2624, 300, 300) uint8, defect probabilities)`` from ``elpv-dataset``."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as exc:
        raise DataError(
            "the elpv dataset needs the PyPI package: pip install elpv-dataset"
        ) from exc
    images, probs, _types = load_dataset()
    return images, probs


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Indices ``(train, test)``: per class, a seeded shuffle, the first share is test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(train), np.sort(test)


def elpv(size: int, mean, std, binary: bool = False, resize=None, splits=("train", "test"),
         augment=None):  # fmt: skip
    """``(train, test)`` of elpv as :class:`TensorImages` (``None`` for a split not in
    ``splits``: its images are not resized); ``resize`` as :func:`resize_uint8` takes it,
    ``augment`` for the training split."""
    images, probs = elpv_arrays()
    labels = (probs >= 0.5).astype(np.int64) if binary else np.rint(probs * 3).astype(np.int64)
    classes = ["functional", "defective"] if binary else ["p=0", "p=1/3", "p=2/3", "p=1"]
    train_idx, test_idx = stratified_split(labels, ELPV_TEST_FRACTION, ELPV_SPLIT_SEED)
    y = torch.from_numpy(labels)

    def split(index, aug):
        x = resize_uint8(torch.from_numpy(np.ascontiguousarray(images[index])).unsqueeze(1),
                         size, resize)  # fmt: skip
        index = torch.from_numpy(index)
        return TensorImages(x, y[index], mean, std, classes, aug)

    return (
        split(train_idx, augment) if "train" in splits else None,
        split(test_idx, None) if "test" in splits else None,
    )


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip


#: the largest idx payload read (Fashion-MNIST's training images are 47 MB)
MAX_IDX_BYTES = 2**32


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (``.gz`` or raw) → array of ``ndim`` dimensions; ``DataError`` naming the
    file for a missing, unreadable, truncated or over-long file or a bad magic number. The
    header is read first: no more is read than it declares, plus one byte (a 300 KB
    ``.gz`` could otherwise expand into gigabytes before the size check)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DataError(f"{path} is not an idx file (bad magic number "
                                f"{head.hex() or '∅'})")  # fmt: skip
            if head[3] != ndim:
                raise DataError(f"{path}: idx file of {head[3]} dimensions, expected {ndim}")
            header = 4 + 4 * ndim
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataError(f"{path} is truncated: {4 + len(sizes)} bytes, the header "
                                f"alone needs {header}")  # fmt: skip
            dims = [int.from_bytes(sizes[4 * i : 4 + 4 * i], "big") for i in range(ndim)]
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            payload = math.prod(dims) * dtype.itemsize
            if payload > MAX_IDX_BYTES:
                raise DataError(f"{path}: its header declares shape {tuple(dims)}, "
                                f"{payload} bytes (at most {MAX_IDX_BYTES} are read)")  # fmt: skip
            data = f.read(payload + 1)
    except FileNotFoundError:
        raise DataError(f"idx file not found: {path}") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read idx file {path}: {type(exc).__name__}: {exc}") from None
    if len(data) != payload:
        what = "truncated" if len(data) < payload else "longer than its header says"
        got = f"{header + len(data)}{'+' if len(data) > payload else ''}"
        raise DataError(f"{path} is {what}: {got} bytes, expected {header + payload} for "
                        f"shape {tuple(dims)}")  # fmt: skip
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    found = sorted(folder.rglob(f"{stem}*"))
    if not found:
        raise DataError(f"Fashion-MNIST file {stem}[.gz] not found under {folder}")
    return found[0]


def idx_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of one Fashion-MNIST split;
    ``DataError`` when the two files disagree on the sample count."""
    img_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{img_path} / {lab_path}: expected unsigned-byte idx files")
    if len(images) != len(labels):
        raise DataError(
            f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels"
        )
    if len(images) == 0:
        raise DataError(f"{img_path} holds no images")
    return images, labels


def fashion_mnist_dir(root: str | None = None) -> Path:
    candidates = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    for d in candidates:
        if d.is_dir() and list(d.rglob("train-images-idx3-ubyte*")):
            return d
    raise DataError(
        f"Fashion-MNIST idx files not found in {[str(c) for c in candidates]}. Install them with "
        "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
        "or pass --data-root to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
    )


def fashion_mnist(size: int, mean, std, root: str | None = None, max_train=None, max_test=None,
                  resize=None, splits=("train", "test"), augment=None):  # fmt: skip
    d = fashion_mnist_dir(root)

    def load(prefix, limit, aug):
        img, lab = idx_split(d, prefix)
        if limit is not None and limit < len(lab):  # subset before resizing
            keep = _keep(len(lab), limit).numpy()
            img, lab = img[keep], lab[keep]
        x = resize_uint8(torch.from_numpy(img.copy()).unsqueeze(1), size, resize)
        return TensorImages(
            x, torch.from_numpy(lab.astype(np.int64)), mean, std, FASHION_MNIST_CLASSES, aug
        )

    return (
        load("train", max_train, augment) if "train" in splits else None,
        load("t10k", max_test, None) if "test" in splits else None,
    )


# -- entry point ------------------------------------------------------------------------------
def build_datasets(cfg, prep: Preprocessing, augment: Augmentation | None = None,
                   need_train: bool = True):  # fmt: skip
    """``(train, test, num_classes)`` for ``cfg.dataset`` through ``prep`` (and ``augment``
    for the training split); every check runs here. Without ``need_train`` (``--eval-only``)
    the training split is not read (``None``) unless ``--val-split`` holds out of it."""
    mean, std = prep.mean, prep.std
    need_train = need_train or bool(cfg.val_split)
    wanted = ("train", "test") if need_train else ("test",)
    image_aug = augment.image_transform(prep) if augment is not None else None
    name = cfg.dataset
    root = Path(cfg.data_root) if cfg.data_root else None
    kind = dataset_kind(name)
    resize = None if prep.whole_image() and prep.interpolation == "bicubic" else prep.resize()
    if kind == "elpv":
        train, test = elpv(prep.size, mean, std, name == "elpv-binary", resize, wanted, image_aug)
    elif kind == "fashion-mnist":
        train, test = fashion_mnist(prep.size, mean, std, cfg.data_root, cfg.max_train,
                                    cfg.max_test, resize, wanted, image_aug)  # fmt: skip
    else:
        if root is None:
            raise DataError(f"--dataset {name} needs --data-root")
        train_s, test_s, classes = _file_samples(name, root, cfg, need_train)
        check_labels(
            {split: torch.tensor([s[1] for s in samples])
             for split, samples in (("train", train_s), ("test", test_s)) if samples is not None},
            cfg.num_classes,
            f"{name} in {root}",
        )  # fmt: skip
        train_s, test_s = _limit_list(train_s, cfg.max_train), _limit_list(test_s, cfg.max_test)
        train = (file_images(train_s, prep.size, mean, std, classes, prep, image_aug)
                 if train_s is not None else None)  # fmt: skip
        test = file_images(test_s, prep.size, mean, std, classes, prep)
    train, test = _limit_ds(train, cfg.max_train), _limit_ds(test, cfg.max_test)
    if cfg.val_split:  # the evaluation split comes out of the training split
        train, test = hold_out(train, cfg.val_split)
        test.augment = None  # evaluated: never augmented
    splits = {"train": train, "test": test}
    for split, ds in splits.items():
        if ds is not None and len(ds) == 0:
            raise DataError(f"{name}: the {split} split is empty")
    labels = {k: ds.labels for k, ds in splits.items() if ds is not None}
    named = getattr(test, "classes", None)  # a capped split may miss the last classes
    given = cfg.num_classes if cfg.num_classes is not None or named is None else len(named)
    num_classes = check_labels(labels, given, name)
    if num_classes < 2:
        raise DataError(
            f"{name}: one class only: every prediction would be right (100 % accuracy whatever "
            "the model); a classifier needs at least 2 classes"
        )
    return train, test, num_classes


def dataset_kind(name: str) -> str:
    """``elpv`` / ``fashion-mnist`` / ``vtab`` / ``fewshot`` / ``folder`` for a ``--dataset``
    value; ``DataError`` for anything else."""
    if name in ("elpv", "elpv-binary", "fashion-mnist", "folder"):
        return "elpv" if name.startswith("elpv") else name
    prefix, _, rest = str(name).partition(":")
    if prefix in ("vtab", "fewshot") and rest.strip():
        return prefix
    raise DataError(
        f"unknown dataset {name!r}: use elpv, elpv-binary, fashion-mnist, vtab:NAME, "
        "fewshot:NAME or folder (with --data-root)"
    )


def _file_samples(name: str, root: Path, cfg, need_train: bool = True):
    """``(train samples or None, test samples, class names or None)``."""
    if name.startswith("vtab:"):
        base = root / name.split(":", 1)[1]
        train = read_list(base / f"{cfg.train_split}.txt", base) if need_train else None
        test = read_list(base / f"{cfg.test_split}.txt", base)
        return train, test, None
    if name.startswith("fewshot:"):
        base = root / name.split(":", 1)[1]
        ann = base / "annotations"
        train_list = ann / f"train_meta.list.num_shot_{cfg.shots}.seed_{cfg.shot_seed}"
        train = read_list(train_list, base) if need_train else None
        test = read_list(ann / "test_meta.list", base)
        return train, test, None
    train, classes = scan_folder(root / "train") if need_train else (None, None)
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    test, test_classes = scan_folder(test_dir)
    if not need_train:
        return None, test, test_classes
    if test_classes != classes:
        raise DataError(f"class folders differ between {root / 'train'} and {test_dir}")
    return train, test, classes


def _keep(length: int, n: int) -> torch.Tensor:
    return torch.randperm(length, generator=torch.Generator().manual_seed(0))[:n].sort().values


def _limit_list(samples, n):
    if samples is None or n is None or n >= len(samples):
        return samples
    return [samples[i] for i in _keep(len(samples), n).tolist()]


def hold_out(ds, n: int):
    """``(rest, held)``: ``n`` samples of ``ds`` drawn once (seed 1, whatever the run's
    --seed, so every run of a study sees the same validation set), both in the original
    order."""
    if n >= len(ds):
        raise DataError(f"--val-split {n}: the training split has only {len(ds)} samples")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
    return ds.subset(order[n:].sort().values), ds.subset(order[:n].sort().values)


def _limit_ds(ds, n):
    """A fixed random subset of ``n`` samples (seed 0), in the original order."""
    if ds is None or n is None or n >= len(ds):
        return ds
    return ds.subset(_keep(len(ds), n))
