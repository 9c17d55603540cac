"""A user's own images to a prepared folder (`python -m pipelines.prepare_data --from-folder/--from-table`): every
bad input the issue lists, the transforms, the held-out split, idempotency, each table format giving the same
content, the digits' round trip through a PNG folder, and the Fashion-MNIST example script. Every test writes its
own tiny image files."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pdcbdm.data import load_digits_uint8
from pdcbdm.data.ingest import DecodeOptions, decode_image, list_folder
from pdcbdm.data.prep_report import HeldoutRule, heldout_counts, imbalance_stats, label_dist_shares
from pdcbdm.data.prepared import load_prepared, read_prepared_meta
from pipelines.prepare_data import main

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _noise(seed: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    """A small image whose pixels differ for every seed (no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _folder(root: Path, counts: dict[str, int], mode: str = "RGB", size: int = 12) -> Path:
    """root/<class>/<i>.png with ``counts[class]`` distinct images each."""
    seed = 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _noise(seed := seed + 1, size, mode).save(root / name / f"{i:03d}.png")
    return root


def _prepare(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _fail(capsys, *args: str | Path) -> str:
    """Run prepare_data expecting exit status 2; its error message."""
    with pytest.raises(SystemExit) as stop:
        _prepare(*args)
    assert stop.value.code == 2
    return capsys.readouterr().err


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    _noise(99, 32).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_bad_files_are_skipped_listed_and_reported(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 30, "dog": 25, "emu": 1})
    (src / "empty_class").mkdir()
    (src / "cat" / "nested" / "deeper").mkdir(parents=True)
    _noise(500).save(src / "cat" / "nested" / "deeper" / "x.png")  # nested files belong to their class
    (src / "cat" / "empty.png").write_bytes(b"")
    (src / "dog" / "notes.txt").write_text("not an image")
    _truncated_jpeg(src / "dog" / "cut.jpg")
    (src / "README.md").write_text("outside the class folders")
    (src / ".DS_Store").write_bytes(b"\0\1")
    (src / "__MACOSX" / "cat").mkdir(parents=True)
    (src / "__MACOSX" / "cat" / "._000.png").write_bytes(b"apple double")
    (src / "cat" / ".ipynb_checkpoints").mkdir()
    _noise(501).save(src / "cat" / ".ipynb_checkpoints" / "a.png")
    out = tmp_path / "out"
    assert _prepare("--from-folder", src, "--size", "8", "--out", out, "--max-bad", "10%") == 0
    printed = capsys.readouterr().out
    assert "skipped 4 (empty file: 1, not an image: 1, outside the class folders: 1, truncated or corrupt: 1)" in printed
    assert "hidden files ignored 3" in printed and "class folder 'empty_class' holds no file" in printed
    assert "too small to judge (no held-out image): emu" in printed and "emu      1       0  tail" in printed
    skipped = pd.read_csv(out / "_skipped.csv")
    assert sorted(skipped["path"]) == ["README.md", "cat/empty.png", "dog/cut.jpg", "dog/notes.txt"]
    assert skipped.set_index("path").loc["dog/cut.jpg", "reason"].startswith("truncated or corrupt")
    meta = read_prepared_meta(out)
    assert meta["class_names"] == ["cat", "dog", "emu"]  # the empty class dropped, the 1-image class kept
    assert meta["splits"]["train"]["counts"] == [28, 23, 1] and meta["splits"]["heldout"]["counts"] == [3, 2, 0]
    report = json.loads((out / "_report.json").read_text())
    assert report["unjudged"] == ["emu"] and report["files"]["kept"] == 57
    assert pd.read_parquet(out / "train").shape[0] == 52


def test_too_many_bad_files_or_a_class_losing_all_stop_with_nothing_written(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"a": 40, "b": 40})
    (src / "a" / "zz.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    err = _fail(capsys, "--from-folder", src, "--size", "8", "--out", out)
    assert "1 of 81 files unusable (1.2% > --max-bad 1.0%; not an image: 1)" in err and "a/zz.png: not an im" in err
    assert not out.exists()
    assert _prepare("--from-folder", src, "--size", "8", "--out", out, "--max-bad", "0.02", "--dry-run") == 0
    assert "dry run: nothing written" in capsys.readouterr().out and not out.exists()
    (src / "c").mkdir()
    (src / "c" / "only.png").write_bytes(b"")
    err = _fail(capsys, "--from-folder", src, "--size", "8", "--out", out, "--max-bad", "1")
    assert "class(es) 'c' lost every image" in err and not out.exists()


def test_a_single_class_and_unknown_reference_classes_are_refused_by_name(tmp_path, capsys):
    one = _folder(tmp_path / "one", {"lesion": 5})
    (one / "empty").mkdir()
    assert "1 class ('lesion')" in _fail(capsys, "--from-folder", one, "--size", "8", "--out", tmp_path / "o1")
    src = _folder(tmp_path / "src", {"a": 30, "b": 22})
    ref = _folder(tmp_path / "ref", {"a": 3, "zebra": 2, "yak": 1})
    err = _fail(capsys, "--from-folder", src, "--size", "8", "--out", tmp_path / "o2", "--reference-folder", ref)
    assert "class(es) 'yak', 'zebra' unknown to the training set" in err and not (tmp_path / "o2").exists()
    shutil.rmtree(ref / "zebra"), shutil.rmtree(ref / "yak")
    assert _prepare("--from-folder", src, "--size", "8", "--out", tmp_path / "o3", "--reference-folder", ref) == 0
    reference = load_prepared(tmp_path / "o3", "reference")
    assert reference.counts() == [3, 0] and reference.image_shape == (3, 8, 8)


def test_high_bit_depth_is_refused_unless_minmax(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"a": 30, "b": 30}, mode="L")
    Image.fromarray(np.linspace(1000, 3000, 144).reshape(12, 12).astype(np.uint16)).save(src / "b" / "deep.png")
    err = _fail(capsys, "--from-folder", src, "--size", "8", "--out", tmp_path / "o")
    assert "16-bit or float image(s) (b/deep.png)" in err and "--high-bit-depth minmax" in err
    decoded = decode_image(src / "b" / "deep.png", DecodeOptions(size=12, high_bit_depth="minmax"))
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255  # not clipped to a white square
    assert _prepare("--from-folder", src, "--size", "8", "--out", tmp_path / "o", "--high-bit-depth", "minmax") == 0


