"""Shared test settings and tiny deterministic data: small thread counts so the suite behaves
on two cores; Gaussian-blob features and a slice of scikit-learn's digits."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import io  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_ZIP = SHARED / "data" / "cifar10" / "cifar10-jpeg.zip"
WORDVEC = SHARED / "data" / "wordvec"
QUIET = {"progress": False, "log": lambda message: None}


def feature_data(n: int = 120, dim: int = 12, classes: int = 3, seed: int = 0):
    """Gaussian blobs as an ArrayDataset: one direction per class plus noise, float32 (n, dim)."""
    from dpq.training.loop import ArrayDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)) * 2.0
    features = centres[labels] + rng.normal(size=(n, dim))
    return ArrayDataset(features.astype(np.float32), labels.astype(np.int64))


def shrinking_codebooks(num_levels: int, codebook_size: int, dim: int) -> np.ndarray:
    """float32 (L, K, D) Gaussian codebooks (seed 0), level l scaled by 0.5 ** l, as the
    levels of a trained residual quantizer shrink."""
    rng = np.random.default_rng(0)
    scales = 0.5 ** np.arange(num_levels)[:, None, None]
    return (rng.standard_normal((num_levels, codebook_size, dim)) * scales).astype(np.float32)


def blob_batch():
    """One batch for a step loss: feature_data(n=16, classes=4) as tensors, float32 (16, 12)
    inputs and int64 (16,) labels."""
    import torch

    data = feature_data(n=16, classes=4)
    return torch.from_numpy(data.images), torch.from_numpy(data.labels)


def feature_config(**train):
    """A DPQConfig for feature_data(): identity backbone, L=2, K=8, D=6, no semantic loss."""
    from dpq.config import DPQConfig, LossConfig, ModelConfig, QuantizerConfig, TrainConfig

    options = {"epochs": 4, "batch_size": 40, "lr": 0.05, "keep_checkpoints": 10, **train}
    return DPQConfig(
        model=ModelConfig(backbone="identity", backbone_kwargs={"in_features": 12}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=8, dim=6),
        loss=LossConfig(use_semantic=False),
        train=TrainConfig(**options),
    )


def digits_config(**train):
    """A DPQConfig for the digits slice: small_cnn at width 0.25, L=2, K=16, D=12."""
    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig

    options = {"epochs": 3, "batch_size": 48, "lr": 0.05, "crop_pad": 1, "flip": False, **train}
    return DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=10),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=12),
        train=TrainConfig(**options),
    )


def orthogonal(classes: int, dim: int) -> np.ndarray:
    from dpq.data import orthogonal_label_embeddings

    return orthogonal_label_embeddings(classes, dim)


@pytest.fixture(scope="session")
def digits():
    """24 digits per class (240 images, uint8 (240, 8, 8, 3)) as an ArrayDataset."""
    from dpq.data import load_digits
    from dpq.training.loop import ArrayDataset

    dataset = load_digits()
    keep = np.concatenate([np.flatnonzero(dataset.labels == c)[:24] for c in range(10)])
    return ArrayDataset(np.asarray(dataset.images)[keep], dataset.labels[keep])


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.01,
) -> None:
    """Call ``predicate`` every ``interval`` s until it returns something true; after
    ``timeout`` s raise AssertionError("timed out after <timeout> s waiting for <what>")
    (``what`` may be a function, called then, for a message that shows the state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}")
        time.sleep(interval)


