"""Encoding throughput on this machine's CPU: dpq's feature extraction, with the images in
memory and read on demand through DataLoader workers, beside plain inference of the same
backbone measured in the same run.

Rows for each backbone (images/s, higher is better):

- ``bare, tensors``: the backbone alone in eval mode under ``torch.inference_mode`` on float
  tensors that are already normalised and in memory: torchvision's own module where
  torchvision imports, else dpq's module of the same layout (the same state dict and the
  same arithmetic; tests/test_backbones.py) -- the ceiling.
- ``dpq, in memory``: ``DPQModel.extract_features`` on a uint8 array (normalisation, the
  network, the semantic head and the classifier); its overhead is against ``bare, tensors``.
- ``bare, DataLoader``: a plain torchvision-style loop: ``workers`` processes open, decode,
  resize and normalise each image (PIL + numpy, as ``transforms.Resize/ToTensor/Normalize``
  do), the network reads the batches.
- ``dpq, streaming``: ``DPQModel.extract_features`` on an ``ImageFileReader`` with the same
  worker count; its overhead is against ``bare, DataLoader``.

With ``--engine torch,onnxruntime,openvino`` each backbone also gets a table of the same
in-memory images through each inference engine (:func:`dpq.inference.open_engine`: the
checkpoint in eager torch, its ONNX export in ONNX Runtime and in OpenVINO, float32, the
same threads and batch size): images/s and the ratio against eager torch measured in the
same run, the share of items whose codes equal eager torch's and the largest feature
difference (``--no-paths`` leaves out the four rows above; the export's one-time cost is
printed apart). ``--end-to-end`` adds ``dpq encode`` itself through each engine
(:func:`dpq.encode.job.encode_collection`: the JPEGs read on demand by the decoding workers,
the network, the codes, the index file): items/s of the whole call and of each stage, and the
codes' agreement with the torch run.

Backbones: the CIFAR-10 recipe's ResNet-9 (half width) at 32 px on real CIFAR-10 JPEGs
(``--model32``: a trained checkpoint, default a random one), ResNet-18 and AlexNet at 224 px
on the same images upscaled to 256 px JPEGs and resized to 224 while reading. Test-time
flipping is off in every row (it doubles every row alike). Channels-last memory throughout.

    flock /tmp/dpq-heavy.lock python benchmarks/encode_speed.py \
        --model32 /work/scratch/after-repro2/model --workers 2
    flock /tmp/dpq-heavy.lock python benchmarks/encode_speed.py \
        --model32 /work/scratch/after-repro2/model --engine torch,onnxruntime,openvino --no-paths
    nice -n 10 python benchmarks/encode_speed.py --model32 RUN/model \
        --engine torch,onnxruntime,openvino --no-paths --end-to-end --count32 256 --count224 32 \
        --batch224 32 --repeats 1 --threads 2 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
from dpq.data import load_source
from dpq.devices import available_cores
from dpq.inference import ENGINES, open_engine
from dpq.methods import method_for
from dpq.model.backbones import create_backbone
from dpq.model.network import DPQModel
from dpq.recipes import cifar10_recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"


def extract_cifar(
    zip_path: Path, out: Path, count: int, side: int | None, first: int = 0, limit: int = 0
) -> Path:
    """``count`` evenly spaced training JPEGs of the CIFAR-10 zip as ``<class>/<file>``
    (resized to ``side`` and saved as JPEG quality 90 when given); ``first`` > 0 shifts the
    choice to images none of ``first=0`` picked, and ``limit`` keeps at most that many."""
    if out.exists():
        return out
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(
            n for n in archive.namelist() if n.startswith("train/") and n.endswith(".jpg")
        )
        step = max(1, len(names) // count)
        for name in names[first::step][: limit or count]:
            _, label, base = name.split("/")
            (out / label).mkdir(parents=True, exist_ok=True)
            data = archive.read(name)
            if side is None:
                (out / label / base).write_bytes(data)
            else:
                with Image.open(__import__("io").BytesIO(data)) as image:
                    big = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
                    big.save(out / label / base, quality=90)
    return out


class PlainFolder(Dataset):
    """What a torchvision-style inference script does per image: open, decode, RGB, resize
    (bilinear), to float CHW in 0..1, normalise."""

    def __init__(self, reader, mean, std):
        self.paths = [Path(reader.store.path) / name for name in reader.names]
        self.size = reader.image_size
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
            if rgb.size != (self.size[1], self.size[0]):
                rgb = rgb.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)


def bare_network(name: str, kwargs: dict) -> tuple[torch.nn.Module, str]:
    """torchvision's module when torchvision imports here, else dpq's of the same layout."""
    if name in ("alexnet", "resnet18"):
        try:
            import torchvision.models as models

            net = getattr(models, name)(weights=None)
            if name == "alexnet":
                net.classifier[6] = torch.nn.Identity()
            else:
                net.fc = torch.nn.Identity()
            return net.eval(), "torchvision"
        except Exception:
            pass
    return create_backbone(name, **kwargs).eval(), "dpq (same layout)"


def rate(count: int, run) -> float:
    began = time.perf_counter()
    run()
    return count / (time.perf_counter() - began)


def bench_backbone(label, model, images, reader, workers, batch_size, repeats, compile_=False):
    """images/s of the four rows for one backbone (and, with ``compile_``, of the in-memory
    path with ``torch.compile`` on the backbone, compile time reported apart)."""
    cfg = model.config.model
    bare, where = bare_network(cfg.backbone, cfg.backbone_kwargs)
    bare = bare.to(memory_format=torch.channels_last)
    model.set_channels_last(True)
    n = len(images)
    x = model.prepare_inputs(torch.from_numpy(images)).contiguous(memory_format=torch.channels_last)

    def bare_tensors():
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                bare(x[start : start + batch_size])

    loader = DataLoader(
        PlainFolder(reader, cfg.image_mean, cfg.image_std),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def bare_loader():
        with torch.inference_mode():
            for batch in loader:
                bare(batch.contiguous(memory_format=torch.channels_last))

    def dpq_memory():
        model.extract_features(images, batch_size=batch_size, tta_flip=False, workers=0)

    def dpq_stream():
        model.extract_features(reader, batch_size=batch_size, tta_flip=False, workers=workers)

    rows = {}
    for name, run in (
        ("bare, tensors", bare_tensors),
        ("dpq, in memory", dpq_memory),
        ("bare, DataLoader", bare_loader),
        ("dpq, streaming", dpq_stream),
    ):
        run()  # warm-up (worker start, oneDNN primitives)
        rows[name] = max(rate(n, run) for _ in range(repeats))
    if compile_:
        eager = model.backbone
        model.backbone = torch.compile(eager)
        began = time.perf_counter()
        dpq_memory()  # compiles
        print(f"torch.compile of {label}: {time.perf_counter() - began:.1f} s (first pass)")
        rows["dpq, in memory, torch.compile"] = max(rate(n, dpq_memory) for _ in range(repeats))
        model.backbone = eager
    print(f"\n### {label} (bare network: {where}; {n} images, batch {batch_size})")
    print("| path | images/s | overhead vs bare |")
    print("|---|---:|---:|")
    for name, value in rows.items():
        base = rows["bare, tensors"] if "in memory" in name else rows["bare, DataLoader"]
        overhead = "" if name.startswith("bare") else f"{(base / value - 1) * 100:+.1f} %"
        print(f"| {name} | {value:,.0f} | {overhead} |")
    return rows


def cpu_flags() -> str:
    """The SIMD flags of this CPU that decide the engines' kernels."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16")
    return " ".join(flag for flag in wanted if f" {flag}" in line) or "none of avx2/avx512"