def test_transforms_exif_cmyk_alpha_crop_and_channels(tmp_path):
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255  # left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(half).save(tmp_path / "rot.png", exif=exif)
    rotated = decode_image(tmp_path / "rot.png", DecodeOptions(size=8)).pixels
    assert rotated[:4].max() == 0 and rotated[4:].min() == 255  # top black, bottom white once oriented
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert decode_image(tmp_path / "cmyk.tif", DecodeOptions(size=8)).pixels[0, 0].tolist() == [255, 0, 0]
    Image.new("RGBA", (8, 8), (10, 200, 30, 0)).save(tmp_path / "clear.png")
    for background, value in (("white", 255), ("black", 0)):
        pixels = decode_image(tmp_path / "clear.png", DecodeOptions(size=8, alpha_background=background)).pixels
        assert pixels.shape == (8, 8) and (pixels == value).all()  # composited, then grey
    Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "wide.png")
    padded = decode_image(tmp_path / "wide.png", DecodeOptions(size=8, crop="pad", alpha_background="black"))
    assert padded.pixels.shape == (8, 8, 3) and padded.pixels[0, 0].tolist() == [0, 0, 0]
    assert np.abs(padded.pixels[4, 4].astype(int) - [200, 10, 10]).max() <= 5 and not padded.upscaled
    small = decode_image(tmp_path / "wide.png", DecodeOptions(size=12))
    assert small.upscaled and small.pixels.shape == (12, 12, 3)
    assert decode_image(tmp_path / "wide.png", DecodeOptions(size=8, channels="1")).pixels.shape == (8, 8)
    with pytest.raises(ValueError, match="--size must be a multiple of 4 from 8"):
        DecodeOptions(size=30)


