"""The shard stage: deterministic shards, stratified split, and no input lost silently."""

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shard import run_shard
from pipeline.errors import UserError
from pipeline.params import DataParams
from tests.factory import data_params, folder_params, idx_dataset, imagefolder, write_idx


def idx_params(tmp_path: Path, **kw) -> DataParams:
    return data_params(
        source="idx",
        root=str(tmp_path / "raw"),
        shards=str(tmp_path / "shards"),
        shard_max_count=25,
        workers=0,
        **kw,
    )


def shard_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_two_writes_give_the_same_bytes_whatever_the_worker_count(tmp_path):
    idx_dataset(tmp_path / "raw")
    p = idx_params(tmp_path)
    run_shard(p)
    first = shard_bytes(Path(p.shards))
    run_shard(p.model_copy(update={"workers": 2}))
    assert shard_bytes(Path(p.shards)) == first
    shards = ["test-000000", "test-000001", *[f"train-{i:06d}" for i in range(5)], "val-000000"]
    assert sorted(first) == sorted(
        ["manifest.json"] + [f"{s}.{e}" for s in shards for e in ("idx", "tar")]
    )
    with tarfile.open(Path(p.shards) / "train-000000.tar") as t:
        assert {(m.mtime, m.uname, m.mode) for m in t.getmembers()} == {(0, "mae", 0o444)}


