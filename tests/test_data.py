"""Tests for dpq.data loaders (CIFAR-10, image folders, list files, digits, features) and
`dpq data info`. Small data only: a few real JPEGs copied from the shared CIFAR-10 zip,
tiny generated images and hand-built batch files."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (
    CIFAR_ZIP,
    LISTS,
    RunsCode,
    make_image_folder,
    needs_cifar_zip,
    needs_lists,
    png_bytes,
    py2_cifar_batch,
    random_image,
    truncated_jpeg,
)
from dpq.data import (
    CIFAR10_CLASSES,
    CorruptImageError,
    DatasetUnavailableError,
    ImageDataset,
    ImageFileReader,
    SkippedImagesWarning,
    describe_source,
    detect_source_kind,
    download_cifar10,
    load_cifar10,
    load_digits,
    load_features,
    load_image_folder,
    load_list_file,
    read_list_file,
)
from dpq.data.cifar10 import read_cifar_batch

# --------------------------------------------------------------------------- ImageDataset


def test_image_dataset_checks_its_arrays() -> None:
    images = np.zeros((4, 2, 2, 3), np.uint8)
    dataset = ImageDataset(images, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert dataset.num_classes == 3 and not dataset.is_multilabel
    assert dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.class_counts(), [1, 2, 1])
    assert len(dataset.subset([3, 0])) == 2
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.astype(np.float32), np.zeros(4, np.int64), ["a"])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ImageDataset(images, np.zeros(3, np.int64), ["a"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageDataset(images, np.array([0, 1, 2, 0]), ["a", "b"])
    multi = ImageDataset(images, np.array([[1, 0], [1, 1], [0, 0], [0, 1]]), ["x", "y"])
    assert multi.is_multilabel and multi.labels.dtype == np.uint8
    np.testing.assert_array_equal(multi.class_counts(), [2, 2])


# --------------------------------------------------------------------------- CIFAR-10


@needs_cifar_zip
def test_cifar10_zip_order_labels_and_pixels(small_cifar_zip: Path, tmp_path: Path) -> None:
    dataset = load_cifar10(small_cifar_zip, cache_dir=tmp_path / "cache")
    assert dataset.images.shape == (50, 32, 32, 3) and dataset.images.dtype == np.uint8
    assert dataset.classes == list(CIFAR10_CLASSES)
    # train (3 per class, CIFAR class order) then test (2 per class)
    expected = np.r_[np.repeat(np.arange(10), 3), np.repeat(np.arange(10), 2)]
    np.testing.assert_array_equal(dataset.labels, expected)
    with zipfile.ZipFile(small_cifar_zip) as archive:
        first_bird = sorted(n for n in archive.namelist() if n.startswith("train/bird/"))[0]
        reference = np.asarray(Image.open(io.BytesIO(archive.read(first_bird))).convert("RGB"))
    np.testing.assert_array_equal(dataset.images[6], reference)


@needs_cifar_zip
def test_cifar10_cache_is_reused_and_keyed_by_content(
    small_cifar_zip: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = load_cifar10(small_cifar_zip, cache_dir=cache)
    entries = [p for p in (cache / "cifar10").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {"images.npy", "labels.npy", "meta.json"}
    second = load_cifar10(small_cifar_zip, cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    # the second load reads the cache: a marked cached copy comes back as is
    marked = np.load(entries[0] / "images.npy")
    marked[0, 0, 0, 0] ^= 0xFF
    np.save(entries[0] / "images.npy", marked)
    third = load_cifar10(small_cifar_zip, cache_dir=cache)
    assert third.images[0, 0, 0, 0] == marked[0, 0, 0, 0]
    # a different source (other content) gets its own entry
    smaller = tmp_path / "smaller.zip"
    with zipfile.ZipFile(small_cifar_zip) as src, zipfile.ZipFile(smaller, "w") as dst:
        for name in src.namelist()[1:]:
            dst.writestr(name, src.read(name))
    assert len(load_cifar10(smaller, cache_dir=cache)) == 49
    assert len([p for p in (cache / "cifar10").iterdir() if not p.name.startswith(".")]) == 2


@needs_cifar_zip
def test_cifar10_folder_with_wrapping_directory(small_cifar_zip: Path, tmp_path: Path) -> None:
    root = tmp_path / "extracted"
    with zipfile.ZipFile(small_cifar_zip) as archive:
        archive.extractall(root / "cifar10")
    from_folder = load_cifar10(root, cache_dir=tmp_path / "cache")
    from_zip = load_cifar10(small_cifar_zip, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(from_folder.images, from_zip.images)
    np.testing.assert_array_equal(from_folder.labels, from_zip.labels)


def _cifar_folder_with_bad_image(root: Path, rng: np.random.Generator) -> None:
    for split in ("train", "test"):
        for class_name in CIFAR10_CLASSES:
            folder = root / split / class_name
            folder.mkdir(parents=True)
            (folder / "0000.jpg").write_bytes(png_bytes(random_image(rng, 32, 32), "JPEG"))
    (root / "train" / "cat" / "0001.jpg").write_bytes(truncated_jpeg(rng))


def test_cifar10_corrupt_image_names_the_file_and_can_be_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _cifar_folder_with_bad_image(root, np.random.default_rng(1))
    cache = tmp_path / "cache"
    with pytest.raises(CorruptImageError, match=r"train/cat/0001\.jpg.*skip_corrupt=True"):
        load_cifar10(root, cache_dir=cache)
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 21"):
        dataset = load_cifar10(root, cache_dir=cache, skip_corrupt=True)
    assert len(dataset) == 20
    np.testing.assert_array_equal(np.bincount(dataset.labels), np.full(10, 2))
    # the cached result remembers the skipped file: without skip_corrupt it still stops
    with pytest.raises(CorruptImageError, match=r"0001\.jpg"):
        load_cifar10(root, cache_dir=cache)
    with pytest.warns(SkippedImagesWarning, match="skipped 1"):
        assert len(load_cifar10(root, cache_dir=cache, skip_corrupt=True)) == 20


def test_cifar10_empty_class_folder_and_wrong_classes(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _cifar_folder_with_bad_image(root, np.random.default_rng(2))
    for file in (root / "test" / "frog").iterdir():
        file.unlink()
    with pytest.raises(ValueError, match=r"test/frog/.*has no images"):
        load_cifar10(root, cache_dir=tmp_path / "cache")
    (root / "test" / "frog").rmdir()
    (root / "test" / "toad").mkdir()
    with pytest.raises(ValueError, match=r"missing: \['frog'\], unexpected: \['toad'\]"):
        load_cifar10(root, cache_dir=tmp_path / "cache")


def test_cifar_batch_parser_reads_the_official_layout() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    labels = [7, 0, 9]
    official_style = py2_cifar_batch(data, labels)
    images, label_array = read_cifar_batch(official_style)
    assert images.shape == (3, 32, 32, 3) and label_array.tolist() == labels
    # channel c of pixel (y, x) is data[c * 1024 + y * 32 + x]
    assert images[1, 4, 5, 2] == data[1, 2 * 1024 + 4 * 32 + 5]


def test_cifar_batch_parser_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "was-run"
    blob = pickle.dumps({b"data": RunsCode(marker), b"labels": [1]}, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        read_cifar_batch(blob, "evil_batch")
    assert not marker.exists()
    with pytest.raises(ValueError, match="corrupt|malformed"):
        read_cifar_batch(py2_cifar_batch(np.zeros((1, 3072), np.uint8), [0])[:-40], "cut")


def _official_layout(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        (folder / name).write_bytes(py2_cifar_batch(data, labels))
        all_data.append(data)
        all_labels.extend(labels)
    (folder / "batches.meta").write_bytes(b"not read")
    data = np.concatenate(all_data)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(all_labels)


def test_cifar10_official_archive_and_extracted_folder(tmp_path: Path) -> None:
    expected_images, expected_labels = _official_layout(tmp_path / "src", np.random.default_rng(4))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert detect_source_kind(archive) == "cifar10"
    for source in (archive, tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py"):
        dataset = load_cifar10(source, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(dataset.images, expected_images)
        np.testing.assert_array_equal(dataset.labels, expected_labels)


def test_cifar10_download_checks_md5_and_explains_offline(tmp_path: Path) -> None:
    payload = tmp_path / "served.tar.gz"
    payload.write_bytes(b"pretend archive")
    import hashlib

    good_md5 = hashlib.md5(payload.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="md5"):
        download_cifar10(tmp_path / "cache1", url=payload.as_uri(), md5="0" * 32)
    assert not any((tmp_path / "cache1").glob("*.tar.gz"))
    path = download_cifar10(tmp_path / "cache2", url=payload.as_uri(), md5=good_md5)
    assert path.read_bytes() == b"pretend archive"
    # already there and verified: no second download
    assert download_cifar10(tmp_path / "cache2", url="http://127.0.0.1:9/x", md5=good_md5) == path
    with pytest.raises(DatasetUnavailableError, match="Pass a local copy") as info:
        download_cifar10(tmp_path / "cache3", url="http://127.0.0.1:9/cifar.tar.gz", timeout=5)
    assert isinstance(info.value, FileNotFoundError)


def test_source_kinds(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "fruit" / "train", {"apple": 1})
    make_image_folder(tmp_path / "fruit" / "test", {"apple": 1})
    assert detect_source_kind(tmp_path / "fruit") == "image-folder"
    make_image_folder(tmp_path / "cifar" / "train", {"cat": 1})
    make_image_folder(tmp_path / "cifar" / "test", {"cat": 1})
    assert detect_source_kind(tmp_path / "cifar") == "cifar10"
    (tmp_path / "list.txt").write_text("a.jpg 1\n")
    assert detect_source_kind(tmp_path / "list.txt") == "list-file"
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell what"):
        detect_source_kind(tmp_path / "notes.md")


def test_load_cifar10_rejects_other_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere.zip", cache_dir=tmp_path / "cache")
    make_image_folder(tmp_path / "animals", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match="not a CIFAR-10 source"):
        load_cifar10(tmp_path / "animals", cache_dir=tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DPQ_SLOW_TESTS") != "1", reason="set DPQ_SLOW_TESTS=1")
@needs_cifar_zip
def test_full_cifar10_zip(tmp_path: Path) -> None:
    from dpq.data import split_per_class

    dataset = load_cifar10(CIFAR_ZIP, cache_dir=tmp_path / "cache")
    assert dataset.images.shape == (60000, 32, 32, 3)
    np.testing.assert_array_equal(dataset.class_counts(), np.full(10, 6000))
    again = load_cifar10(CIFAR_ZIP, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, dataset.images)
    split = split_per_class(dataset.labels, 500, 100, seed=0)
    assert split.sizes == {"train": 5000, "query": 1000, "database": 54000}


# --------------------------------------------------------------------------- image folders


def test_image_folder_loads_classes_in_order(tmp_path: Path) -> None:
    made = make_image_folder(tmp_path / "pets", {"dog": 2, "cat": 3})
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    dataset = load_image_folder(tmp_path / "pets")
    assert dataset.classes == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(dataset.images[:3], np.stack(made["cat"]))
    np.testing.assert_array_equal(dataset.images[3:], np.stack(made["dog"]))


def test_image_folder_zip_with_wrapper_and_mixed_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/a/x.png", png_bytes(random_image(rng, 10, 6)))
        gray = Image.fromarray(rng.integers(0, 256, (7, 7), dtype=np.uint8), mode="L")
        buffer = io.BytesIO()
        gray.save(buffer, format="BMP")
        zf.writestr("photos/b/y.bmp", buffer.getvalue())
        rgba = Image.fromarray(rng.integers(0, 256, (5, 9, 4), dtype=np.uint8), mode="RGBA")
        buffer = io.BytesIO()
        rgba.save(buffer, format="PNG")
        zf.writestr("photos/b/z.png", buffer.getvalue())
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        load_image_folder(archive)
    dataset = load_image_folder(archive, image_size=(12, 16))
    assert dataset.classes == ["a", "b"]
    assert dataset.images.shape == (3, 12, 16, 3) and dataset.images.dtype == np.uint8
    gray_rgb = dataset.images[1]
    np.testing.assert_array_equal(gray_rgb[..., 0], gray_rgb[..., 2])


def test_image_folder_corrupt_image_stops_or_is_skipped(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "set", {"a": 2, "b": 2})
    (tmp_path / "set" / "b" / "broken.jpg").write_bytes(truncated_jpeg(np.random.default_rng(6)))
    with pytest.raises(ValueError, match=r"b/broken\.jpg.*skip_corrupt=True"):
        load_image_folder(tmp_path / "set")
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 5"):
        dataset = load_image_folder(tmp_path / "set", skip_corrupt=True)
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "set" / "b" / "empty.png").write_bytes(b"")
    with pytest.warns(SkippedImagesWarning, match="skipped 2 of 6"):
        load_image_folder(tmp_path / "set", skip_corrupt=True)


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "set", {"a": 2})
    (tmp_path / "set" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*empty' has no images"):
        load_image_folder(tmp_path / "set")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "set" / "a" / "000.png", "a/000.png")
        zf.writestr("empty/", b"")
    with pytest.raises(ValueError, match="empty' has no images"):
        load_image_folder(archive)
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path / "set" / "a")


# --------------------------------------------------------------------------- list files


@needs_lists
def test_real_list_files_parse() -> None:
    nus = read_list_file(LISTS / "nus21" / "train.txt")
    assert len(nus) == 10000 and nus.labels.shape == (10000, 21) and nus.labels.dtype == np.uint8
    assert (
        nus.image_paths[0] == "/home/zhuxiaosu/nus/Flickr/construction_worker/0366_2120100238.jpg"
    )
    assert nus.labels[0].tolist() == [0, 0, 1] + [0] * 18
    imagenet = read_list_file(LISTS / "imagenet100" / "train.txt")
    assert imagenet.labels.shape == (10000,) and not imagenet.is_multilabel
    assert len(imagenet.class_indices) == 100
    assert np.all(np.bincount(np.searchsorted(imagenet.class_indices, imagenet.labels)) == 100)
    query = read_list_file(LISTS / "imagenet100" / "query.txt")
    np.testing.assert_array_equal(query.class_indices, imagenet.class_indices)


def _list_with_images(list_path: Path, root: Path, lines: int, tmp_path: Path) -> Path:
    """The first ``lines`` lines of a real list, with tiny images at the listed paths
    under ``root`` (the part after the authors' dataset folder)."""
    head = list_path.read_text().splitlines()[:lines]
    rng = np.random.default_rng(7)
    for line in head:
        path = line.split()[0]
        relative = (
            path.split("/Flickr/")[-1] if "/Flickr/" in path else path.split("/Imagenet/")[-1]
        )
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_bytes(random_image(rng, 6, 9), "JPEG"))
    out = tmp_path / f"head-{list_path.parent.name}-{list_path.name}"
    out.write_text("\n".join(head) + "\n")
    return out


