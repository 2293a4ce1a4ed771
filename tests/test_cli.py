"""The command line, through main([...]): every command's happy path on tiny data, and the
mistakes a user makes answered with one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_folder, needs_cifar_zip, truncated_jpeg
from dpq.cli import main
from dpq.data import Split, load_source, split_per_class
from dpq.model.network import DPQModel

# ---------------------------------------------------------------------------- data


@needs_cifar_zip
def test_cli_data_info_cifar(small_cifar_zip: Path, tmp_path: Path, capsys) -> None:
    code = main(["data", "info", str(small_cifar_zip), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0
    assert "images: 50" in out and "classes: 10" in out and "image size: 32 x 32 x 3" in out
    assert "airplane" in out and "5" in out.split("airplane")[1].splitlines()[0]
    assert "not applicable" in out and "has 5 items" in out


def test_cli_data_info_folder_and_errors(tmp_path: Path, capsys) -> None:
    make_image_folder(tmp_path / "set", {"a": 2, "b": 3})
    assert main(["data", "info", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert "images: 5" in out and "classes: 2" in out and "8 x 8 x 3" in out
    (tmp_path / "set" / "a" / "bad.jpg").write_bytes(truncated_jpeg(np.random.default_rng(10)))
    assert main(["data", "info", str(tmp_path / "set")]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "set"), "--skip-corrupt"]) == 0
    captured = capsys.readouterr()
    assert "images: 5" in captured.out and "1 images could not be decoded" in captured.out
    assert captured.err.startswith("dpq: warning: skipped 1 of 6 images")
    (tmp_path / "set" / "c").mkdir()
    assert main(["data", "info", str(tmp_path / "set"), "--skip-corrupt"]) == 2
    assert "has no images" in capsys.readouterr().err
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg 0 1\nb.jpg 1\n")
    assert main(["data", "info", str(listing)]) == 2
    assert "line 2" in capsys.readouterr().err


def _tiny_folder(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name / f"{i}.png")


def test_cli_data_split_writes_the_split(tmp_path: Path, capsys) -> None:
    from dpq.cli import main

    _tiny_folder(tmp_path / "set", {"a": 5, "b": 4})
    out = tmp_path / "split.json"
    args = [
        "data",
        "split",
        str(tmp_path / "set"),
        "--train-per-class",
        "2",
        "--query-per-class",
        "1",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert "train 4 / query 2 / database 3" in capsys.readouterr().out
    labels = np.array([0] * 5 + [1] * 4)
    assert Split.load(out) == split_per_class(labels, 2, 1, seed=0)
    assert (
        main([*args[:3], "--train-per-class", "4", "--query-per-class", "1", "--out", str(out)])
        == 2
    )
    assert "class 'b' (index 1) has 4 items" in capsys.readouterr().err


# ---------------------------------------------------------------------------- train, demo, evaluate


def test_demo_runs_through_main(capsys):
    argv = ["demo", "--epochs", "2", "--train-per-class", "30", "--query-per-class", "5"]
    assert main([*argv, "--num-levels", "2", "--dim", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " bit " in line]
    assert [int(r[0]) for r in rows] == [8, 16]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    assert "300 train / 50 query / 1447 database" in out and "mAP@1447" in out


def train_digits_argv(out: Path, codebook_size: int = 16, epochs: int = 1) -> list[str]:
    """`dpq train` on a small per-class digits split (26 train / 5 query per class)."""
    return [
        "train", "digits", "--backbone", "small_cnn", "--width", "0.25", "--split", "per-class",
        "--train-per-class", "26", "--query-per-class", "5", "--num-levels", "2",
        "--codebook-size", str(codebook_size), "--dim", "12", "--epochs", str(epochs),
        "--batch-size", "64", "--word-vectors", "orthogonal", "--out", str(out), "--quiet",
    ]  # fmt: skip


def test_train_command_writes_a_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_digits_argv(out)
    assert main(argv) == 0
    assert "model saved to" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").is_file() and (out / "split.json").is_file()
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


def test_evaluate_command_scores_a_trained_model_on_its_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_digits_argv(out, codebook_size=256, epochs=2)) == 0  # 8-bit levels
    capsys.readouterr()
    results = tmp_path / "evaluation.json"
    evaluate = [
        "evaluate", "--model", str(out / "model"), "--images", "digits",
        "--split", str(out / "split.json"), "--baselines", "pq", "--out", str(results),
        "--quiet",
    ]  # fmt: skip
    assert main(evaluate) == 0
    printed = capsys.readouterr().out
    assert "50 queries, 1487 database items" in printed and "mAP@1487" in printed
    saved = json.loads(results.read_text())
    assert set(saved["map"]) == {"8", "16"} and 0.0 <= saved["map"]["16"] <= 1.0
    assert set(saved["details"]["map"]) == {"dpq", "pq"} and 0.0 <= saved["float_map"] <= 1.0
    assert saved["details"]["baselines_fitted_on"] == "train"
    # the model's own evaluation is the same as the reproduce/demo path's
    assert 0.0 <= saved["database_accuracy"] <= 1.0
    # half a model input, or the two modes mixed, are refused with the fix
    assert main(["evaluate", "--model", str(out / "model"), "--images", "digits"]) == 2
    assert "--split" in capsys.readouterr().err
    assert main([*evaluate, "--query-features", str(results)]) == 2
    assert "saved-features mode" in capsys.readouterr().err
    assert main(["evaluate", "--db-labels", str(results)]) == 2
    assert "--query-features, --query-labels" in capsys.readouterr().err


def test_a_class_posterior_model_builds_inner_product_indexes(tmp_path, capsys):
    from dpq.index import DPQIndex

    out = tmp_path / "run"
    assert main([*train_digits_argv(out), "--feature", "class_posterior"]) == 0
    model = DPQModel.from_checkpoint(out / "model")
    assert model.config.model.feature == "class_posterior"
    index_path = tmp_path / "index.npz"
    encode = ["encode", "--model", str(out / "model"), "--images", "digits", "--quiet"]
    assert main([*encode, "--out", str(index_path)]) == 0
    index = DPQIndex.load(index_path)
    assert index.search_mode == "ip" and "search ip" in capsys.readouterr().out
    features = model.extract_features(load_source("digits").inputs[:20])
    np.testing.assert_allclose(features[:, :10].sum(1), 12**0.5, rtol=1e-5)  # sqrt(D) p
    assert (features[:, 10:] == 0).all()
    np.testing.assert_array_equal(
        index.search(features, 5)[1], index.search(features, 5, mode="ip")[1]
    )
    assert main([*encode, "--search-mode", "aqd", "--out", str(tmp_path / "aqd.npz")]) == 0
    assert DPQIndex.load(tmp_path / "aqd.npz").search_mode == "aqd"


def test_train_command_rejects_bad_settings(tmp_path, capsys):
    base = ["train", "digits", "--out", str(tmp_path / "x"), "--quiet", "--epochs", "1"]
    assert main([*base, "--codebook-size", "100"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main([*base, "--backbone", "small_cnn"]) == 2
    assert "word vector" in capsys.readouterr().err


def _cli_args(directory, *extra):
    return [
        "evaluate",
        "--query-features", str(directory / "query_features.npy"),
        "--query-labels", str(directory / "query_labels.npy"),
        "--db-features", str(directory / "db_features.npy"),
        "--db-labels", str(directory / "db_labels.npy"),
        "--quiet",
        *extra,
    ]  # fmt: skip


def test_cli_evaluate_prints_table_and_writes_json(feature_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        _cli_args(
            feature_dir,
            "--method",
            "dpq",
            "--index",
            str(feature_dir / "index.npz"),
            "--baselines",
            "pq,itq-cca",
            "--bits",
            "8,16",
            "--float-reference",
            "--out",
            str(out),
        )  # fmt: skip
    )
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.splitlines()
    assert lines[0] == "mAP@870 over 30 queries, 870 items"
    assert [line.split()[0] for line in lines[2:5]] == ["dpq", "pq", "itq-cca"]
    assert "fitted on the database" in captured.err  # no --train-features given
    saved = json.loads(out.read_text())
    assert set(saved["map"]) == {"dpq", "pq", "itq-cca"} and saved["float_features_map"] > 0
    assert {r["method"] for r in saved["results"]} == {"dpq", "pq", "itq-cca", "float"}


def test_cli_evaluate_follows_an_inner_product_index(feature_dir, tmp_path, capsys):
    from dpq.index import DPQIndex

    index = DPQIndex.load(feature_dir / "index.npz")
    index.search_mode = "ip"
    ip_index = index.save(tmp_path / "ip.npz")

    def float_search(*extra: str) -> str:
        out = tmp_path / "results.json"
        args = ["--method", "dpq", "--bits", "8", "--float-reference", "--out", str(out)]
        assert main(_cli_args(feature_dir, *args, *extra)) == 0
        results = json.loads(out.read_text())["results"]
        return next(r["settings"]["search"] for r in results if r["method"] == "float")

    assert float_search("--index", str(ip_index)) == "exhaustive inner product on float32 features"
    l2 = float_search("--index", str(ip_index), "--metric", "l2")
    assert l2 == "exhaustive squared L2 on float32 features"
    assert float_search("--index", str(feature_dir / "index.npz")) == l2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "dpq"], "needs a DPQ index"),
        (["--baselines", "pq,sh"], "unknown method"),
        ([], "no method to evaluate"),
        (["--method", "lsh", "--bits", "8,0"], "positive integers"),
        (["--method", "dpq", "--index", "INDEX", "--bits", "12"], "not one of them"),
        (
            ["--method", "lsh", "--db-labels", "QUERY_LABELS"],
            "870 rows but database labels have 30",
        ),
        (["--method", "lsh", "--train-features", "TRAIN"], "together"),
        (["--method", "lsh", "--query-features", "MISSING"], "missing.npy does not exist"),
    ],
)
def test_cli_evaluate_bad_input_exits_2(feature_dir, capsys, extra, message):
    replace = {
        "INDEX": str(feature_dir / "index.npz"),
        "QUERY_LABELS": str(feature_dir / "query_labels.npy"),
        "TRAIN": str(feature_dir / "train_features.npy"),
        "MISSING": str(feature_dir / "missing.npy"),
    }
    code = main(_cli_args(feature_dir, *[replace.get(arg, arg) for arg in extra]))
    assert code == 2
    assert message in capsys.readouterr().err


def test_data_split_accepts_every_source_train_does(tmp_path, capsys):
    """`dpq train digits` worked but `dpq data split digits` did not (two dispatchers)."""
    out = tmp_path / "split.json"
    argv = [
        "data",
        "split",
        "digits",
        "--train-per-class",
        "50",
        "--query-per-class",
        "10",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "train 500 / query 100 / database 1,197" in capsys.readouterr().out
    assert Split.load(out) == split_per_class(load_source("digits").labels, 50, 10, seed=0)


def test_train_skips_a_corrupt_image_and_says_how_many(tmp_path, capsys):
    """`--skip-corrupt` reaches training: a folder with one bad image trains without it."""
    folder = tmp_path / "photos"
    make_image_folder(folder, {"cats": 12, "dogs": 12})
    (folder / "dogs" / "broken.jpg").write_bytes(truncated_jpeg(np.random.default_rng(3)))
    argv = [
        "train", str(folder), "--backbone", "small_cnn", "--width", "0.25", "--split", "all",
        "--num-levels", "2", "--codebook-size", "8", "--dim", "8", "--epochs", "1",
        "--batch-size", "8", "--word-vectors", "orthogonal", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 2
    assert "broken.jpg" in capsys.readouterr().err and not (tmp_path / "run" / "model").exists()
    assert main([*argv, "--skip-corrupt"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 25 images" in captured.err
    assert "training without the 1 images that could not be decoded" in captured.err
    assert "model saved to" in captured.out
    trained = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert trained["model"]["num_classes"] == 2


def test_a_split_made_with_skip_corrupt_serves_encode_and_evaluate(tmp_path, capsys):
    folder = tmp_path / "photos"
    make_image_folder(folder, {"cats": 20, "dogs": 20})
    (folder / "cats" / "broken.jpg").write_bytes(truncated_jpeg(np.random.default_rng(4)))
    split = tmp_path / "split.json"
    argv = [
        "data",
        "split",
        str(folder),
        "--train-per-class",
        "17",
        "--query-per-class",
        "2",
        "--out",
        str(split),
    ]
    assert main([*argv, "--skip-corrupt", "--quiet"]) == 0
    run = tmp_path / "run"
    train = [
        "train", str(folder), "--skip-corrupt", "--backbone", "small_cnn", "--width", "0.25",
        "--num-levels", "2", "--codebook-size", "8", "--dim", "8", "--epochs", "1",
        "--batch-size", "8", "--word-vectors", "orthogonal", "--out", str(run), "--quiet",
    ]  # fmt: skip
    assert main(train) == 0
    encode = [
        "encode",
        "--model",
        str(run / "model"),
        "--images",
        str(folder),
        "--split",
        str(split),
    ]
    assert main([*encode, "--out", str(tmp_path / "i.npz"), "--quiet"]) == 2
    assert "--skip-corrupt" in capsys.readouterr().err  # the message names the flag that exists
    assert main([*encode, "--skip-corrupt", "--out", str(tmp_path / "i.npz"), "--quiet"]) == 0
    evaluate = ["evaluate", "--model", str(run / "model"), "--images", str(folder)]
    assert main([*evaluate, "--split", str(split), "--skip-corrupt", "--quiet"]) == 0
    assert "4 queries, 2 database items" in capsys.readouterr().out


# ---------------------------------------------------------------------------- devices, streaming


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", ["train", "encode", "evaluate", "search"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys, command):
    if command == "train":
        argv = train_digits_argv(tmp_path / "run") + ["--device", "cuda"]
    else:
        model = tmp_path / "model"
        DPQModel(_small_folder_config()).save_checkpoint(model)
        folder = tmp_path / "set"
        make_image_folder(folder, {"a": 2, "b": 2})
        argv = {
            "encode": ["encode", "--images", str(folder), "--out", str(tmp_path / "i.npz")],
            "evaluate": ["evaluate", "--images", str(folder), "--split", str(tmp_path / "s.json")],
            "search": ["search", "--index", str(tmp_path / "i.npz"), "--images", str(folder)],
        }[command] + ["--model", str(model), "--device", "cuda:1"]
        if command == "search":  # an index to search, encoded on the CPU
            encode = ["encode", "--images", str(folder), "--model", str(model), "--quiet"]
            assert main([*encode, "--out", str(tmp_path / "i.npz"), "--device", "cpu"]) == 0
        if command == "evaluate":
            split = split_per_class(np.array([0, 0, 1, 1]), 1, 1, classes=["a", "b"])
            split.save(tmp_path / "s.json")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpq: error: --device cuda") and err.count("\n") == 1
    assert "use --device cpu" in err and "Traceback" not in err


def _small_folder_config():
    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig

    return DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=2),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=4, dim=4),
    )


def test_train_and_encode_a_folder_read_on_demand(tmp_path, capsys):
    folder = tmp_path / "photos"
    make_image_folder(folder, {"cats": 10, "dogs": 10}, size=20)
    common = ["--image-size", "16", "--loading", "stream", "--workers", "2", "--device", "cpu"]
    argv = [
        "train",
        str(folder),
        "--backbone",
        "small_cnn",
        "--width",
        "0.25",
        "--dim",
        "8",
        "--codebook-size",
        "8",
        "--num-levels",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--word-vectors",
        "orthogonal",
        "--out",
        str(tmp_path / "run"),
        *common,
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "reading 20 training images on demand with 2 worker process(es)" in err
    model = tmp_path / "run" / "model"
    assert (
        main(
            [
                "encode",
                "--model",
                str(model),
                "--images",
                str(folder),
                "--out",
                str(tmp_path / "db.npz"),
                "--quiet",
                *common,
            ]
        )
        == 0
    )
    from dpq.index import DPQIndex

    streamed = DPQIndex.load(tmp_path / "db.npz")
    in_memory = DPQModel.from_checkpoint(model).encode(load_source(folder, image_size=16).inputs)
    np.testing.assert_array_equal(streamed.codes, in_memory)
    np.testing.assert_array_equal(streamed.labels, np.repeat([0, 1], 10))


def test_a_missing_weights_file_is_said_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_digits_argv(out) + ["--weights", str(tmp_path / "absent.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "absent.safetensors does not exist" in err and err.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------------------- index files


def test_encode_partitioned_append_merge_info_and_nprobe_search(tmp_path, capsys):
    from dpq.index import DPQIndex

    rng = np.random.default_rng(5)
    books = rng.normal(size=(2, 16, 6)).astype(np.float32)
    np.save(tmp_path / "books.npy", books)
    for part, count in (("a", 300), ("b", 200)):
        np.save(tmp_path / f"{part}.npy", rng.normal(size=(count, 6)))
    encode = ["encode", "--codebooks", str(tmp_path / "books.npy"), "--quiet"]
    out = tmp_path / "index.npz"
    args = ["--features", str(tmp_path / "a.npy"), "--partition-levels", "1", "--out", str(out)]
    assert main([*encode, *args]) == 0
    assert (
        main([*encode, "--features", str(tmp_path / "b.npy"), "--out", str(out), "--append"]) == 0
    )
    assert "appended 200 items" in capsys.readouterr().out
    grown = DPQIndex.load(out)
    assert grown.ntotal == 500 and grown.partition_levels == 1
    np.testing.assert_array_equal(np.sort(grown.ids), np.arange(500))
    whole = DPQIndex(books, partition_levels=1)
    whole.add_features(np.concatenate([np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")]))
    queries = rng.normal(size=(4, 6)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    search = ["search", "--index", str(out), "--features", str(tmp_path / "q.npy"), "--k", "5"]
    assert main([*search, "--nprobe", "16"]) == 0  # all 16 cells: the exhaustive answer
    found = [row["ids"] for row in json.loads(capsys.readouterr().out)["results"]]
    assert found == whole.search(queries, 5)[1].tolist()
    # two files encoded separately, merged, equal the file that holds both
    second = tmp_path / "second.npz"
    assert main([*encode, "--features", str(tmp_path / "b.npy"), "--partition-levels", "1",
                 "--out", str(second)]) == 0  # fmt: skip
    first = tmp_path / "first.npz"
    assert main([*encode, "--features", str(tmp_path / "a.npy"), "--partition-levels", "1",
                 "--out", str(first)]) == 0  # fmt: skip
    merged = tmp_path / "merged.npz"
    capsys.readouterr()
    merge = ["index", "merge", str(first), str(second), "--out", str(merged)]
    assert main(merge) == 2  # both files hold ids 0..n-1
    assert "--renumber-ids" in capsys.readouterr().err
    assert main([*merge, "--renumber-ids"]) == 0
    np.testing.assert_array_equal(DPQIndex.load(merged).codes, grown.codes)
    assert main(["index", "info", str(merged)]) == 0
    info = capsys.readouterr().out
    assert "500 items" in info and "codes of 4, 8 bits" in info and "partition levels 1" in info
    np.save(tmp_path / "other.npy", rng.normal(size=(2, 16, 6)).astype(np.float32))
    other = ["encode", "--codebooks", str(tmp_path / "other.npy"), "--features",
             str(tmp_path / "b.npy"), "--out", str(out), "--append", "--quiet"]  # fmt: skip
    assert main(other) == 2 and "codebooks differ" in capsys.readouterr().err


# ---------------------------------------------------------------------------- another method


def test_a_sign_model_trains_encodes_searches_and_evaluates_on_digits(tmp_path, capsys):
    """`--method sign --bits 16` through train -> encode -> index info -> search -> evaluate:
    no word vectors asked for, a binary index file, Hamming search through the model's
    method or by the signs of saved query features, mAP from the model and from saved
    features the same."""
    from dpq.index.binary import BinaryIndex
    from dpq.methods import load_network, method_for

    run, index_path = tmp_path / "run", tmp_path / "sign.npz"
    assert main([
        "train", "digits", "--backbone", "small_cnn", "--width", "0.25", "--split", "per-class",
        "--train-per-class", "26", "--query-per-class", "5", "--epochs", "3", "--batch-size",
        "64", "--method", "sign", "--bits", "16", "--method-option", "margin=24", "--out",
        str(run), "--quiet",
    ]) == 0  # fmt: skip
    network = load_network(run / "model")
    assert network.config.method.options == {"margin": 24}
    method, split = method_for(network.config), Split.load(run / "split.json")
    source = load_source("digits")
    database = len(split.database)
    np.save(tmp_path / "ids.npy", np.arange(database))
    capsys.readouterr()
    assert main([
        "encode", "--model", str(run / "model"), "--images", "digits", "--split",
        str(run / "split.json"), "--ids", str(tmp_path / "ids.npy"), "--out", str(index_path),
        "--quiet",
    ]) == 0  # fmt: skip
    assert f"{database:,} items, 16-bit binary codes, search Hamming" in capsys.readouterr().out
    index = BinaryIndex.load(index_path)
    features = {
        name: network.extract_features(source.inputs[getattr(split, name)])
        for name in ("query", "database")
    }
    np.testing.assert_array_equal(index.codes, method.encode(network, features["database"]))
    assert main(["index", "info", str(index_path)]) == 0
    assert "binary codes of 16 bits; 2 bytes per item" in capsys.readouterr().out

    search = ["search", "--index", str(index_path), "--k", "5"]
    with_model = [*search, "--model", str(run / "model"), "--images", "digits", "--split",
                  str(run / "split.json")]  # fmt: skip
    assert main(with_model) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    expected = method.search(index, features["query"], 5)[1]
    assert [row["ids"] for row in found] == expected.tolist()
    assert found[0]["labels"] == source.labels[split.database][expected[0]].tolist()
    np.save(tmp_path / "query_features.npy", features["query"])
    assert main([*search, "--features", str(tmp_path / "query_features.npy")]) == 0
    by_signs = json.loads(capsys.readouterr().out)["results"]
    assert [(r["ids"], r["distances"]) for r in by_signs] == [
        (r["ids"], r["distances"]) for r in found
    ]
    assert len({tuple(row["ids"]) for row in found}) > 3  # the codes tell queries apart
    assert main([*with_model, "--num-levels", "1"]) == 2
    assert "num_levels apply to a DPQ index" in capsys.readouterr().err

    results = tmp_path / "evaluation.json"
    assert main(["evaluate", "--model", str(run / "model"), "--images", "digits", "--split",
                 str(run / "split.json"), "--out", str(results), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "16 bit" in printed and " 8 bit" not in printed and "query accuracy" not in printed
    from_model = json.loads(results.read_text())
    assert from_model["method"] == "sign" and set(from_model["map"]) == {"16"}
    np.save(tmp_path / "query_labels.npy", source.labels[split.query])
    np.save(tmp_path / "db_labels.npy", source.labels[split.database])
    saved = tmp_path / "saved.json"
    assert main([
        "evaluate", "--query-features", str(tmp_path / "query_features.npy"), "--query-labels",
        str(tmp_path / "query_labels.npy"), "--db-labels", str(tmp_path / "db_labels.npy"),
        "--index", str(index_path), "--method", "sign", "--out", str(saved), "--quiet",
    ]) == 0  # fmt: skip
    from_files = json.loads(saved.read_text())["map"]["sign"]
    assert from_files == {"16": pytest.approx(from_model["map"]["16"], abs=1e-12)}
    assert main(["index", "merge", str(index_path), str(index_path), "--out",
                 str(tmp_path / "m.npz")]) == 2  # fmt: skip
    assert "holds binary codes" in capsys.readouterr().err


# ---------------------------------------------------------------------------- engines


def test_encode_and_search_through_onnxruntime_equal_torch(small_model_dir, tmp_path, capsys):
    import shutil

    from conftest import needs_engine

    needs_engine("onnxruntime")
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    model = shutil.copytree(small_model_dir, tmp_path / "model")
    make_image_folder(tmp_path / "set", {"a": 4, "b": 5})
    common = ["--model", str(model), "--images", str(tmp_path / "set")]
    assert main(["encode", *common, "--out", str(tmp_path / "torch.npz"), "--quiet"]) == 0
    capsys.readouterr()
    engine = ["--engine", "onnxruntime"]
    assert main(["encode", *common, *engine, "--out", str(tmp_path / "ort.npz")]) == 0
    captured = capsys.readouterr()
    assert "wrote " in captured.out and "dpq encode: items/s by stage (9 items): decode " in (
        captured.err
    )
    assert "network " in captured.err and "codes " in captured.err and "file " in captured.err
    from dpq.index import DPQIndex

    torch_codes = DPQIndex.load(tmp_path / "torch.npz").codes
    assert (DPQIndex.load(tmp_path / "ort.npz").codes == torch_codes).all(axis=1).mean() >= 0.999
    search = ["search", "--index", str(tmp_path / "ort.npz"), *common, "--k", "3", "--quiet"]
    assert main([*search, "--out", str(tmp_path / "torch.json")]) == 0
    assert main([*search, *engine, "--out", str(tmp_path / "ort.json")]) == 0
    by_torch = json.loads((tmp_path / "torch.json").read_text())["results"]
    by_engine = json.loads((tmp_path / "ort.json").read_text())["results"]
    assert len(by_engine) == 9 and [q["ids"] for q in by_engine] == [q["ids"] for q in by_torch]
    distances = [[q["distances"] for q in run] for run in (by_engine, by_torch)]
    np.testing.assert_allclose(*distances, rtol=1e-4, atol=1e-5)
    # an exported file instead of the cache; the runner's old flag still works, and says so
    onnx = tmp_path / "encoder.onnx"
    assert main(["export", "--onnx", str(model), str(onnx), "--image-size", "8"]) == 0
    assert main([*search, *engine, "--onnx", str(onnx), "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["results"] == by_engine
    capsys.readouterr()
    out = ["--out", str(tmp_path / "old.npz"), "--quiet"]
    assert main(["encode", *common, "--engine", "local", *out]) == 0
    assert "--engine local is deprecated, use --runner local" in capsys.readouterr().err
    np.testing.assert_array_equal(DPQIndex.load(tmp_path / "old.npz").codes, torch_codes)
    assert main(["encode", *common, "--engine", "ray", "--runner", "local", *out]) == 2
    assert "contradicts --runner local" in capsys.readouterr().err
    bf16 = ["--engine-precision", "bf16"]
    assert main(["encode", *common, *engine, *bf16, *out]) == 2
    assert "the onnxruntime engine runs precision fp32 or int8, not 'bf16'" in (
        capsys.readouterr().err
    )


def test_encode_and_search_through_openvino_in_bf16(small_model_dir, tmp_path, capsys):
    """--engine-precision bf16: OpenVINO's bfloat16 inference of the same export; the
    index and the search answers stay close to float32's (not equal: bf16 rounds). The bf16
    commands run as `python -m dpq.cli` processes: a pytest process that has compiled bf16
    models in OpenVINO and later starts a subprocess was seen to die of a segmentation fault
    (test_inference_engines says more)."""
    import shutil
    import subprocess
    import sys

    from conftest import needs_engine

    needs_engine("openvino")
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    import openvino

    from dpq.index import DPQIndex
    from dpq.inference.engines import openvino_has_bf16

    if not openvino_has_bf16(openvino.Core()):
        pytest.skip("OpenVINO has no bf16 kernels on this CPU (needs AVX512-BF16 or AMX)")
    model = shutil.copytree(small_model_dir, tmp_path / "model")
    make_image_folder(tmp_path / "set", {"a": 4, "b": 5})
    common = ["--model", str(model), "--images", str(tmp_path / "set"), "--quiet"]
    bf16 = ["--engine", "openvino", "--engine-precision", "bf16"]
    assert main(["encode", *common, "--out", str(tmp_path / "f32.npz")]) == 0

    def cli(*argv: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "dpq.cli", *argv], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

    cli("encode", *common, *bf16, "--out", str(tmp_path / "bf16.npz"))
    codes = [DPQIndex.load(tmp_path / f"{name}.npz").codes for name in ("f32", "bf16")]
    assert codes[0].shape == codes[1].shape and (codes[0] == codes[1]).mean() >= 0.5
    search = ["search", "--index", str(tmp_path / "f32.npz"), *common, "--k", "9"]
    assert main([*search, "--out", str(tmp_path / "f32.json")]) == 0
    cli(*search, *bf16, "--out", str(tmp_path / "bf16.json"))
    runs = [json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("f32", "bf16")]
    assert [sorted(q["ids"]) for q in runs[0]] == [sorted(q["ids"]) for q in runs[1]]


def test_a_missing_engine_package_is_one_line_naming_the_extra(
    small_model_dir, tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    make_image_folder(tmp_path / "set", {"a": 2})
    base = ["--model", str(small_model_dir), "--images", str(tmp_path / "set"), "--quiet"]
    out = tmp_path / "db.npz"
    assert main(["encode", *base, "--engine", "openvino", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpq: error: the openvino engine needs the openvino package: pip install")
    assert "'dpq[inference]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (small_model_dir / "engine-cache").exists()
    assert main(["search", "--index", str(out), "--features", "x.npy", "--engine", "openvino"]) == 2
    assert "--engine and --onnx run a model: add --model" in capsys.readouterr().err