def test_auto_channels_replicate_grey_when_any_image_has_colour(tmp_path):
    src = _folder(tmp_path / "src", {"a": 25, "b": 25}, mode="L")
    assert _prepare("--from-folder", src, "--size", "8", "--out", tmp_path / "grey") == 0
    assert load_prepared(tmp_path / "grey").image_shape == (1, 8, 8)
    _noise(7).save(src / "b" / "colour.png")
    assert _prepare("--from-folder", src, "--size", "8", "--out", tmp_path / "rgb") == 0
    images = np.concatenate([load_prepared(tmp_path / "rgb", s).images.numpy() for s in ("train", "heldout")])
    grey = (images[:, 0] == images[:, 1]).all(axis=(1, 2)) & (images[:, 1] == images[:, 2]).all(axis=(1, 2))
    assert images.shape == (51, 3, 8, 8) and grey.sum() == 50  # only the colour image has colour


def test_idempotent_dry_run_and_overwrite(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"a": 30, "b": 21})
    out = tmp_path / "out"
    assert _prepare("--from-folder", src, "--size", "8", "--out", out) == 0
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _prepare("--from-folder", src, "--size", "8", "--out", out) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files
    err = _fail(capsys, "--from-folder", src, "--size", "12", "--out", out)
    assert "differs in: arguments.size" in err and "--overwrite" in err
    assert _prepare("--from-folder", src, "--size", "12", "--out", out, "--overwrite") == 0
    assert load_prepared(out).image_shape == (3, 12, 12)
    assert "overlaps the input folder" in _fail(capsys, "--from-folder", src, "--size", "8", "--out", src / "p")
    assert "--size is required" in _fail(capsys, "--from-folder", src, "--out", tmp_path / "x")
    assert "applies to --from-folder/--from-table only" in _fail(capsys, "--dataset", "digits-lt", "--size", "8",
                                                                  "--out", tmp_path / "x")


def test_heldout_rule_never_robs_a_tail_class_and_drops_duplicates(tmp_path, capsys):
    rule = HeldoutRule(frac=0.1, max_images=5, min_train=20)
    assert heldout_counts([100, 30, 21, 20, 1], rule) == [5, 3, 0, 0, 0]
    src = _folder(tmp_path / "src", {"a": 40, "b": 30})
    for i in range(40):  # every image of a is also in b: whatever is held out of a has a copy in train
        shutil.copy(src / "a" / f"{i:03d}.png", src / "b" / f"copy{i:03d}.png")
    out = tmp_path / "out"
    assert _prepare("--from-folder", src, "--size", "8", "--out", out) == 0
    skipped = pd.read_csv(out / "_skipped.csv")
    duplicates = skipped[skipped["reason"] == "held-out duplicate of a training image"]
    assert len(duplicates) >= 4  # a's 4 held out are copies of b's training images (and b's of a's)
    train, held = load_prepared(out).images.numpy(), load_prepared(out, "heldout").images.numpy()
    train_keys = {im.tobytes() for im in train}
    assert not any(im.tobytes() in train_keys for im in held)
    again = tmp_path / "again"
    assert _prepare("--from-folder", src, "--size", "8", "--out", again) == 0
    assert (out / "heldout" / "_images.npy").read_bytes() == (again / "heldout" / "_images.npy").read_bytes()


def _flat_images(root: Path) -> dict[str, str]:
    """root/img/<i>.png for 3 classes; file name -> class."""
    labels = {}
    for i, name in enumerate(["beta", "alpha", "gamma"] * 8 + ["alpha"] * 6):
        (root / "img").mkdir(parents=True, exist_ok=True)
        _noise(i).save(root / "img" / f"{i:02d}.png")
        labels[f"img/{i:02d}.png"] = name
    return labels


