"""dtl-train data: layouts, built-in sets and the errors raised before training."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtl_kernels.train import data as D
from dtl_kernels.train import make_config
from dtl_kernels.train.transforms import HALF, Preprocessing


def write_image(path: Path, value: int = 128, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def folder_tree(root: Path, classes=("a", "b"), per_class=3) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            for k in range(per_class):
                write_image(root / split / name / f"{k}.png", 40 * c + k)
    return root


def vtab_tree(root: Path, labels_train=(0, 1, 2, 1), labels_test=(2, 0)) -> Path:
    base = root / "toy"
    for split, labels in (("train800val200", labels_train), ("test", labels_test)):
        lines = []
        for k, lab in enumerate(labels):
            rel = f"images/{split}/{k}.jpg"
            write_image(base / rel, 10 * k)
            lines.append(f"{rel} {lab}")
        (base / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def build(**kw):
    return D.build_datasets(make_config(kw), Preprocessing(16, *HALF))


def test_folder_layout(tmp_path):
    root = folder_tree(tmp_path)
    train, test, n = build(dataset="folder", data_root=str(root))
    assert (len(train), len(test), n) == (6, 6, 2)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert train.classes == ["a", "b"]


def test_val_split_holds_out_training_samples(tmp_path):
    """--val-split N: N training samples become the evaluation split (the same draw for
    every --seed), the rest train; the test split is not touched."""
    root = folder_tree(tmp_path, per_class=5)
    train, val, n = build(dataset="folder", data_root=str(root), val_split=4)
    assert (len(train), len(val), n) == (6, 4, 2)
    again_train, again_val, _ = build(dataset="folder", data_root=str(root), val_split=4, seed=7)
    assert again_val.paths == val.paths and again_train.paths == train.paths
    assert not set(val.paths) & set(train.paths)
    assert all(p.parent.parent.name == "train" for p in val.paths)
    with pytest.raises(D.DataError, match="--val-split 10: the training split has only 10"):
        build(dataset="folder", data_root=str(root), val_split=10)


def test_vtab_layout_and_label_range(tmp_path):
    root = vtab_tree(tmp_path)
    train, test, n = build(dataset="vtab:toy", data_root=str(root))
    assert (len(train), len(test), n) == (4, 2, 3)
    with pytest.raises(D.DataError, match=r"label 2 .* outside the class range 0…1"):
        build(dataset="vtab:toy", data_root=str(root), num_classes=2)


def test_negative_label_is_an_error(tmp_path):
    root = vtab_tree(tmp_path, labels_test=(-1, 0))
    with pytest.raises(D.DataError, match="label -1"):
        build(dataset="vtab:toy", data_root=str(root))


@pytest.mark.parametrize("label", [2**24, 3_000_000_000, 10**20])
def test_a_label_past_the_class_limit_is_an_error_naming_the_line(tmp_path, label):
    """The class count is the largest label + 1: a label of 3e9 built a 2.3 TB head (a
    raw allocation error), 2e7 was killed for memory, 1e20 overflowed a C long; refused
    with the file and line, before any image is read."""
    root = vtab_tree(tmp_path, labels_train=(0, 1, label, 1))
    with pytest.raises(D.DataError, match=rf"train800val200.txt:3: label {label} is not in 0…"):
        build(dataset="vtab:toy", data_root=str(root))


def test_missing_list_file(tmp_path):
    root = vtab_tree(tmp_path)
    (root / "toy" / "test.txt").unlink()
    with pytest.raises(D.DataError, match=r"list file not found: .*toy/test\.txt"):
        build(dataset="vtab:toy", data_root=str(root))


def test_malformed_list_line(tmp_path):
    root = vtab_tree(tmp_path)
    (root / "toy" / "test.txt").write_text("images/test/0.jpg zero\n")
    with pytest.raises(D.DataError, match=r"test\.txt:1"):
        build(dataset="vtab:toy", data_root=str(root))


def test_corrupt_image_names_the_file(tmp_path):
    root = folder_tree(tmp_path)
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(D.DataError, match=r"cannot read image .*train/b/1\.png"):
        build(dataset="folder", data_root=str(root))


def test_a_strip_image_is_refused_where_the_resize_keeps_its_aspect(tmp_path):
    """A 274-byte 200000×1 PNG decoded to 1.3 GB through timm's aspect-keeping center
    crop: refused when the headers are read, before any image is decoded, and at decoding;
    a squashing resize (dtl-train's default) takes it, and 64:1 is read in every mode."""
    strip, ok = tmp_path / "strip.png", tmp_path / "ok.png"
    Image.new("L", (200_000, 1)).save(strip)
    Image.new("L", (64, 1)).save(ok)
    assert D.load_image(strip, 16).shape == (3, 16, 16)  # squash
    center = Preprocessing(16, *HALF, crop_pct=0.875, crop_mode="center")
    assert center.keeps_aspect() and not Preprocessing(16, *HALF).keeps_aspect()
    assert D.load_image(ok, 16, center.resize(), True).shape == (3, 16, 16)
    with pytest.raises(D.DataError, match=r"strip\.png: ValueError: 200000x1 pixels: more "):
        D.file_images([(ok, 0), (strip, 1)], 16, *HALF, prep=center)
    with pytest.raises(D.DataError, match="more than 64 times"):
        D.load_image(strip, 16, center.resize(), True)


@pytest.mark.parametrize("kind", ["dangling-link", "fifo"])
def test_an_image_name_that_is_no_file_is_named_not_skipped(tmp_path, kind):
    """A dangling link or a FIFO named like an image was left out without a word (one
    sample fewer, silently); dtl-predict's folder listing is the same function."""
    root = folder_tree(tmp_path)
    odd = root / "train" / "b" / "9.png"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(root / "gone.png")
    with pytest.raises(D.DataError, match=r"train/b/9\.png has an image's name but is not"):
        build(dataset="folder", data_root=str(root))
    from dtl_kernels.predict import image_files

    with pytest.raises(D.DataError, match="9.png has an image's name"):
        image_files([root / "train"])


def test_linked_subfolders_are_followed_once_and_loops_not_re_entered(tmp_path):
    """rglob skipped a linked subfolder without a word (its images were neither trained on
    nor predicted, exit 0); a linked class folder was read. Now every linked folder is
    followed, each real folder once: a loop adds nothing, a folder reached without a link
    keeps that path, and the order stays sorted."""
    root = folder_tree(tmp_path / "data")
    extra = tmp_path / "extra"
    write_image(extra / "e.png")
    write_image(extra / "deep" / "d.png")
    (extra / "deep" / "loop").symlink_to(extra)  # a loop through the linked folder
    (root / "train" / "a" / "more").symlink_to(extra)
    (root / "train" / "a" / "again").symlink_to(root / "train" / "a")  # a loop to itself
    (root / "train" / "b" / "z").symlink_to(root / "train" / "b" / "0.png")  # no image name
    a = root / "train" / "a"
    want = [a / "0.png", a / "1.png", a / "2.png", a / "more" / "deep" / "d.png",
            a / "more" / "e.png"]  # fmt: skip
    assert D.images_under(a) == want
    train, _, _ = build(dataset="folder", data_root=str(root))
    assert train.paths[:5] == want and train.labels.tolist() == [0] * 5 + [1] * 3
    from dtl_kernels.predict import image_files

    assert image_files([a]) == want
    # a folder reached both ways is listed once, under its own path
    (root / "train" / "b" / "0_via_link").symlink_to(extra)
    (root / "train" / "b" / "real").mkdir()
    write_image(root / "train" / "b" / "real" / "r.png")
    (root / "train" / "b" / "a_link").symlink_to(root / "train" / "b" / "real")
    got = D.images_under(root / "train" / "b")
    assert [p.relative_to(root / "train" / "b").as_posix() for p in got] == [
        "0.png", "0_via_link/deep/d.png", "0_via_link/e.png", "1.png", "2.png", "real/r.png"
    ]  # fmt: skip


def test_a_link_that_would_mix_classes_is_refused(tmp_path):
    """Following links (above) must not put one class's images under another's label: a
    link to a folder that holds the listed one (its parent, /) would list everything
    beside it; a folder reached from two classes would be trained under both labels."""
    root = folder_tree(tmp_path / "data")
    train = root / "train"
    for target in (train, Path("/")):
        up = train / "a" / "up"
        up.symlink_to(target)
        with pytest.raises(D.DataError, match=r"a/up links to .*, which holds .*a itself"):
            D.images_under(train / "a")
        up.unlink()
    (train / "b" / "more_a").symlink_to(train / "a")
    with pytest.raises(D.DataError, match=r"listed for class 'a' and for class 'b'"):
        build(dataset="folder", data_root=str(root))


def test_a_folder_that_cannot_be_listed_is_an_error(tmp_path, monkeypatch):
    """os.walk leaves a folder it cannot list out without a word (its images neither
    trained on nor predicted); here that is a DataError naming it. (Permissions do not
    stop root, so the listing fails by a patch.)"""
    root = folder_tree(tmp_path / "data")
    locked = root / "train" / "a" / "locked"
    write_image(locked / "x.png")
    listing = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(D.DataError, match=r"cannot list the folder .*a/locked: Permission"):
        D.images_under(root / "train" / "a")


def test_every_image_suffix_names_pillows_format_for_it(tmp_path):
    """IMAGE_FORMATS agrees with Pillow's own table, and a file of each suffix reads."""
    Image.init()
    assert D.IMAGE_FORMATS == {e: Image.registered_extensions()[e] for e in D.IMAGE_EXTENSIONS}
    for suffix in D.IMAGE_EXTENSIONS:
        write_image(tmp_path / f"x{suffix}", size=8)
        assert D.load_image(tmp_path / f"x{suffix}", 4).shape == (3, 4, 4), suffix


@pytest.mark.parametrize(
    "name,real,found",
    [("tga.png", "TGA", "CUR"), ("ico.jpg", "ICO", "ICO"), ("eps.png", None, "EPS"),
     ("tga_any_suffix.img", "TGA", "CUR")],
)  # fmt: skip
def test_an_image_is_read_only_in_the_formats_of_image_suffixes(
    tmp_path, monkeypatch, name, real, found
):
    """Any Pillow plugin read a file with an image's suffix: an EPS named .png went to
    Ghostscript, a TGA or an ICO was decoded. Now it is refused, naming the format its
    first bytes show (TGA has no signature: its bytes match CUR's), by every reader of a
    user's image; the EPS plugin never sees it."""
    from PIL import EpsImagePlugin

    from dtl_kernels.predict import _decode

    path = tmp_path / name
    if real is None:
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    else:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format=real)
    message = (f"{name}: its first bytes are those of the {found} format, not one of BMP, "
               "GIF, JPEG, PNG, PPM, TIFF, WEBP, the formats read")  # fmt: skip
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: pytest.fail("the EPS plugin read it"))  # fmt: skip
    for read in (lambda: D.check_image_header(path), lambda: D.load_image(path, 4),
                 lambda: _decode(path, lambda img: img, False)):  # fmt: skip
        with pytest.raises(D.DataError, match=message):
            read()