def test_manifest_counts_checksums_and_training_pixel_statistics(tmp_path):
    images, _labels = idx_dataset(tmp_path / "raw")
    manifest = run_shard(idx_params(tmp_path, val_fraction=0.2))
    on_disk = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert on_disk == manifest
    splits = manifest["splits"]
    assert (splits["train"]["count"], splits["val"]["count"], splits["test"]["count"]) == (
        100,
        20,
        30,
    )
    for entry in splits["train"]["shards"]:
        data = (tmp_path / "shards" / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # mean/std over the training split's pixels only (val carved out)
    train_keys = set()
    for entry in splits["train"]["shards"]:
        train_keys |= {int(n.split(".")[0]) for n in members(tmp_path / "shards" / entry["name"])}
    pixels = images[sorted(train_keys)] / 255
    assert manifest["mean"][0] == pytest.approx(pixels.mean(), abs=1e-6)
    assert manifest["std"][0] == pytest.approx(pixels.std(), abs=1e-6)
    assert manifest["accounting"]["train"] == {"inputs": 120, "written": 120, "skipped": 0}


def test_samples_are_stored_as_pgm_with_their_label(tmp_path):
    images, labels = idx_dataset(tmp_path / "raw")
    run_shard(idx_params(tmp_path))
    stored = members(tmp_path / "shards" / "train-000000.tar")
    key = next(n for n in stored if n.endswith(".pgm")).split(".")[0]
    i = int(key)
    assert stored[f"{key}.pgm"] == b"P5\n8 8\n255\n" + images[i].tobytes()
    assert stored[f"{key}.cls"] == str(labels[i]).encode()


def test_split_is_stratified_and_seeded(tmp_path):
    idx_dataset(tmp_path / "raw", n_train=200)
    a = run_shard(idx_params(tmp_path, val_fraction=0.2, seed=1))["splits"]
    assert set(a["val"]["per_class"].values()) == {4}  # 20 per class -> 4 each
    assert set(a["train"]["per_class"].values()) == {16}

    def val_keys(seed):
        run_shard(idx_params(tmp_path, val_fraction=0.2, seed=seed))
        return set(members(tmp_path / "shards" / "val-000000.tar"))

    assert val_keys(1) == val_keys(1) != val_keys(2)


def test_imagefolder_keeps_jpeg_and_png_bytes_and_goes_rgb_when_any_image_is_colour(tmp_path):
    root = imagefolder(tmp_path / "imgs", {"cat": 10, "dog": 10})
    p = folder_params(tmp_path, root, val_fraction=0.2, test_fraction=0.2, workers=2)
    manifest = run_shard(p)
    assert manifest["classes"] == ["cat", "dog"] and manifest["channels"] == 3
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [12, 4, 4]
    stored = {}
    for split in ("train", "val", "test"):
        stored |= members(tmp_path / "shards" / f"{split}-000000.tar")
    originals = sorted(p.read_bytes() for p in root.rglob("*.*"))
    images = sorted(v for k, v in stored.items() if k.endswith((".jpg", ".png")))
    assert images == originals  # stored as they are, not re-encoded
    assert len(manifest["mean"]) == 3


def test_imagefolder_of_grayscale_images_has_one_channel(tmp_path):
    root = imagefolder(tmp_path / "imgs", {"a": 4, "b": 4}, modes=("L",))
    p = folder_params(tmp_path, root, val_fraction=0.25, test_fraction=0.25, workers=0)
    assert run_shard(p)["channels"] == 1


def test_imagefolder_with_split_subtrees_uses_them(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        imagefolder(tmp_path / "imgs" / split, {"a": n, "b": n})
    p = folder_params(tmp_path, tmp_path / "imgs", workers=0)
    counts = {s: v["count"] for s, v in run_shard(p)["splits"].items()}
    assert counts == {"train": 12, "val": 4, "test": 6}


def test_fashion_mnist_checksums_are_verified(tmp_path):
    idx_dataset(tmp_path / "raw")
    p = idx_params(tmp_path).model_copy(update={"source": "fashion-mnist"})
    with pytest.raises(
        UserError,
        match=r"train-images-idx3-ubyte.gz: checksum mismatch: "
        r"content MD5 \w+, expected f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ):
        run_shard(p)


def test_missing_fashion_mnist_says_where_to_get_it(tmp_path):
    p = data_params(root=str(tmp_path / "nowhere"), shards=str(tmp_path / "shards"))
    with pytest.raises(
        UserError,
        match=r"Fashion-MNIST not found .*dataset-fashion-mnist.*"
        r"github.com/zalandoresearch/fashion-mnist",
    ):
        run_shard(p)


# ---------------------------------------------------------------- bad inputs
def _corrupt_jpeg(root: Path) -> Path:
    bad = root / "cat" / "broken.jpg"
    good = (root / "cat" / "000.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    return bad


def _bad_imagefolder(tmp_path: Path, case: str) -> tuple[DataParams, str]:
    root = imagefolder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    if case == "corrupt":
        name, reason = str(_corrupt_jpeg(root)), "cannot decode image"
    elif case == "garbage":
        (root / "dog" / "noise.png").write_bytes(b"not a png at all")
        name, reason = str(root / "dog" / "noise.png"), "cannot decode image"
    elif case == "empty class":
        (root / "emu").mkdir()
        name, reason = str(root / "emu"), "empty class folder"
    elif case == "latin-1 file name":  # a zip made on Windows: Caf\xe9.png
        latin = os.fsencode(root / "dog") + b"/Caf\xe9.png"
        with open(latin, "wb") as f:
            f.write((root / "dog" / "000.jpg").read_bytes())
        name, reason = (
            f"{root / 'dog'}/Caf\\xe9.png",
            "a name that is not UTF-8 (bytes b'Caf\\xe9.png')",
        )
    else:
        (root / "dog" / "notes.txt").write_text("hello")
        name, reason = str(root / "dog" / "notes.txt"), "unsupported file type"
    p = folder_params(tmp_path, root, val_fraction=0.2, test_fraction=0.2, workers=2)
    return p, f"{name}: {reason}"


def _bad_idx(tmp_path: Path, case: str) -> tuple[DataParams, str]:
    raw = tmp_path / "raw"
    idx_dataset(raw)
    images = np.zeros((20, 8, 8), np.uint8)
    labels = np.arange(20) % 10
    if case == "label out of range":
        labels[7] = 12
        write_idx(raw, "train", images, labels)
        expected = "train-labels-idx1-ubyte.gz: record 7: label 12 out of range (0-9)"
    else:
        write_idx(raw, "train", images, labels, cut_images=100)
        expected = "truncated: header says 20 images, the file holds 18 complete ones"
    return idx_params(tmp_path), expected


SKIP_REASONS = {
    "corrupt": "cannot decode image",
    "garbage": "cannot decode image",
    "empty class": "empty class folder",
    "stray file": "unsupported file type",
    "latin-1 file name": "a name that is not UTF-8",
    "label out of range": "label 12 out of range (0-9)",
    "truncated idx": "missing: file truncated",
}


IMAGEFOLDER_CASES = ("corrupt", "garbage", "empty class", "stray file", "latin-1 file name")
BAD_CASES = [("imagefolder", c) for c in IMAGEFOLDER_CASES] + [
    ("idx", c) for c in ("label out of range", "truncated idx")
]


@pytest.mark.parametrize(("source", "case"), BAD_CASES)
def test_bad_input_fails_with_one_line_naming_it_and_leaves_nothing_half_written(
    tmp_path, source, case
):
    p, expected = (_bad_imagefolder if source == "imagefolder" else _bad_idx)(tmp_path, case)
    with pytest.raises(UserError) as err:
        run_shard(p)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not Path(p.shards).exists()
    assert [x.name for x in Path(p.shards).parent.iterdir() if x.name.startswith(".")] == []


@pytest.mark.parametrize(("source", "case"), BAD_CASES)
def test_bad_input_is_skipped_and_recorded_under_skip(tmp_path, source, case):
    p, _expected = (_bad_imagefolder if source == "imagefolder" else _bad_idx)(tmp_path, case)
    skip = p.model_copy(update={"on_bad_input": "skip"})
    manifest = run_shard(skip)
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert any(r.startswith(SKIP_REASONS[case]) for r in reasons), reasons
    assert not any(" at 0x" in r for r in reasons), reasons  # no object addresses
    first = (Path(p.shards) / "manifest.json").read_bytes()
    run_shard(skip)
    assert (Path(p.shards) / "manifest.json").read_bytes() == first  # so DVC's hash holds
    for source_split, acc in manifest["accounting"].items():
        assert acc["inputs"] == acc["written"] + acc["skipped"], source_split
    written = sum(v["count"] for v in manifest["splits"].values())
    assert written == sum(a["written"] for a in manifest["accounting"].values())


def test_a_failed_run_keeps_the_previous_shards(tmp_path):
    idx_dataset(tmp_path / "raw")
    p = idx_params(tmp_path)
    run_shard(p)
    before = shard_bytes(Path(p.shards))
    write_idx(tmp_path / "raw", "train", np.zeros((5, 8, 8), np.uint8), np.array([0, 1, 2, 3, 99]))
    with pytest.raises(UserError, match="label 99 out of range"):
        run_shard(p)
    assert shard_bytes(Path(p.shards)) == before


def test_an_idx_header_claiming_more_records_than_the_file_holds_costs_no_memory(tmp_path):
    raw = tmp_path / "raw"
    idx_dataset(raw)
    images, labels = np.zeros((20, 8, 8), np.uint8), np.arange(20) % 10
    write_idx(raw, "train", images, labels, claim_images=2**31)
    p = idx_params(tmp_path)
    with pytest.raises(UserError, match="header says 2147483648 images, the file holds 20"):
        run_shard(p)
    manifest = run_shard(p.model_copy(update={"on_bad_input": "skip"}))  # seconds, not GBs
    (entry,) = [s for s in manifest["skipped"] if s["split"] == "train"]
    assert entry["reason"] == "no matching label" and entry["count"] == 2**31 - 20
    assert entry["input"] == "train-images-idx3-ubyte.gz#20-2147483647"
    assert manifest["accounting"]["train"]["inputs"] == 2**31


def test_imagefolder_links_are_followed_safely_and_every_input_accounted_for(tmp_path):
    root = imagefolder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    (root / "zz_self").symlink_to(root, target_is_directory=True)  # the root again
    (root / "zz_alias").symlink_to(root / "cat", target_is_directory=True)  # a class again
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")  # dangling
    (root / "dog" / "loop.png").symlink_to(root / "dog" / "loop.png")  # a loop
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)  # back up the tree
    (root / "dog" / "cat.jpg").symlink_to(root / "cat" / "000.jpg")  # a second label
    outside = imagefolder(tmp_path / "elsewhere", {"x": 1})
    (root / "cat" / "out.png").symlink_to(next((outside / "x").iterdir()))
    p = folder_params(tmp_path, root, val_fraction=0.2, test_fraction=0.2, workers=0)
    with pytest.raises(UserError) as err:
        run_shard(p)
    assert "\n" not in str(err.value)
    manifest = run_shard(p.model_copy(update={"on_bad_input": "skip"}))
    assert manifest["classes"] == ["cat", "dog"]  # no class made of a link
    reasons = {Path(s["input"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["zz_self"].startswith("symlink loop")
    assert reasons["zz_alias"].startswith("symlink to another class folder")
    assert reasons["gone.png"] == reasons["loop.png"] == "broken or looping symlink"
    assert reasons["up"].startswith("symlink loop")
    assert reasons["out.png"].startswith("symlink leads outside the root")
    assert reasons["cat.jpg"].startswith("symlink leads out of its class folder")
    assert sum(v["count"] for v in manifest["splits"].values()) == 12  # the real images, once


def test_16_bit_grayscale_pngs_keep_their_values(tmp_path):
    import io
    import tarfile

    from PIL import Image

    ramp = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)  # 0 .. 63,750
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(ramp).save(tmp_path / "imgs" / cls / f"{i}.png")
    p = folder_params(tmp_path, tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    manifest = run_shard(p)
    expected = (ramp >> 8).astype(np.uint8)  # the top 8 bits, not 255 everywhere
    assert manifest["mean"][0] == pytest.approx(expected.mean() / 255, abs=1e-3)
    with tarfile.open(Path(p.shards) / "train-000000.tar") as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        stored = np.asarray(Image.open(io.BytesIO(tar.extractfile(png).read())))
    assert stored.dtype == np.uint8 and np.array_equal(stored, expected)


def test_a_cut_gzip_file_is_reported_as_truncated_not_empty(tmp_path):
    raw = tmp_path / "raw"
    idx_dataset(raw)
    images, labels = np.arange(20 * 64, dtype=np.uint8).reshape(20, 8, 8), np.arange(20) % 10
    write_idx(raw, "train", images, labels)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-200])  # cut inside the stream (and well under 1 MB)
    with pytest.raises(UserError, match=r"truncated: header says 20 images, the file holds"):
        run_shard(idx_params(tmp_path))


def test_a_class_folder_whose_name_is_not_utf8_is_refused_before_any_work(tmp_path):
    """hooram/ownphotos#112: a class name that is not UTF-8 trained every stage, then broke
    evaluate's plots and the served model. It is refused, under `skip` too (a class cannot
    be skipped like an image), naming the folder by its bytes."""
    root = imagefolder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    latin = os.fsencode(root) + b"/caf\xe9"
    os.mkdir(latin)
    with open(latin + b"/0.png", "wb") as f:
        f.write((root / "cat" / "001.png").read_bytes())
    for policy in ("fail", "skip"):
        p = folder_params(tmp_path, root, on_bad_input=policy)
        with pytest.raises(UserError) as err:
            run_shard(p)
        assert str(err.value).startswith(
            f"{root}/caf\\xe9: a class folder whose name is not UTF-8 (bytes b'caf\\xe9'"
        ), str(err.value)
        assert not Path(p.shards).exists()


@pytest.mark.parametrize("source", ["imagefolder", "idx"])
def test_a_source_dvc_did_not_copy_into_its_temp_workspace_is_refused(
    tmp_path, monkeypatch, source
):
    """treeverse/dvc#8612: a queued or --temp experiment runs in a copy holding only what
    git or DVC tracks; a git-ignored `data.root` inside the project is missing there."""
    project, workspace = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmpab12"
    if source == "imagefolder":
        imagefolder(project / "raw", {"cat": 2, "dog": 2})
    else:
        idx_dataset(project / "raw")
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(project))
    p = data_params(source=source, root="raw", shards="data/shards", workers=0)
    with pytest.raises(UserError, match=r"^data.root: raw lies in the project \(.*/project/raw\)"):
        run_shard(p)
    assert not (workspace / "data").exists()  # refused before any work
    monkeypatch.chdir(project)  # where DVC_ROOT is the working directory: read as given
    assert run_shard(p)["splits"]["train"]["count"] > 0


def test_a_listing_shards_as_its_folder_and_refuses_a_changed_image(tmp_path):
    """treeverse/dvc#7681: with `data.root` a listing, DVC hashes one small file instead of
    the folder; the shards are the folder's, byte for byte, and a stale listing is named."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = imagefolder(tmp_path / "imgs", {"cat": 5, "dog": 5})
    (root / "dog" / "notes.txt").write_text("a stray file: a bad input either way")
    listing = tmp_path / "raw.listing.json"
    result = CliRunner().invoke(app, ["list-images", str(root), str(listing)])
    assert result.exit_code == 0 and "train 10 images" in result.output, result.output
    direct = folder_params(tmp_path / "a", root, on_bad_input="skip", workers=0)
    listed = folder_params(tmp_path / "b", listing, on_bad_input="skip", workers=0)
    assert run_shard(direct) == run_shard(listed)
    files = lambda p: {f.name: f.read_bytes() for f in Path(p.shards).iterdir()}  # noqa: E731
    assert files(direct) == files(listed)
    with pytest.raises(UserError, match=r"notes.txt: unsupported file type"):
        run_shard(listed.model_copy(update={"on_bad_input": "fail"}))
    changed = root / "cat" / "001.png"
    os.utime(changed, ns=(1, 1))
    with pytest.raises(UserError) as err:
        run_shard(listed)
    assert str(err.value) == (
        f"{changed}: changed (size or mtime) since {listing} was written: "
        f"re-run `mae-cli list-images {root} {listing}`"
    )
    changed.unlink()
    with pytest.raises(UserError, match=r"001.png: gone since"):
        run_shard(listed)
    listing.write_text("{}")
    with pytest.raises(UserError, match=r"is a file but no listing `mae-cli list-images` wrote"):
        run_shard(listed)


def test_smaller_mistakes_are_named(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.errors import first_line

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--run-id", ""])
    assert result.exit_code == 2 and "--run-id is empty" in result.output
    result = runner.invoke(app, ["bench", "data", "--augmentation", "nonsense"])
    assert (
        result.exit_code == 2
        and "--augmentation must be one of pretrain, finetune, eval" in result.output
    )
    long = RuntimeError("connection refused " * 30)
    assert first_line(long).endswith("refused ...") and len(first_line(long)) <= 204


def test_shard_tars_are_byte_for_byte_what_webdataset_tarwriter_writes(tmp_path):
    from webdataset import TarWriter

    from pipeline.data.shard_worker import _Tar

    samples = [(f"{i:08d}", {"png": bytes(range(i, i + 200)), "cls": b"%d" % i}) for i in range(5)]
    ours = _Tar(tmp_path / "ours.tar")
    with TarWriter(str(tmp_path / "wds.tar"), encoder=False, mtime=0, user="mae", group="mae",
                   mode=0o444) as theirs:  # fmt: skip
        for key, members in samples:
            ours.write(key, members)
            theirs.write({"__key__": key, **members})
    ours.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()


def test_class_names_mlflow_cannot_hold_stay_distinct_metrics_that_agree_with_the_manifest(
    tmp_path, monkeypatch
):
    """`cat (wild)` and `cat [wild]` were both logged as `class/cat _wild_`: one metric."""
    import mlflow

    from pipeline.params import parse_params
    from pipeline.stages.shard import run_shard_stage
    from pipeline.tracking import class_keys
    from tests.factory import project_params

    root = imagefolder(tmp_path / "imgs", {"cat (wild)": 10, "cat [wild]": 15, "dog": 5})
    raw = project_params(
        {
            "data": {"source": "imagefolder", "root": str(root), "shards": str(tmp_path / "s"),
                     "val_fraction": 0.2, "test_fraction": 0.2, "workers": 0},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "names"},
        }
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    manifest = run_shard_stage(parse_params(raw))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["names"], output_format="list")
    for split in ("train", "val", "test"):
        logged = {
            k.rsplit("/", 1)[1]: v
            for k, v in run.data.metrics.items()
            if k.startswith(f"data/{split}/class/")
        }
        per_class, classes = manifest["splits"][split]["per_class"], manifest["classes"]
        keys = class_keys(classes)
        assert logged == {k: per_class[c] for k, c in zip(keys, classes, strict=True)}
        assert len(logged) == 3


@pytest.mark.parametrize(
    "classes",
    [
        ["cat (wild)", "cat [wild]", "dog"],
        ["🐱", "🐶"],  # nothing MLflow can hold
        ["a/b", "a_b", "a b"],
        ["x" * 300, "x" * 300 + "y"],  # cut to the same 100 characters
        [str(i) for i in range(1000)],
    ],
)
def test_class_keys_are_distinct_whatever_the_names_hold(classes):
    from mlflow.utils.validation import _validate_metric_name

    from pipeline.tracking import class_keys

    keys = class_keys(classes)
    assert len(set(keys)) == len(classes)
    assert sorted(keys) == keys  # the index first, zero-padded: in the manifest's order
    for key in keys:
        _validate_metric_name(f"test/acc/{key}")