@needs_lists
def test_list_file_multilabel_with_author_paths(tmp_path: Path) -> None:
    root = tmp_path / "nus"
    head = _list_with_images(LISTS / "nus21" / "train.txt", root, 20, tmp_path)
    dataset = load_list_file(head, root, image_size=16)
    assert isinstance(dataset.images, ImageFileReader)
    assert dataset.is_multilabel and dataset.labels.shape == (20, 21)
    np.testing.assert_array_equal(dataset.labels, read_list_file(head).labels)
    assert dataset.images.shape == (20, 16, 16, 3)
    assert dataset.images[0].shape == (16, 16, 3)
    assert dataset.images[[3, 1]].shape == (2, 16, 16, 3)
    in_memory = load_list_file(head, root, image_size=16, in_memory=True)
    np.testing.assert_array_equal(in_memory.images[5], dataset.images[5])
    explicit = load_list_file(head, root, 16, strip_prefix="/home/zhuxiaosu/nus/Flickr")
    assert explicit.images.names == dataset.images.names  # type: ignore[union-attr]
    # the same images from a zip root
    archive = tmp_path / "nus.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in root.rglob("*.jpg"):
            zf.write(file, file.relative_to(root).as_posix())
    from_zip = load_list_file(head, archive, image_size=16)
    np.testing.assert_array_equal(from_zip.images[0:4], dataset.images[0:4])