@pytest.mark.parametrize("name,real", [("png.jpg", "PNG"), ("gif.jpg", "GIF"), ("gif.png", "GIF")])
def test_an_image_of_another_read_format_than_its_suffix_is_read(tmp_path, name, real):
    """A PNG or a GIF saved as .jpg (common in collected datasets) is read as what it is."""
    from dtl_kernels.predict import _decode

    path = tmp_path / name
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format=real)
    D.check_image_header(path)
    assert D.load_image(path, 4).shape == (3, 4, 4)
    assert _decode(path, lambda img: img.size, False) == (8, 8)


@pytest.mark.parametrize("size", [0, 1, 3, 15])
def test_a_short_file_is_a_data_error_naming_it(tmp_path, size):
    """A zero-byte image (a failed download) made a format's signature check fail on the
    missing bytes (struct.error, no file named) while the refusal was being worded."""
    from dtl_kernels.predict import _decode

    path = tmp_path / "short.jpg"
    path.write_bytes(b"\x00" * size)
    for read in (lambda: D.check_image_header(path), lambda: D.load_image(path, 4),
                 lambda: _decode(path, lambda img: img, False)):  # fmt: skip
        with pytest.raises(D.DataError, match="cannot read image .*short.jpg"):
            read()


def test_missing_image_names_the_file(tmp_path):
    root = vtab_tree(tmp_path)
    (root / "toy" / "images" / "test" / "1.jpg").unlink()
    with pytest.raises(D.DataError, match=r"image file not found: .*images/test/1\.jpg"):
        build(dataset="vtab:toy", data_root=str(root))