def engine_run(item: str) -> tuple[str, str]:
    """(engine, precision) of a ``--engine`` item ENGINE[:PRECISION] (default fp32)."""
    name, _, precision = item.strip().partition(":")
    return name, precision or "fp32"


def compared_runs(engines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Eager torch in float32 first (the reference), then each other (engine, precision)."""
    return [("torch", "fp32"), *[run for run in engines if run != ("torch", "fp32")]]


def run_label(name: str, precision: str) -> str:
    return name if precision == "fp32" else f"{name} {precision}"


def engine_versions(engines: list[tuple[str, str]]) -> str:
    versions = [f"torch {torch.__version__}"]
    for name in sorted({name for name, _ in engines}):
        if name != "torch":
            try:
                versions.append(f"{name} {__import__(name).__version__}")
            except ImportError:
                versions.append(f"{name} missing")
    return ", ".join(versions)


def bench_engines(
    label, model, images, engines, threads, batch_size, repeats, workdir, calibration=None
):
    """images/s of each engine on the in-memory images, against eager torch in the same run,
    with the codes' agreement and the largest feature difference; with ``calibration``
    (images) also ONNX Runtime in int8 calibrated on them."""
    model_dir = model.save_checkpoint(Path(workdir) / label.split()[0] / "model")
    method = method_for(model.config)
    side = images.shape[1]
    runs = compared_runs(engines)
    if calibration is not None:
        runs.append(("onnxruntime", "int8"))
    rows = {}
    reference = None
    for name, precision in runs:
        began = time.perf_counter()
        engine = open_engine(
            model_dir,
            name,
            threads=threads,
            batch_size=batch_size,
            image_size=None if name == "torch" else side,
            tta_flip=False,
            precision=precision,
            calibration=calibration if precision == "int8" else None,
        )
        opened = time.perf_counter() - began
        if name == "torch":
            engine.network.set_channels_last(True)
        features = engine.features(images)  # warm-up (oneDNN primitives, first-run plans)
        speed = max(rate(len(images), partial(engine.features, images)) for _ in range(repeats))
        if reference is None:  # eager torch, the first engine
            network = engine.network
            reference = (features, method.encode(network, features), speed)
        codes = method.encode(network, features)
        rows[run_label(name, precision)] = (
            speed,
            speed / reference[2],
            float((codes == reference[1]).all(axis=1).mean()),
            float(np.abs(features - reference[0]).max()),
            opened,
        )
        engine.close()
    print(f"\n### {label}: engines ({len(images)} images in memory, batch {batch_size}, "
          f"{threads} threads, no flip)")  # fmt: skip
    print("| engine | images/s | vs eager torch | codes = torch's | max feature diff | open s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (speed, ratio, agree, diff, opened) in rows.items():
        print(
            f"| {name} | {speed:,.0f} | {ratio:.2f}x | {agree * 100:.2f} % | {diff:.1e} "
            f"| {opened:.1f} |"
        )
    return rows


def bench_encode(label, model_dir, folder, side, engines, workers, batch_size, workdir):
    """`dpq encode` end to end (:func:`dpq.encode.job.encode_collection`) through each engine:
    the JPEG folder read on demand by ``workers`` decoding processes, the network, the codes,
    the index file; items/s of the whole call and of each stage
    (:class:`dpq.encode.stages.StageTimes`), test-time flip as the model is configured. The
    engines' exports are made before the timed call (the cache beside the checkpoint)."""
    from dpq.data import SourceSpec
    from dpq.encode.job import EncodeSettings, encode_collection
    from dpq.index.kinds import load_any

    source = SourceSpec(images=str(folder), image_size=side, loading="stream")
    rows, reference = {}, None
    for name, precision in compared_runs(engines):
        out = Path(workdir) / f"encode-{name}-{precision}.npz"
        settings = EncodeSettings(
            out,
            source,
            model=model_dir,
            engine=name,
            engine_precision=precision,
            workers=workers,
            batch_size=batch_size,
        )
        encode_collection(replace(settings, out=out.with_suffix(".warm.npz")))  # export, warm
        began = time.perf_counter()
        result = encode_collection(settings)
        seconds = time.perf_counter() - began
        codes = load_any(out).codes
        reference = codes if reference is None else reference
        agree = float((codes == reference).all(axis=1).mean())
        rows[run_label(name, precision)] = (result.stages.items / seconds, result.stages, agree)
    flip = "flip on" if load_network_config(model_dir).model.tta_flip else "no flip"
    print(f"\n### {label}: `dpq encode` end to end ({len(reference)} JPEGs read on demand by "
          f"{workers} workers, batch {batch_size}, {flip})")  # fmt: skip
    print("| engine | items/s, whole call | decode | network | codes | file | codes = torch's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (speed, stages, agree) in rows.items():
        per_stage = " | ".join(
            "-" if stages.rate(s) == float("inf") else f"{stages.rate(s):,.0f}"
            for s in ("decode", "network", "codes", "file")
        )
        print(f"| {name} | {speed:,.0f} | {per_stage} | {agree * 100:.2f} % |")
    return rows


def bench_map(model_dir, data, engines, db_count, query_count, threads, workdir):
    """mAP of the trained 32 px model on a CIFAR-10 slice through each engine: ``db_count``
    evenly spaced training JPEGs as the database, ``query_count`` others as queries, full
    ranking by the model's search (mAP@db_count, the DPQ convention), flip as configured."""
    from dpq.evaluate.metrics import map_at_r
    from dpq.index.kinds import search_features
    from dpq.methods import load_network

    db_source = load_source(extract_cifar(Path(data), Path(workdir) / "map-db", db_count, None))
    query_folder = extract_cifar(Path(data), Path(workdir) / "map-q", db_count, None, 1)
    query_source = load_source(query_folder)
    queries = query_source.inputs[:query_count]
    query_labels = np.asarray(query_source.labels)[:query_count]
    import shutil

    copy = Path(workdir) / "map-model"  # the engines' export cache goes beside the copy
    if not copy.exists():
        shutil.copytree(model_dir, copy)
    source, model_dir = model_dir, copy
    network = load_network(model_dir)
    method = method_for(network.config)
    rows = {}
    for name, precision in compared_runs(engines):
        engine = open_engine(
            model_dir,
            name,
            threads=threads,
            image_size=None if name == "torch" else 32,
            precision=precision,
        )
        db_features = engine.features(db_source.inputs)
        query_features = engine.features(queries)
        engine.close()
        index = method.new_index(network)
        index.add(method.encode(network, db_features), labels=np.asarray(db_source.labels))
        _, ids = search_features(index, query_features, index.ntotal, method=method)
        rows[run_label(name, precision)] = map_at_r(ids, query_labels, np.asarray(db_source.labels))
    print(f"\n### mAP@{len(db_source.inputs)} of {source} through each engine "
          f"({len(queries)} queries, {len(db_source.inputs)} database images of CIFAR-10 train)")  # fmt: skip
    print("| engine | mAP | vs torch |")
    print("|---|---:|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.4f} | {value - rows['torch']:+.4f} |")
    return rows


def load_network_config(model_dir):
    from dpq.model.files import read_checkpoint_config

    return read_checkpoint_config(model_dir)[0]


def random_model(backbone: str, kwargs: dict | None = None) -> DPQModel:
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(
            backbone=backbone,
            backbone_kwargs=kwargs or {},
            image_mean=(0.485, 0.456, 0.406),
            image_std=(0.229, 0.224, 0.225),
        ),
        quantizer=QuantizerConfig(num_levels=4, codebook_size=256, dim=300),
    )
    return DPQModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED), help="the CIFAR-10 JPEG zip")
    parser.add_argument("--model32", help="a trained 32 px checkpoint (default: random)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--count32", type=int, default=4096)
    parser.add_argument("--count224", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes, best kept")
    parser.add_argument("--batch32", type=int, default=256)
    parser.add_argument("--batch224", type=int, default=64)
    parser.add_argument("--workdir", help="keep the extracted images here")
    parser.add_argument("--only", nargs="+", default=["resnet9", "resnet18", "alexnet"])
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile on the backbone"
    )
    parser.add_argument(
        "--engine",
        default="",
        help=f"comma list of inference engines to compare ({', '.join(ENGINES)}), each "
        "ENGINE[:PRECISION] (e.g. openvino:bf16; default fp32)",
    )
    parser.add_argument(
        "--no-paths", action="store_true", help="only the engine tables, not the four path rows"
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="with --engine: also `dpq encode` through each engine, items/s per stage",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also ONNX Runtime in int8, calibrated on 512 training images not among the timed",
    )
    parser.add_argument(
        "--map",
        metavar="DB,QUERIES",
        help="with --engine and --model32: mAP through each engine on this many CIFAR-10 "
        "training JPEGs as database and queries (e.g. 2000,200)",
    )
    parser.add_argument("--items", type=int, help="images per backbone (sets both counts)")
    parser.add_argument("--threads", type=int, default=available_cores())
    args = parser.parse_args()
    engines = [engine_run(item) for item in args.engine.split(",") if item.strip()]
    unknown = sorted({name for name, _ in engines} - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.items:
        args.count32 = args.count224 = args.items
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, workers {args.workers}")
    print(f"CPU flags: {cpu_flags()}; {engine_versions(engines)}")

    with tempfile.TemporaryDirectory(prefix="dpq-encode-speed-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)

        def calibration(side):
            count = args.count32 if side == 32 else args.count224
            folder = extract_cifar(
                Path(args.data), work / f"calib{side}", count, None if side == 32 else 256, 1, 512
            )
            return load_source(folder, image_size=side).inputs

        def run(label, model, images, reader, batch_size, folder=None):
            if not args.no_paths:
                bench_backbone(
                    label,
                    model,
                    images,
                    reader,
                    args.workers,
                    batch_size,
                    args.repeats,
                    args.compile,
                )
            if engines:
                bench_engines(
                    label,
                    model,
                    images,
                    engines,
                    args.threads,
                    batch_size,
                    args.repeats,
                    work,
                    calibration(images.shape[1]) if args.int8 else None,
                )
            if engines and args.end_to_end:
                bench_encode(
                    label,
                    Path(work) / label.split()[0] / "model",
                    folder,
                    images.shape[1],
                    engines,
                    args.workers,
                    batch_size,
                    Path(work) / label.split()[0],
                )

        if args.map and engines and args.model32:
            db_count, query_count = (int(v) for v in args.map.split(","))
            bench_map(args.model32, args.data, engines, db_count, query_count, args.threads, work)
        if "resnet9" in args.only:
            folder = extract_cifar(Path(args.data), work / "cifar32", args.count32, None)
            images = load_source(folder).inputs
            reader = load_source(folder, image_size=32, in_memory=False).inputs
            if args.model32:
                model = DPQModel.from_checkpoint(args.model32)
            else:
                torch.manual_seed(0)
                model = DPQModel(cifar10_recipe())
            run("resnet9 (half width) at 32 px", model, images, reader, args.batch32, folder)
        big = [name for name in ("resnet18", "alexnet") if name in args.only]
        if big:
            folder = extract_cifar(Path(args.data), work / "cifar256", args.count224, 256)
            images = load_source(folder, image_size=224).inputs
            reader = load_source(folder, image_size=224, in_memory=False).inputs
            for name in big:
                run(
                    f"{name} at 224 px (256 px JPEGs resized while reading)",
                    random_model(name),
                    images,
                    reader,
                    args.batch224,
                    folder,
                )


if __name__ == "__main__":
    main()