@needs_lists
def test_list_file_class_indices_shared_between_lists(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    train_head = _list_with_images(LISTS / "imagenet100" / "train.txt", root, 20, tmp_path)
    query_head = _list_with_images(LISTS / "imagenet100" / "query.txt", root, 20, tmp_path)
    class_indices = read_list_file(LISTS / "imagenet100" / "train.txt").class_indices
    query = load_list_file(query_head, root, 8, class_indices=class_indices)
    raw = read_list_file(query_head).labels
    assert query.num_classes == 100
    np.testing.assert_array_equal(class_indices[query.labels], raw)
    assert [query.classes[i] for i in query.labels] == [str(r) for r in raw]
    train = load_list_file(train_head, root, 8)  # the head holds few classes: its own mapping
    assert train.num_classes == len(np.unique(read_list_file(train_head).labels))
    with pytest.raises(ValueError, match="not among the 1 class_indices"):
        load_list_file(query_head, root, 8, class_indices=[100000])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a.jpg 0 1 0\nb.jpg 1 0 0\n\nc.jpg 1 0\n",
            "line 4 of .* has 2 label columns but line 1 has 3",
        ),
        ("a.jpg 0 1 0\nb.jpg 1 2 0\n", r"line 2 .* '1 2 0', expected 0/1 labels"),
        ("a.jpg 3\nb.jpg x\n", "line 2 .* non-negative integer"),
        ("a.jpg\n", "line 1 .* no labels"),
    ],
)
def test_list_file_label_width_mismatch_names_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_list_file(bad)