def test_empty_split(tmp_path):
    root = folder_tree(tmp_path)
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(D.DataError, match="no images under"):
        build(dataset="folder", data_root=str(root))
    (root / "toy").mkdir()
    (root / "toy" / "test.txt").write_text("\n")
    (root / "toy" / "train800val200.txt").write_text("x.png 0\n")
    with pytest.raises(D.DataError, match="is empty"):
        build(dataset="vtab:toy", data_root=str(root))


def test_fewshot_layout(tmp_path):
    base = tmp_path / "toy"
    for split, name in (("train", "train_meta.list.num_shot_2.seed_0"), ("test", "test_meta.list")):
        lines = []
        for k, lab in enumerate((0, 1, 1, 0)):
            write_image(base / "imgs" / f"{split}{k}.png", 30 * k)
            lines.append(f"imgs/{split}{k}.png {lab}")
        (base / "annotations").mkdir(exist_ok=True)
        (base / "annotations" / name).write_text("\n".join(lines))
    train, test, n = build(dataset="fewshot:toy", data_root=str(tmp_path), shots=2, shot_seed=0)
    assert (len(train), len(test), n) == (4, 4, 2)
    with pytest.raises(D.DataError, match="num_shot_4.seed_0"):
        build(dataset="fewshot:toy", data_root=str(tmp_path), shots=4, shot_seed=0)


