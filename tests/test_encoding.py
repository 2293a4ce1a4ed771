"""dpq.encode.build.build_index: the one way a model and items become an index."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
from dpq.data import ImageFileReader
from dpq.data.decode import ImageStore
from dpq.encode import build as encoding
from dpq.encode.build import build_index
from dpq.index import DPQIndex
from dpq.model.network import DPQModel


@pytest.fixture(scope="module")
def model() -> DPQModel:
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=3, codebook_size=16, dim=10),
    )
    return DPQModel(config).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)


def test_build_index_holds_the_models_codes_ids_and_labels(model, images, monkeypatch):
    monkeypatch.setattr(encoding, "CHUNK_ITEMS", 10)  # four chunks, the last one short
    labels = np.arange(37) % 3
    index = build_index(model, images, ids=np.arange(100, 137), labels=labels, batch_size=4)
    np.testing.assert_array_equal(index.codes, model.encode(images))
    np.testing.assert_array_equal(index.ids, np.arange(100, 137))
    np.testing.assert_array_equal(index.labels, labels)
    np.testing.assert_array_equal(index.codebooks, model.codebooks())
    assert index.assignment == model.config.quantizer.assignment and index.search_mode == "aqd"
    assert build_index(model, images[:3], search_mode="ip").search_mode == "ip"


def test_build_index_grows_an_index_and_checks_its_codebooks(model, images):
    index = build_index(model, images[:20])
    grown = build_index(model, images[20:], index=index)
    assert grown is index and index.ntotal == 37
    np.testing.assert_array_equal(index.ids, np.arange(37))
    torch.manual_seed(1)
    other = DPQModel(model.config)
    with pytest.raises(ValueError, match="differ from the ones this index was built with"):
        build_index(other, images[:2], index=index)
    with pytest.raises(ValueError, match="labels has 2 rows but there are 37 items"):
        build_index(model, images, labels=np.zeros(2, np.int64))


def test_build_index_streams_an_on_demand_reader(model, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(encoding, "CHUNK_ITEMS", 4)
    pixels = np.random.default_rng(2).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    reader = ImageFileReader(ImageStore(str(tmp_path)), [f"{i}.png" for i in range(9)], (8, 8))
    read, added = [], []
    original = ImageFileReader.__getitem__
    monkeypatch.setattr(
        ImageFileReader, "__getitem__", lambda self, key: read.append(key) or original(self, key)
    )
    add = encoding.add_features
    monkeypatch.setattr(
        encoding,
        "add_features",
        lambda index, model, features, **rows: (
            added.append(len(features)) or add(index, model, features, **rows)
        ),
    )
    index = build_index(model, reader, batch_size=2, workers=0)
    assert read == list(range(9))  # one image at a time, each once: never all at once
    assert added == [4, 4, 1]  # codes added a chunk at a time
    np.testing.assert_array_equal(index.codes, model.encode(pixels))
    # decoded by two worker processes: the same codes, in the same order
    in_workers = build_index(model, reader, batch_size=2, workers=2)
    np.testing.assert_array_equal(in_workers.codes, index.codes)


def _encode_peak_rss(model_dir, folder, out):
    """Peak RSS (MiB) of a fresh `dpq encode --loading stream --workers 2` process over
    ``folder`` at 224 px, and of its largest DataLoader worker, with glibc's mmap threshold
    fixed (large freed blocks go back to the system at once)."""
    script = textwrap.dedent(
        f"""
        import json, resource
        from dpq.cli import main
        code = main(["encode", "--model", {str(model_dir)!r}, "--images", {str(folder)!r},
                     "--image-size", "224", "--loading", "stream", "--workers", "2",
                     "--batch-size", "32", "--device", "cpu", "--quiet", "--out", {str(out)!r}])
        print(json.dumps({{"code": code,
                          "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(encoding.__file__).parents[2]),  # src/
        # glibc raises its mmap threshold each time a large block is freed, after which
        # blocks of a batch's size (a float (32, 3, 224, 224) is 18 MiB) come from the heap
        # and its arenas (one per thread), where freed ones stay resident: peak RSS then
        # grows with the number of batches by whatever the scheduling left behind (+60 MiB
        # at 800 images under a load of 10, 0 when idle). A fixed threshold maps and unmaps
        # every large block, so peak RSS follows the memory in use, which is the claim.
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streamed_encoding_memory_does_not_grow_with_the_collection(tmp_path):
    """224 px JPEGs encoded on demand by two workers: peak RSS at 800 images is that at 200
    (decoded up front, the 600 more images alone would take 86 MiB). The two-size
    measurement at 3,000 and 12,000 images is benchmarks/stream_memory.py."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(200):
        folder = tmp_path / "images-200" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((224, 224), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    for i in range(800):  # the 200 files four times over, as links: each is decoded anyway
        folder = tmp_path / "images-800" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").hardlink_to(
            tmp_path / "images-200" / f"class{i % 4}" / f"{i % 200:05d}.jpg"
        )
    torch.manual_seed(0)
    config = DPQConfig(  # a small network reading the 224 px images shrunk to 32 px
        model=ModelConfig(
            backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=4, image_size=32
        ),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=8),
    )
    DPQModel(config).save_checkpoint(tmp_path / "model")
    small, large = (
        _encode_peak_rss(tmp_path / "model", tmp_path / f"images-{n}", tmp_path / f"{n}.npz")
        for n in (200, 800)
    )
    assert small["code"] == large["code"] == 0
    assert DPQIndex.load(tmp_path / "800.npz").ntotal == 800
    decoded_extra = 600 * 224 * 224 * 3 / 2**20
    assert large["main"] - small["main"] < 0.3 * decoded_extra, (small, large)
    assert large["workers"] - small["workers"] < 0.3 * decoded_extra, (small, large)


class CountingClock:
    """A clock that moves one second each time it is read: each timed block adds 1 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_build_index_through_an_engine_has_torchs_codes_and_times_each_stage(
    exported_encoders, engine
):
    from conftest import encoder_inputs, needs_engine
    from dpq.encode.stages import StageTimes
    from dpq.inference import open_engine
    from dpq.methods import load_network

    needs_engine(engine)
    model_dir, onnx_path = exported_encoders["resnet9"]  # a ResNet-9 on 32 px images
    network = load_network(model_dir)
    inputs = encoder_inputs("resnet9", 400)
    opened = open_engine(model_dir, engine, onnx_path, threads=2, batch_size=64)
    stages = StageTimes(clock=CountingClock())
    index = build_index(network, inputs, engine=opened, stages=stages)
    reference = build_index(network, inputs)
    agreement = (index.codes == reference.codes).all(axis=1).mean()
    assert agreement >= 0.999, f"{engine} codes agree for {agreement:.4f} of the items"
    # 7 batches of 64: 7 forward passes, 8 waits for a batch (the last finds none), 1 chunk
    assert stages.seconds == {"decode": 8.0, "network": 7.0, "codes": 1.0, "file": 0.0}
    assert stages.items == 400


def test_build_index_refuses_an_engine_of_another_model(images, model):
    from dpq.inference.engines import TorchEngine

    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=3, codebook_size=16, dim=6),
    )
    other = TorchEngine(DPQModel(config).eval())  # 6-dim features, the model's are 10-dim
    with pytest.raises(ValueError, match="open the engine for this model's checkpoint"):
        build_index(model, images, engine=other)
