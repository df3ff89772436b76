"""`sowa synth`: the procedural benchmark on disk. Determinism, layout, masks, kinds, tiers, families, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sowa.cli import main
from training.datasets import list_items
from training.synth import (
    CATEGORIES,
    FAMILIES,
    KINDS,
    TIERS,
    SynthError,
    SynthOptions,
    plan,
    render_item,
    write_benchmark,
)

SIZE = 80
OPTIONS = SynthOptions(image_size=SIZE, seed=3, train_per_class=2, test_good_per_class=2, test_defect_per_class=8)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "bench"
    write_benchmark(out, OPTIONS, progress=False)
    return out


def test_same_seed_same_bytes_whatever_the_workers_other_seed_other_images(bench: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_benchmark(again, OPTIONS, workers=2, progress=False)  # other processes, other completion order
    assert _digests(again) == _digests(bench)
    other = tmp_path / "other"
    write_benchmark(other, SynthOptions(SIZE, 4, 1, 1, 1), progress=False)
    ours, theirs = _digests(bench), _digests(other)
    common = [p for p in theirs if p.endswith(".png") and p in ours]
    assert len(common) == 12 * 4 and all(ours[p] != theirs[p] for p in common)


def test_an_image_does_not_depend_on_the_counts(bench: Path, tmp_path: Path) -> None:
    fewer = tmp_path / "fewer"
    write_benchmark(fewer, SynthOptions(SIZE, OPTIONS.seed, 1, 1, 2), progress=False)
    ours, theirs = _digests(bench), _digests(fewer)
    pngs = [p for p in theirs if p.endswith(".png")]
    assert len(pngs) == 12 * (1 + 1 + 2 * 2)  # images and masks
    assert all(theirs[p] == ours[p] for p in pngs)


def test_layout_meta_and_labels(bench: Path) -> None:
    marker = json.loads((bench / "synth.json").read_text())
    assert marker["format"] == "sowa-synth" and marker["complete"] and marker["options"]["seed"] == 3
    assert sorted(p.name for p in bench.iterdir()) == ["a", "b", "synth.json"]
    for family, classes in FAMILIES.items():
        root = bench / family
        assert sorted(p.name for p in root.iterdir()) == sorted([*classes, "meta.json"])
        train, test = list_items(root, "train"), list_items(root, "test")
        assert len(train) == 6 * OPTIONS.train_per_class and {i.anomaly for i in train} == {0}
        assert all(i.mask is None and i.image.parent.name == "good" for i in train)
        assert sum(1 - i.anomaly for i in test) == 6 * OPTIONS.test_good_per_class
        defects = [i for i in test if i.anomaly]
        assert len(defects) == 6 * OPTIONS.test_defect_per_class
        for item in defects:
            assert item.mask == root / item.cls_name / "ground_truth" / item.defect / f"{item.image.stem}_mask.png"
            assert item.image.stem.split("_", 1)[1] in TIERS
        with Image.open(train[0].image) as img, Image.open(defects[0].mask) as mask:
            assert (img.mode, img.size, mask.mode, mask.size) == ("RGB", (SIZE, SIZE), "L", (SIZE, SIZE))
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}
        meta = json.loads((root / "meta.json").read_text())
        for entries in meta["test"].values():
            for e in entries:
                assert set(e) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
                assert (e["mask_path"] == "") == (e["anomaly"] == 0) == (e["specie_name"] == "good")
                assert e["img_path"].split("/")[2] == e["specie_name"]


def test_meta_json_and_mvtec_folders_list_the_same_items(bench: Path, tmp_path: Path) -> None:
    for family in FAMILIES:
        bare = tmp_path / family
        shutil.copytree(bench / family, bare)
        (bare / "meta.json").unlink()
        for split in ("train", "test"):
            via_meta = [(i.image.relative_to(bench / family), i.mask and i.mask.relative_to(bench / family),
                         i.cls_name, i.anomaly, i.defect) for i in list_items(bench / family, split)]
            via_folders = [(i.image.relative_to(bare), i.mask and i.mask.relative_to(bare), i.cls_name, i.anomaly,
                            i.defect) for i in list_items(bare, split)]
            assert via_meta == via_folders and len(via_meta) > 0


def test_masks_are_exactly_the_changed_pixels(bench: Path) -> None:
    defects = [s for s in plan(OPTIONS) if s.defect != "good"]
    for spec in defects:
        normal, defect = render_item(spec, OPTIONS)  # the normal image the defect was drawn on
        root = bench / spec.family
        image = np.asarray(Image.open(root / spec.img_path))
        mask = np.asarray(Image.open(root / spec.mask_path)) == 255
        assert np.array_equal(image, defect.image)
        assert np.array_equal(mask, np.any(image != normal, axis=-1)), spec.img_path
        diff = np.abs(image.astype(int) - normal).max(axis=-1)
        assert mask.sum() >= 6 and diff[mask].min() > 2  # a handful of pixels at least, none invisibly changed
    good = next(s for s in plan(OPTIONS) if s.split == "test" and s.defect == "good")
    assert np.array_equal(np.asarray(Image.open(bench / good.family / good.img_path)), render_item(good, OPTIONS)[0])


def test_every_kind_in_every_class_tiers_by_size(bench: Path) -> None:
    areas: dict[str, list[float]] = {t: [] for t in TIERS}
    for family in FAMILIES:
        test = list_items(bench / family, "test")
        for cls in FAMILIES[family]:
            assert {i.defect for i in test if i.cls_name == cls and i.anomaly} == set(KINDS)
        for item in test:
            if item.anomaly and item.defect not in ("scratch", "scar"):  # thin kinds are tiered by length
                areas[item.image.stem.split("_", 1)[1]].append(float(np.mean(np.asarray(Image.open(item.mask)) > 0)))
    medians = {t: float(np.median(a)) for t, a in areas.items()}
    assert medians["large"] > 0.03 > medians["medium"] > 0.007 > medians["small"]
    assert min(areas["small"]) < 0.005


def test_defects_have_contrast(bench: Path) -> None:
    contrast = {kind: [] for kind in KINDS}
    for spec in plan(OPTIONS):
        if spec.defect != "good":
            normal, defect = render_item(spec, OPTIONS)
            diff = np.abs(defect.image.astype(int) - normal).max(axis=-1)
            contrast[spec.defect].append(diff[defect.mask].mean())
    for kind, values in contrast.items():
        assert np.median(values) >= (12 if kind == "warp" else 25), kind  # grey levels, the strongest channel


def test_families_are_disjoint_and_mixed() -> None:
    a, b = set(FAMILIES["a"]), set(FAMILIES["b"])
    assert not a & b and len(a | b) >= 8
    for names in FAMILIES.values():
        kinds = [CATEGORIES[n].kind for n in names]
        assert kinds.count("texture") >= 2 and kinds.count("object") >= 2


def test_normal_parts_of_a_class_vary_but_moderately(bench: Path) -> None:
    for cls in ("hexnut", "screw", "woven"):
        family = CATEGORIES[cls].family
        first, second = (np.asarray(Image.open(bench / family / cls / "train" / "good" / f"00{i}.png"), dtype=float)
                         for i in (0, 1))
        assert not np.array_equal(first, second)
        assert abs(first.mean() - second.mean()) < 0.1 * 255  # mild lighting drift, not another product


def test_bad_options_are_refused(tmp_path: Path) -> None:
    for options in (SynthOptions(image_size=16), SynthOptions(train_per_class=0), SynthOptions(seed=-1)):
        with pytest.raises(SynthError):
            write_benchmark(tmp_path / "x", options, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_writes_refuses_and_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--image-size", "64", "--train-per-class", "1", "--test-good-per-class", "1",
            "--test-defect-per-class", "1", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["family a", "family b"]
    assert "6 train, 6 good + 6 defective test images" in lines[0]
    assert len(list_items(out / "b", "test")) == 12
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    (out / "a" / "woven" / "train" / "good" / "000.png").unlink()
    (out / "keep.txt").write_text("a user's file beside the output")
    assert main([*args, "--force"]) == 0
    assert (out / "a" / "woven" / "train" / "good" / "000.png").is_file() and (out / "keep.txt").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a synth output")
    assert main(["synth", "--out", str(foreign), "--force", "--no-progress"]) == 2
    assert "holds no earlier synth output" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