def join_threads(threads: Sequence[threading.Thread], timeout: float, what: str) -> None:
    """Join every thread of ``threads`` within ``timeout`` s in all, or raise AssertionError
    ("timed out after <timeout> s waiting for <what>")."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    wait_until(lambda: not any(thread.is_alive() for thread in threads), 0.0, what)


class StreamLines:
    """The lines of a text stream (a child process's pipe), read on a daemon thread so that
    a test waits for them with :func:`wait_until` instead of a readline that may never
    return. ``lines``: the lines so far; ``closed``: the stream has ended."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.closed = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                self.lines.append(line)
        finally:
            self.closed = True

    def text(self, start: int = 0) -> str:
        """The lines from line ``start`` on, joined."""
        return "".join(self.lines[start:])


class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def feature_dir(tmp_path_factory):
    """Clustered 16-d features saved as .npy, plus a DPQ-format index of the database
    (codebooks from faiss residual quantization, 2 levels of 8 bits)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (5, 16))
    labels = rng.integers(0, 5, 900)
    features = (centers[labels] + rng.normal(0.0, 1.5, (900, 16))).astype(np.float32)
    directory = tmp_path_factory.mktemp("features")
    parts = {"query": slice(0, 30), "db": slice(30, 900), "train": slice(30, 630)}
    for part, rows in parts.items():
        np.save(directory / f"{part}_features.npy", features[rows])
        np.save(directory / f"{part}_labels.npy", labels[rows])
    import faiss

    from dpq.index import DPQIndex

    quantizer = faiss.IndexResidualQuantizer(16, 2, 8)
    quantizer.train(features[parts["train"]])
    quantizer.add(features[parts["db"]])
    DPQIndex.from_faiss(quantizer).save(directory / "index.npz")
    return directory


LISTS = SHARED / "data" / "lists"

needs_cifar_zip = pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason=f"shared CIFAR-10 zip not found at {CIFAR_ZIP}"
)
needs_lists = pytest.mark.skipif(not LISTS.is_dir(), reason=f"shared list files not at {LISTS}")


# --------------------------------------------------------------------------- images


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], size: int = 8, seed: int = 0) -> dict:
    """<class>/<i>.png images; returns {class: [arrays]}."""
    rng = np.random.default_rng(seed)
    made: dict[str, list[np.ndarray]] = {}
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        made[name] = []
        for i in range(count):
            image = random_image(rng, size, size)
            (root / name / f"{i:03d}.png").write_bytes(png_bytes(image))
            made[name].append(image)
    return made


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    return png_bytes(random_image(rng, 32, 32), "JPEG")[:200]


# --------------------------------------------------------------------------- pickles


def py2_string(data: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)


def py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch laid out like the official files (Python 2 cPickle, protocol 2)."""
    shape = b"(" + b"".join(py2_int(d) for d in data.shape) + b"t"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + py2_int(0)
        + b"\x85"
        + py2_string(b"b")
        + b"\x87R("
        + py2_int(1)
        + shape
        + b"cnumpy\ndtype\n"
        + py2_string(b"u1")
        + py2_int(0)
        + py2_int(1)
        + b"\x87R("
        + py2_int(3)
        + py2_string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
        + py2_int(0)
        + b"tb\x89"
        + py2_string(data.tobytes())
        + b"tb"
    )
    names = b"](" + b"".join(py2_string(f"img_{i}.png".encode()) for i in range(len(labels)))
    return (
        b"\x80\x02}("
        + py2_string(b"batch_label")
        + py2_string(b"training batch 1 of 5")
        + py2_string(b"data")
        + array
        + py2_string(b"labels")
        + b"]("
        + b"".join(py2_int(v) for v in labels)
        + b"e"
        + py2_string(b"filenames")
        + names
        + b"eu."
    )


class RunsCode:
    """Pickles as a call of os.system that touches ``marker``: unpickling it runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def make_list_source(root: Path, per_class: int = 10) -> Path:
    """A list file (root/list.txt) of 3 x per_class 8x8 PNGs under root/images."""
    make_image_folder(root / "images", {c: per_class for c in "abc"}, size=8)
    names = [f"{c}/{i:03d}.png {k}\n" for k, c in enumerate("abc") for i in range(per_class)]
    (root / "list.txt").write_text("".join(names))
    return root / "list.txt"


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random small_cnn model (width 0.25, 3 classes, L=3, K=16, D=12) saved as a checkpoint."""
    return save_small_model(tmp_path_factory.mktemp("small-model") / "model")


def save_small_model(path: Path, num_classes: int = 3) -> Path:
    """A random small_cnn model (width 0.25, L=3, K=16, D=12) saved as a checkpoint at path."""
    import torch

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
    from dpq.model.network import DPQModel

    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(
            backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=num_classes
        ),
        quantizer=QuantizerConfig(num_levels=3, codebook_size=16, dim=12),
    )
    DPQModel(config).eval().save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def small_cifar_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip with the shared zip's layout: 3 train + 2 test real JPEGs per class."""
    from dpq.data import CIFAR10_CLASSES

    if not CIFAR_ZIP.is_file():
        pytest.skip(f"shared CIFAR-10 zip not found at {CIFAR_ZIP}")
    out = tmp_path_factory.mktemp("cifar") / "small-cifar.zip"
    with zipfile.ZipFile(CIFAR_ZIP) as source, zipfile.ZipFile(out, "w") as target:
        names = set(source.namelist())
        for split, count in (("train", 3), ("test", 2)):
            for class_name in CIFAR10_CLASSES:
                members = sorted(
                    n
                    for n in names
                    if n.startswith(f"{split}/{class_name}/") and n.endswith(".jpg")
                )[:count]
                for member in reversed(members):  # stored out of order on purpose
                    target.writestr(member, source.read(member))
    return out