def test_every_table_format_gives_the_same_prepared_content(tmp_path, capsys):
    root = tmp_path / "data"
    labels = _flat_images(root)
    plain = pd.DataFrame({"file_name": list(labels), "label": list(labels.values())})
    plain.to_csv(tmp_path / "t.csv", index=False)
    plain.rename(columns={"file_name": "path"}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("".join(f"{p} {c}\n" for p, c in labels.items()))
    one_hot = pd.DataFrame({"image": [p[:-4] for p in labels]})  # ISIC: ids without the extension
    for name in ("alpha", "beta", "gamma"):
        one_hot[name] = [1.0 if c == name else 0.0 for c in labels.values()]
    one_hot.to_csv(tmp_path / "onehot.csv", index=False)
    outs = []
    for table, extra in (("t.csv", []), ("t.parquet", []), ("t.txt", []), ("onehot.csv", [])):  # one-hot: found
        outs.append(tmp_path / f"out-{table}")
        assert _prepare("--from-table", tmp_path / table, "--image-root", root, "--size", "8", "--out", outs[-1],
                        *extra) == 0
    for meta_file in ("metadata.csv", "metadata.jsonl"):
        folder = tmp_path / meta_file.replace(".", "-")
        shutil.copytree(root, folder)
        if meta_file.endswith(".csv"):
            plain.to_csv(folder / meta_file, index=False)
        else:
            plain.to_json(folder / meta_file, orient="records", lines=True)
        outs.append(tmp_path / f"out-{meta_file}")
        assert _prepare("--from-folder", folder, "--size", "8", "--out", outs[-1]) == 0
    first = load_prepared(outs[0])
    assert first.class_names == ["alpha", "beta", "gamma"] and first.counts() == [14, 8, 8]
    for out in outs[1:]:
        for split in ("train", "heldout"):
            for array in ("_images.npy", "_labels.npy"):
                assert (out / split / array).read_bytes() == (outs[0] / split / array).read_bytes(), (out, array)
        assert read_prepared_meta(out)["class_names"] == first.class_names


def test_tables_list_labels_naming_no_file_and_files_with_no_label(tmp_path, capsys):
    root = tmp_path / "data"
    labels = _flat_images(root)
    rows = [*labels.items(), ("img/missing.png", "alpha"), ("img/00.png", "beta"),  # 00 listed twice, agreeing
            ("img/01.png", "beta")]  # 01 is labelled alpha too: refused
    del rows[3]  # img/03.png: a file with no label
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "out"
    assert _prepare("--from-table", tmp_path / "t.csv", "--image-root", root, "--size", "8", "--out", out,
                    "--max-bad", "10%") == 0
    skipped = pd.read_csv(out / "_skipped.csv").set_index("path")["reason"].to_dict()
    assert skipped == {"img/missing.png": "label names no file", "img/03.png": "no label",
                       "img/01.png": "listed with different labels (alpha, beta)"}
    assert sum(load_prepared(out).counts()) + sum(load_prepared(out, "heldout").counts()) == 28
    err = _fail(capsys, "--from-table", tmp_path / "t.csv", "--image-root", root, "--size", "8",
                "--out", tmp_path / "o2", "--label-column", "nope")
    assert "no column(s) ['nope']" in err
    hot = pd.DataFrame({"path": list(labels), "x": [1] * 15 + [0] * 14 + [1], "y": [0] * 15 + [1] * 15})
    hot.to_parquet(tmp_path / "hot.parquet")
    assert _prepare("--from-table", tmp_path / "hot.parquet", "--image-root", root, "--size", "8",
                    "--label-columns", "x,y", "--out", tmp_path / "o3", "--max-bad", "5%") == 0
    skipped = pd.read_csv(tmp_path / "o3" / "_skipped.csv")
    assert skipped.values.tolist() == [["img/29.png", "one-hot row sets 2 classes (x, y)"]]  # the last row


def test_digits_round_trip_through_a_png_folder(tmp_path):
    images, labels, names = load_digits_uint8()
    src = tmp_path / "digits"
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        (src / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(src / names[label] / f"{i:04d}.png")
    order = np.argsort(labels.numpy(), kind="stable")  # the prepared rows: by class, then by file name
    assert _prepare("--from-folder", src, "--size", "16", "--out", tmp_path / "all", "--heldout-frac", "0") == 0
    back = load_prepared(tmp_path / "all")
    assert back.class_names == names and back.image_shape == (1, 16, 16)
    assert np.array_equal(back.images.numpy(), images.numpy()[order])
    assert np.array_equal(back.labels.numpy(), labels.numpy()[order])
    assert _prepare("--from-folder", src, "--size", "16", "--out", tmp_path / "split") == 0
    train, held = load_prepared(tmp_path / "split"), load_prepared(tmp_path / "split", "heldout")
    assert held.counts() == [int(n) // 10 for n in np.bincount(labels.numpy())]
    both = np.concatenate([train.images.numpy(), held.images.numpy()]).reshape(len(labels), -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, images.numpy().reshape(len(labels), -1)))


def test_report_numbers_head_tail_and_label_draw_warning():
    assert imbalance_stats([10, 10]) == {"n_max": 10, "n_min": 10, "rho": 1.0, "gini": 0.0}
    stats = imbalance_stats([100, 10, 1])
    assert stats["rho"] == 100 and abs(stats["gini"] - 396 / 666) < 1e-4
    mild = label_dist_shares([100, 50, 20], ["a", "b", "c"])
    assert mild["warning"] is None and mild["rarest_class"] == "c" and mild["shares"]["uniform"] == 0.3333
    extreme = label_dist_shares([3000] * 9 + [1], [f"c{k}" for k in range(10)])
    assert extreme["shares"]["inverted"] > 0.99 and "'c9'" in extreme["warning"]
    assert extreme["suggested"].startswith("power:") and "loss.label_dist=power:" in extreme["warning"]


def test_many_classes_print_quantiles_and_the_index_map(tmp_path, capsys):
    src = _folder(tmp_path / "src", {f"c{k:02d}": 1 + k for k in range(24)}, size=8)
    run = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--from-folder", str(src), "--size", "8",
                          "--out", str(tmp_path / "o"), "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "classes (index name): 0 c00, 1 c01," in run.stdout and "23 c23" in run.stdout
    assert "per-class quantiles" in run.stdout and "dry run: nothing written" in run.stdout
    assert not (tmp_path / "o").exists()


def test_two_classes_record_a_head_and_a_tail(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"benign": 40, "malignant": 22})
    assert _prepare("--from-folder", src, "--size", "8", "--out", tmp_path / "o") == 0
    assert "ratio 0.7 leaves no tail class among 2 classes" in capsys.readouterr().out
    assert list(list_folder(src).class_names) == ["benign", "malignant"]


def test_fashion_mnist_script_refuses_without_the_package(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pipelines.fashion_mnist_folder", "--out", str(tmp_path / "f"),
                          "--source", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "apt-get install -y dataset-fashion-mnist" in run.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed "
                                                  "(apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_script_writes_a_long_tailed_png_folder(tmp_path):
    from pipelines.fashion_mnist_folder import main as fashion_main

    out = tmp_path / "fm"
    assert fashion_main(["--out", str(out), "--imbalance", "1000"]) == 0
    counts = {d.name: len(list(d.iterdir())) for d in out.iterdir()}
    assert counts["T-shirt_top"] == 7000 and counts["Ankle_boot"] == 7 and len(counts) == 10
    with Image.open(out / "Ankle_boot" / next(iter(sorted(p.name for p in (out / "Ankle_boot").iterdir())))) as im:
        assert im.size == (28, 28) and im.mode == "L"