def test_unknown_dataset_and_missing_root():
    with pytest.raises(D.DataError, match="unknown dataset"):
        build(dataset="imagenet-21k")
    with pytest.raises(D.DataError, match="needs --data-root"):
        build(dataset="folder")


def test_stratified_split_is_fixed_and_stratified():
    labels = np.repeat(np.arange(4), [40, 8, 4, 20])
    a = D.stratified_split(labels, 0.25, 0)
    b = D.stratified_split(labels, 0.25, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    train, test = a
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [10, 2, 1, 5]


def test_elpv():
    pytest.importorskip("elpv_dataset")
    train, test, n = build(dataset="elpv", max_train=40, max_test=12)
    assert n == 4 and (len(train), len(test)) == (40, 12)
    x, _ = train[0]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[1])  # gray → 3 channels
    images, probs = D.elpv_arrays()
    assert images.shape == (2624, 300, 300) and np.allclose(probs * 3, np.rint(probs * 3))
    binary, _, n2 = build(dataset="elpv-binary", max_train=40, max_test=12)
    assert n2 == 2 and set(binary.labels.tolist()) <= {0, 1}
    # defective (binary 1) is exactly the two upper classes of the 4-class labels
    assert np.array_equal(np.rint(probs * 3) >= 2, probs >= 0.5)


def test_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(D.DataError, match="apt-get install -y dataset-fashion-mnist"):
        build(dataset="fashion-mnist")
    monkeypatch.undo()
    try:
        D.fashion_mnist_dir()
    except D.DataError:
        pytest.skip("dataset-fashion-mnist not installed")
    train, test, n = build(dataset="fashion-mnist", max_train=30, max_test=10)
    assert n == 10 and (len(train), len(test)) == (30, 10)


# -- idx files (Fashion-MNIST) ------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, extra: int = 0) -> Path:
    header = (magic or bytes([0, 0, 8, array.ndim])) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    data = data[: len(data) + extra] if extra < 0 else data + b"\0" * extra
    path.write_bytes(data)
    return path