def test_list_file_missing_images_and_unplaceable_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image_folder(root, {"k": 1})
    listing = tmp_path / "list.txt"
    listing.write_text("k/000.png 4\nk/001.png 4\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 images .* missing .*001.png"):
        load_list_file(listing, root, 8)
    lazy = load_list_file(listing, root, 8, check_files=False)
    assert lazy.images[0].shape == (8, 8, 3)
    with pytest.raises(FileNotFoundError, match="001.png"):  # a missing file read on demand
        lazy.images[1]
    listing.write_text("/data/elsewhere/zzz/000.png 4\n")
    with pytest.raises(FileNotFoundError, match="strip_prefix"):
        load_list_file(listing, root, 8)
    listing.write_text("/data/set/k/000.png 4\n/other/k/000.png 4\n")
    with pytest.raises(ValueError, match="line 2 .* does not start with '/data/set/'"):
        load_list_file(listing, root, 8)


def test_image_file_reader_indexing(tmp_path: Path) -> None:
    made = make_image_folder(tmp_path / "root", {"k": 3}, size=8)
    listing = tmp_path / "list.txt"
    listing.write_text("k/000.png 0\nk/001.png 1\nk/002.png 0\n")
    reader = load_list_file(listing, tmp_path / "root", 8).images
    assert isinstance(reader, ImageFileReader) and reader.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(reader[-1], made["k"][2])
    np.testing.assert_array_equal(reader[1:], np.stack(made["k"][1:]))
    np.testing.assert_array_equal(reader[np.array([True, False, True])], reader[[0, 2]])
    np.testing.assert_array_equal(reader.subset([2, 0])[0], made["k"][2])
    with pytest.raises(IndexError):
        reader[3]
    with pytest.raises(IndexError):
        reader[[0, 5]]
    restored = pickle.loads(pickle.dumps(reader))  # DataLoader workers receive it pickled
    np.testing.assert_array_equal(restored[0], made["k"][0])