# --------------------------------------------------------------------------- a small model


def small_config(**quantizer):
    """small_cnn at width 0.25 for 8x8 images, 4 classes, L=3, K=16, D=10 (override quantizer)."""
    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig

    q = {"num_levels": 3, "codebook_size": 16, "dim": 10, **quantizer}
    return DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=4),
        quantizer=QuantizerConfig(**q),
    )


@pytest.fixture
def images() -> np.ndarray:
    """uint8 (9, 8, 8, 3) random images."""
    return np.random.default_rng(0).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)


@pytest.fixture
def model():
    """A seeded, untrained DPQModel of small_config()."""
    import torch

    from dpq.model.network import DPQModel

    torch.manual_seed(0)
    return DPQModel(small_config())


# --------------------------------------------------------------------------- no network


class NetworkCallAttempted(AssertionError):
    """A test marked ``no_network`` tried to open a connection."""


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to reach the network (sockets or urllib)."""
    import socket
    import urllib.request

    def refuse(*args, **kwargs):
        raise NetworkCallAttempted(f"a network call was attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return NetworkCallAttempted


# --------------------------------------------------------------------------- retrieval methods


def method_config(name: str, bits: int = 16, options: dict | None = None, **train):
    """A feature_config() for a method trained per code length, on feature_data(classes=4):
    8 epochs of batches of 40."""
    settings = {"epochs": 8, "batch_size": 40, "lr": 0.05, **train}
    return feature_config(**settings).replace(
        model={"num_classes": 4},
        method={"name": name, "bits": bits, "options": options or {}},
    )


def seeded_network(method):
    """The method's fresh network, built after seeding torch with 0 (the same every time)."""
    import torch

    torch.manual_seed(0)
    return method.build_network()


class TrainedMethod:
    """A method trained by the loop on 400 Gaussian-blob items of 4 classes, its saved model
    loaded back, its codes in an index of items 40.. searched with queries 0..39.

    Attributes: result (TrainResult), network (loaded from the run), method, data, features
    (float32 (400, D) of the loaded network), codes, index, ranked (int64 (40, 360)),
    score (mAP of the ranking), chance (a random ranking's expected mAP), loss_totals (the
    mean total loss of each epoch).
    """

    def __init__(self, config, tmp_path: Path, word_vectors=None) -> None:
        from dpq.evaluate.metrics import map_at_r, relevant_share
        from dpq.methods import load_network, method_for
        from dpq.training.loop import train_model

        self.data = feature_data(n=400, classes=4, seed=3)
        self.result = train_model(config, self.data, word_vectors, tmp_path / "run", **QUIET)
        self.loss_totals = [record["total"] for record in self.result.history]
        self.network = load_network(tmp_path / "run" / "model")
        self.method = method_for(self.network.config)
        self.features = self.network.extract_features(self.data.images)
        np.testing.assert_array_equal(
            self.features, self.result.model.extract_features(self.data.images)
        )
        self.codes = self.method.encode(self.network, self.features)
        self.index = self.method.new_index(self.network, metadata={"method": config.method.name})
        self.index.add(self.codes[40:], labels=self.data.labels[40:])
        _, self.ranked = self.method.search(self.index, self.features[:40], k=360)
        queries, database = self.data.labels[:40], self.data.labels[40:]
        self.score = map_at_r(self.ranked, queries, database)
        self.chance = float(relevant_share(queries, database).mean())

    def search_after_reload(self, tmp_path: Path) -> np.ndarray:
        """The same search on the index saved to ``tmp_path`` and loaded back: it must rank
        as :attr:`ranked`; returns its distances (40, 360)."""
        path = self.index.save(tmp_path / "codes.npz")
        loaded = self.method.load_index(path)
        assert loaded.ntotal == 360
        distances, ranked = self.method.search(loaded, self.features[:40], k=360)
        np.testing.assert_array_equal(ranked, self.ranked)
        return distances

    def check_sign_codes(self) -> None:
        """The codes are the packed signs of the features (bit b set where output b > 0)."""
        np.testing.assert_array_equal(np.unpackbits(self.codes, axis=1), self.features > 0)