def idx_tree(root: Path, n_train=6, n_test=4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def test_fashion_mnist_idx_files_from_a_folder(tmp_path):
    root = idx_tree(tmp_path / "fm")
    train, test, n = build(dataset="fashion-mnist", data_root=str(root), num_classes=10)
    assert (len(train), len(test), n) == (6, 4, 10)
    assert train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "t10k-labels-idx1-ubyte").unlink(),
         r"t10k-labels-idx1-ubyte\[\.gz\] not found"),
        (lambda r: write_idx(r / "train-images-idx3-ubyte", np.zeros((6, 28, 28)), magic=b"PK\3\4"),
         r"train-images-idx3-ubyte is not an idx file \(bad magic"),
        (lambda r: write_idx(r / "train-images-idx3-ubyte", np.zeros((6, 28, 28)), extra=-10),
         r"train-images-idx3-ubyte is truncated: 4710 bytes, expected 4720"),
        (lambda r: write_idx(r / "train-labels-idx1-ubyte", np.zeros(6), extra=3),
         "train-labels-idx1-ubyte is longer than its header says"),
        (lambda r: write_idx(r / "train-labels-idx1-ubyte", np.zeros(5)),
         "train-images-idx3-ubyte holds 6 images but .*train-labels-idx1-ubyte holds 5 labels"),
        (lambda r: write_idx(r / "t10k-labels-idx1-ubyte", np.zeros((4, 1))),
         "idx file of 2 dimensions, expected 1"),
        (lambda r: (r / "t10k-images-idx3-ubyte").write_bytes(b"\0\0"), "not an idx file"),
    ],
)  # fmt: skip
def test_damaged_idx_files_name_the_file(tmp_path, damage, message):
    root = idx_tree(tmp_path / "fm")
    damage(root)
    with pytest.raises(D.DataError, match=message):
        build(dataset="fashion-mnist", data_root=str(root))


def test_an_idx_file_is_read_no_further_than_its_header_says(tmp_path):
    """A small .gz that expands into 64 MB past its declared 10 images: refused after
    reading what the header declares plus one byte (it was read whole first)."""
    import gzip
    import tracemalloc

    root = idx_tree(tmp_path / "fm", n_train=10)
    (root / "train-images-idx3-ubyte").unlink()
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28)))
        for _ in range(64):
            f.write(bytes(2**20))
    tracemalloc.start()
    try:
        with pytest.raises(D.DataError, match="longer than its header says: 7857\\+ bytes"):
            D.read_idx(root / "train-images-idx3-ubyte.gz", 3)
        assert tracemalloc.get_traced_memory()[1] < 8 * 2**20
    finally:
        tracemalloc.stop()


# -- image depth ------------------------------------------------------------------------------
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    gray16 = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    x = D.load_image(tmp_path / "g16.png", 4)
    assert x.dtype == torch.uint8 and torch.equal(x[0], x[1])
    assert x[0, 0].tolist() == [0, 4, 128, 255]  # not [0, 255, 255, 255]

    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32).repeat(4, 0)
    Image.fromarray(unit).save(tmp_path / "f.tiff")
    assert D.load_image(tmp_path / "f.tiff", 4)[0, 0].tolist() == [0, 64, 128, 255]
    wide = np.array([[-2.0, 0.0, 2.0, 6.0]], dtype=np.float32).repeat(4, 0)
    Image.fromarray(wide).save(tmp_path / "w.tiff")  # outside [0, 1]: its own min…max
    assert D.load_image(tmp_path / "w.tiff", 4)[0, 0].tolist() == [0, 64, 128, 255]