def test_list_file_corrupt_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image_folder(root, {"k": 2})
    (root / "k" / "bad.jpg").write_bytes(truncated_jpeg(np.random.default_rng(8)))
    listing = tmp_path / "list.txt"
    listing.write_text("k/000.png 0\nk/bad.jpg 1\nk/001.png 0\n")
    lazy = load_list_file(listing, root, 8)
    with pytest.raises(CorruptImageError, match=r"k/bad\.jpg"):
        lazy.images[1]
    with pytest.raises(CorruptImageError, match=r"k/bad\.jpg"):
        load_list_file(listing, root, 8, in_memory=True)
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 3"):
        kept = load_list_file(listing, root, 8, in_memory=True, skip_corrupt=True)
    assert kept.labels.tolist() == [0, 0]


# --------------------------------------------------------------------------- digits, features


def test_digits_as_rgb_images() -> None:
    dataset = load_digits()
    assert dataset.images.shape == (1797, 8, 8, 3) and dataset.images.dtype == np.uint8
    assert dataset.images.max() == 255 and dataset.images.min() == 0
    np.testing.assert_array_equal(dataset.images[..., 0], dataset.images[..., 1])
    assert dataset.labels.dtype == np.int64 and set(dataset.labels.tolist()) == set(range(10))
    assert dataset.classes == [str(d) for d in range(10)]