# --------------------------------------------------------------------------- exported encoders


def needs_engine(engine: str) -> None:
    """Skip the test, saying why, when the package of the inference engine ``engine`` is not
    installed (the inference extra)."""
    import importlib.util

    if engine != "torch" and importlib.util.find_spec(engine) is None:
        pytest.skip(
            f"the {engine} engine's package is not installed (pip install 'dpq[inference]')"
        )


ENCODER_MODELS = ("identity", "resnet9", "recipe")
"""The models :func:`exported_encoders` exports: features through the identity backbone, a
quarter-width ResNet-9 on 32 px images (semantic features), and the CIFAR-10 recipe's
network (flip-averaged class posteriors, D=300, L=4, K=256)."""


def encoder_inputs(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Raw inputs of the model ``name`` of :data:`ENCODER_MODELS`: float32 (n, 12) rows, or
    uint8 (n, 32, 32, 3) images (smooth random shapes plus noise, not pure noise)."""
    rng = np.random.default_rng(seed)
    if name == "identity":
        return rng.normal(size=(n, 12)).astype(np.float32)
    grid = np.linspace(0.0, 1.0, 32)
    waves = np.sin(
        rng.uniform(2, 12, (n, 1, 1, 3)) * grid[None, :, None, None]
        + rng.uniform(2, 12, (n, 1, 1, 3)) * grid[None, None, :, None]
        + rng.uniform(0, 6, (n, 1, 1, 3))
    )
    noise = rng.normal(0.0, 0.15, (n, 32, 32, 3))
    return np.clip((waves * 0.5 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)


def save_encoder_model(name: str, path: Path) -> Path:
    """A random model ``name`` of :data:`ENCODER_MODELS`, its codebooks initialised by
    k-means on the features of 300 inputs (seed 1), saved as a checkpoint at ``path``. The
    recipe's classifier weights are scaled up: the posteriors of a random network are so
    close to uniform that codes hinge on differences of 1e-6, which no trained model has."""
    import torch

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
    from dpq.methods import method_for
    from dpq.recipes import cifar10_recipe

    torch.manual_seed(0)
    if name == "identity":
        config = DPQConfig(
            model=ModelConfig(backbone="identity", backbone_kwargs={"in_features": 12}),
            quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=8),
        )
    elif name == "resnet9":
        config = DPQConfig(
            model=ModelConfig(backbone="resnet9", backbone_kwargs={"width": 0.25}),
            quantizer=QuantizerConfig(num_levels=3, codebook_size=32, dim=24),
        )
    else:
        config = cifar10_recipe()
    method = method_for(config)
    network = method.build_network().eval()
    if config.model.feature == "class_posterior":
        with torch.no_grad():  # posteriors as peaked as a trained network's, not near-uniform
            network.classifier.weight.mul_(20.0)
    method.init_codebooks(network, network.extract_features(encoder_inputs(name, 300, seed=1)))
    network.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def exported_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint directory, ONNX export at 32 px) for each of
    :data:`ENCODER_MODELS`; skipped without the export's packages (the inference extra)."""
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    from dpq.inference.export import export_onnx

    root = tmp_path_factory.mktemp("encoders")
    made = {}
    for name in ENCODER_MODELS:
        model_dir = save_encoder_model(name, root / name / "model")
        onnx_path = root / name / "encoder.onnx"
        export_onnx(model_dir, onnx_path, image_size=32)
        made[name] = (model_dir, onnx_path)
    return made


@pytest.fixture(scope="session")
def encoder_references(exported_encoders) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (400 raw inputs, their float32 features from the checkpoint in eager torch)
    for each of :data:`ENCODER_MODELS`: the reference every engine is compared with."""
    from dpq.methods import load_network

    made = {}
    for name, (model_dir, _) in exported_encoders.items():
        inputs = encoder_inputs(name, 400)
        made[name] = (inputs, load_network(model_dir).extract_features(inputs))
    return made


# ---------------------------------------------------------------- headless Chromium (page tests)

CHROMIUM = Path(os.environ.get("DPQ_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps calling home, which on a closed
# network means a flood of failing connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install chromium`; "
    ".ci/run does) or point DPQ_CHROMIUM at a Chromium binary",
)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's, driven by Playwright) per test module; each test
    opens its own pages."""
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="the page tests need the playwright package (the dev extra)"
    )
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()