def _eight_bit_before(img):
    """``data.eight_bit`` as it was (float64 copies of the whole image, ~32 bytes a pixel):
    the reference the rewrite must equal bit for bit."""
    if img.mode not in D._HIGH_BIT_MODES:
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("the image holds NaN or infinite values")
    if img.mode == "F":
        low, high = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (arr.min(), arr.max())
    elif img.mode == "I" and (arr.min() < 0 or arr.max() > 65535):  # 32-bit integers
        low, high = arr.min(), arr.max()
    else:  # 16-bit (PNG / TIFF open as I;16 or I)
        low, high = 0.0, 65535.0
    scaled = (arr - low) * (255.0 / max(high - low, 1e-12))
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _high_bit_images():
    """Images of every high-bit mode: all 65536 16-bit values in each 16-bit layout,
    32-bit integers and floats at their edges, constant images, NaN and ±inf."""
    every = np.arange(65536).reshape(256, 256)
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        yield Image.frombytes(mode, (256, 256), every.astype(dtype).tobytes())
    yield Image.fromarray(every.astype(np.int32))  # I, within 16 bits
    rng = np.random.default_rng(7)
    i32 = np.iinfo(np.int32)
    for values in ([-1, 0, 65535], [0, 65536], [i32.min, 0, i32.max], [70000] * 3, [-5] * 3,
                   rng.integers(i32.min, i32.max, 999, endpoint=True),
                   rng.integers(-300, 70000, 1001)):  # fmt: skip
        yield Image.fromarray(np.array(values, dtype=np.int32).reshape(1, -1))
    f32 = np.finfo(np.float32)
    halves = (np.arange(255) + 0.5) / 255  # where rounding to 0…255 turns
    around = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 1)])
    nan, inf = float("nan"), float("inf")
    for values in (around, [0.0, -0.0, 1.0, f32.smallest_subnormal], [0.0, np.nextafter(1, 2)],
                   [-2.0, 0.0, 2.0, 6.0], [-f32.max, 0.0, f32.max], [5.0] * 3, [0.25] * 3,
                   [-f32.smallest_subnormal, 0.5], rng.normal(0, 1000, 1003),
                   rng.random(1005), [0.5, nan], [inf, 0.5], [-inf, 0.5]):  # fmt: skip
        yield Image.fromarray(np.array(values, dtype=np.float32).reshape(1, -1))
    for mode in D._HIGH_BIT_MODES:  # no pixels at all (check_aspect refuses them first)
        yield Image.new(mode, (0, 0))


@pytest.mark.parametrize("block", [None, 100], ids=["one-block", "many-blocks"])
def test_eight_bit_equals_the_float64_version_bit_for_bit(monkeypatch, block):
    """The rewrite (a lookup table for 16-bit values, float64 a block at a time for the
    rest) gives what the float64 version gave, pixel for pixel, or the same error."""
    if block is not None:
        monkeypatch.setattr(D, "_SCALE_BLOCK", block, raising=False)
    for img in _high_bit_images():
        try:
            want = _eight_bit_before(img)
        except ValueError as exc:
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                D.eight_bit(img)
            continue
        got = D.eight_bit(img)
        assert (got.mode, got.size) == (want.mode, want.size)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (img.mode, img.size)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_eight_bit_needs_a_few_bytes_a_pixel(mode, monkeypatch):
    """A 6000x6000 16-bit PNG took 1.1 GB (float64 copies: 32 bytes a pixel traced here);
    now NumPy's copy of the pixels (made through a bytes object: twice their size, for a
    moment) and the 8-bit result: 4 bytes a 16-bit pixel, 8 a 32-bit one, and a float64
    block of a size of its own (made small here)."""
    import tracemalloc

    monkeypatch.setattr(D, "_SCALE_BLOCK", 2**14, raising=False)

    rng = np.random.default_rng(0)
    arr = {"I;16": rng.integers(0, 65536, (1000, 1000), dtype=np.uint16),
           "I": rng.integers(-5, 70000, (1000, 1000)).astype(np.int32),
           "F": rng.normal(0, 3, (1000, 1000)).astype(np.float32)}[mode]  # fmt: skip
    img = Image.fromarray(arr)
    assert img.mode == mode
    D.eight_bit(img)  # (the lookup table, made once)
    tracemalloc.start()
    try:
        D.eight_bit(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * arr.size, peak / arr.size


# -- streaming --------------------------------------------------------------------------------
def test_folder_data_is_streamed_not_decoded_up_front(tmp_path, monkeypatch):
    root = folder_tree(tmp_path, per_class=4)
    decoded = []
    real = D.load_image

    def counting(path, size, *resize):
        decoded.append(path)
        return real(path, size, *resize)

    monkeypatch.setattr(D, "load_image", counting)
    train, test, _ = build(dataset="folder", data_root=str(root))
    assert decoded == [] and not hasattr(train, "images")
    x, y = train[5]
    assert len(decoded) == 1 and x.shape == (3, 16, 16) and y == 1
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4] and batches[0][0].shape == (4, 3, 16, 16)


def test_truncated_image_fails_when_decoded_naming_the_file(tmp_path):
    root = folder_tree(tmp_path)
    bad = root / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header still reads
    train, _, _ = build(dataset="folder", data_root=str(root))
    with pytest.raises(D.DataError, match=r"cannot read image .*train/b/2\.png"):
        train[5]