def test_load_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    np.save(tmp_path / "x.npy", rng.normal(size=(6, 4)))
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 1, 0, 2]))
    np.save(tmp_path / "y5.npy", np.array([0, 1, 2, 1, 0]))
    np.save(tmp_path / "multi.npy", rng.integers(0, 2, size=(6, 3)))
    features = load_features(tmp_path / "x.npy", tmp_path / "y.npy")
    assert features.features.dtype == np.float32 and features.features.shape == (6, 4)
    assert features.labels.dtype == np.int64 and features.num_classes == 3
    assert load_features(tmp_path / "x.npy", tmp_path / "multi.npy").is_multilabel
    with pytest.raises(ValueError, match="6 feature rows but .* 5 labels"):
        load_features(tmp_path / "x.npy", tmp_path / "y5.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays are refused"):
        load_features(tmp_path / "objects.npy", tmp_path / "y.npy")


@needs_lists
def test_describe_real_list_file() -> None:
    info = describe_source(LISTS / "imagenet100" / "train.txt")
    assert info.num_images == 10000 and len(info.classes) == 100
    assert info.split_sizes == {"train": 10000, "query": 0, "database": 10000}
    nus = describe_source(LISTS / "nus21" / "train.txt")
    assert nus.is_multilabel and nus.split_sizes is None and "15,000" in nus.split_rule


def test_class_folders_may_be_symbolic_links_and_link_loops_end(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "elsewhere", {"cats": 2, "dogs": 3})
    (tmp_path / "set").mkdir()
    for name in ("cats", "dogs"):
        (tmp_path / "set" / name).symlink_to(tmp_path / "elsewhere" / name)
    (tmp_path / "elsewhere" / "cats" / "loop").symlink_to(tmp_path / "set")  # a loop
    dataset = load_image_folder(tmp_path / "set")
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 5
