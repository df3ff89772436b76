"""`sowa eval` and `sowa plot`: the literature's protocol on a tiny random-weight bundle and a tiny MVTec-layout
dataset made here (plain textures, a bright square as the defect)."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle, save_bundle
from model.config import PromptConfig
from model.inference import fit_class
from model.sowa import SowaModel
from sowa.cli import main
from tests.helpers import perturb_trainables, tiny_config
from training.datasets import DatasetError, Item, list_items, load_sample
from training.evaluate import evaluate, run_class, sample_shots, write_report
from training.plots import plot_vs_k
from training.report import METRICS, aggregate, markdown

CLASSES = {"alpha": (90, 140, 60), "beta": (40, 60, 160)}  # base colour of each class's texture
TRAIN, NORMAL_TESTS, DEFECT_TESTS = 4, 3, 3


def _texture(rng: np.random.Generator, base: tuple[int, int, int]) -> np.ndarray:
    img = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (64, 64, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, base in CLASSES.items():
        for split, folder, n in (("train", "good", TRAIN), ("test", "good", NORMAL_TESTS)):
            (root / cls / split / folder).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_texture(rng, base)).save(root / cls / split / folder / f"{i:03d}.png")
        (root / cls / "test" / "spot").mkdir(parents=True)
        (root / cls / "ground_truth" / "spot").mkdir(parents=True)
        for i in range(DEFECT_TESTS):
            img, mask = _texture(rng, base), np.zeros((64, 64), dtype=np.uint8)
            y, x = rng.integers(4, 44, size=2)
            img[y:y + 16, x:x + 16] = 250
            mask[y:y + 16, x:x + 16] = 255
            Image.fromarray(img).save(root / cls / "test" / "spot" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / cls / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


def _make_bundle(path: Path, trained: bool) -> Path:
    torch.manual_seed(3)
    model = SowaModel(tiny_config(), trained=trained)
    if trained:
        perturb_trainables(model)
    model.refresh_text()
    save_bundle(model, path, {"source": "test"})
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    data = _make_dataset(root / "data")
    bundle = _make_bundle(root / "bundle", trained=True)
    report = evaluate(bundle, data, [0, 1, 2], [0, 1], device="cpu", batch_size=4, visuals=root / "visuals",
                      visuals_per_class=4, progress=False, metric_workers=0)
    return {"root": root, "data": data, "bundle": bundle, "report": report}


def test_report_structure(workspace: dict[str, Any]) -> None:
    report = workspace["report"]
    assert report["ks"] == [0, 1, 2] and report["seeds"] == [0, 1]
    assert report["classes"] == {c: {"test": 6, "anomalous": 3, "normal_train": 4} for c in CLASSES}
    assert report["bundle"]["trained"] is True and len(report["bundle"]["fingerprint"]) == 64
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["machine"]
    assert report["elapsed_s"] > 0 and report["created"].endswith("Z")
    for k in ("0", "1", "2"):
        r = report["results"][k]
        assert set(r["mean"]) == set(r["std"]) == set(METRICS)
        assert set(r["per_class"]) == set(CLASSES)
        assert len(r["per_seed"]) == (1 if k == "0" else 2)
        values = [*r["mean"].values(), *(v for c in r["per_class"].values() for v in c.values())]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
    assert report["results"]["0"]["per_seed"][0]["seed"] is None
    assert all(v == 0.0 for v in report["results"]["0"]["std"].values())  # zero-shot: computed once
    # K=0: the online score is the text score, as is the reference image score
    assert report["results"]["0"]["mean"]["image_auroc_online"] == report["results"]["0"]["mean"]["image_auroc"]
    assert report["results"]["2"]["shots_used"] == {"alpha": 2, "beta": 2}
    assert report["shots"]["2"]["1"]["alpha"][0].startswith("alpha/train/good/")
    # the bright square is an easy defect for the k-shot memory, even with random weights
    assert report["results"]["2"]["mean"]["pixel_auroc"] > 0.9
    path = workspace["root"] / "out" / "report.json"
    write_report(report, path)
    assert json.loads(path.read_text()) == report


def test_untrained_zero_shot_is_chance(workspace: dict[str, Any], tmp_path: Path) -> None:
    bundle = _make_bundle(tmp_path / "untrained", trained=False)
    report = evaluate(bundle, workspace["data"], [0], [], device="cpu", progress=False, metric_workers=0)
    mean = report["results"]["0"]["mean"]
    assert mean["pixel_auroc"] == 0.5 and mean["image_auroc"] == 0.5  # zero maps, constant 0.5 text scores
    assert report["bundle"]["trained"] is False and report["shots"] == {}


def _class_batch(data: Path, cls: str, size: int) -> tuple[list[Item], torch.Tensor]:
    items = [it for it in list_items(data, "test") if it.cls_name == cls]
    return items, torch.stack([load_sample(it, size).image for it in items])


def test_fast_paths_equal_predict(workspace: dict[str, Any]) -> None:
    model, _ = load_bundle(workspace["bundle"])
    items, images = _class_batch(workspace["data"], "alpha", model.image_size)
    train = [it for it in list_items(workspace["data"], "train") if it.cls_name == "alpha"]
    draws = {(k, seed): sample_shots(train, k, seed, "alpha") for k in (1, 2, 3) for seed in (0, 5)}
    with ThreadPoolExecutor(2) as pool:
        maps = run_class(model, items, draws, batch_size=4, pool=pool)
    plain = model.predict(images)
    assert torch.allclose(maps.final_maps((0, None)), plain.anomaly_maps, atol=1e-5)
    assert torch.allclose(maps.text_scores, plain.text_scores, atol=1e-6)
    for setting, shots in draws.items():
        shot_images = torch.stack([load_sample(it, model.image_size).image for it in shots])
        memory = fit_class(model, shot_images)
        expected = model.predict(images, [memory.bank] * len(items)).anomaly_maps
        assert torch.allclose(maps.final_maps(setting), expected, atol=1e-5), setting
        ours = maps.memories[setting].calibration
        assert ours.shots == memory.calibration.shots == setting[0]
        assert ours.map_mean == pytest.approx(memory.calibration.map_mean, abs=1e-5)
        assert ours.threshold == pytest.approx(memory.calibration.threshold, abs=1e-6)


def test_shot_sampling_is_deterministic(workspace: dict[str, Any]) -> None:
    train = [it for it in list_items(workspace["data"], "train") if it.cls_name == "beta"]
    assert sample_shots(train, 2, 7, "beta") == sample_shots(train, 2, 7, "beta")
    assert sample_shots(train, 1, 7, "beta") == sample_shots(train, 2, 7, "beta")[:1]  # nested draws
    assert len({tuple(sample_shots(train, 2, s, "beta")) for s in range(6)}) > 1
    assert sample_shots(train, 9, 0, "beta") == sample_shots(train, 4, 0, "beta") and len(train) == 4
    report = workspace["report"]
    assert report["shots"]["2"]["0"] != report["shots"]["2"]["1"]
    # a second run of only seed 1 draws the same shots and measures the same numbers
    again = evaluate(workspace["bundle"], workspace["data"], [2, 5], [1], device="cpu", batch_size=3,
                     progress=False, metric_workers=0)
    assert again["shots"]["2"]["1"] == report["shots"]["2"]["1"]
    ours, theirs = again["results"]["2"]["per_seed"][0], report["results"]["2"]["per_seed"][1]
    assert ours["seed"] == theirs["seed"] == 1
    # other batch compositions move fp32 maps by ~1e-7, which can swap a few near-tied pixels
    assert ours["mean"] == pytest.approx(theirs["mean"], abs=1e-4)
    assert again["results"]["5"]["shots_used"] == {"alpha": 4, "beta": 4}  # K beyond the train split: all of it
    assert sum("K=5 asks for more shots" in n for n in again["notes"]) == 2


def test_aggregation_by_hand(workspace: dict[str, Any]) -> None:
    r = workspace["report"]["results"]["2"]
    for m in METRICS:
        seed_means = [np.mean([s["per_class"][c][m] for c in CLASSES]) for s in r["per_seed"]]
        assert [s["mean"][m] for s in r["per_seed"]] == pytest.approx(seed_means)
        assert r["mean"][m] == pytest.approx((seed_means[0] + seed_means[1]) / 2)
        assert r["std"][m] == pytest.approx(abs(seed_means[0] - seed_means[1]) / 2)  # population std of two
    one = dict.fromkeys(METRICS, 0.0)
    agg = aggregate([(0, {"a": {**one, "pixel_auroc": 0.9}, "b": {**one, "pixel_auroc": 0.7}}),
                     (1, {"a": {**one, "pixel_auroc": 1.0}, "b": {**one, "pixel_auroc": 0.6}}),
                     (2, {"a": {**one, "pixel_auroc": 0.5}, "b": {**one, "pixel_auroc": 0.5}})])
    assert [s["mean"]["pixel_auroc"] for s in agg["per_seed"]] == pytest.approx([0.8, 0.8, 0.5])
    assert agg["mean"]["pixel_auroc"] == pytest.approx(0.7)
    assert agg["std"]["pixel_auroc"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0.04) / 3))
    assert agg["per_class"]["a"]["pixel_auroc"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="covers classes"):
        aggregate([(0, {"a": one}), (1, {"b": one})])


def test_markdown_table(workspace: dict[str, Any]) -> None:
    report = workspace["report"]
    text = markdown(report)
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| K |"))
    assert "pixel AUROC" in header and "AUPRO (SOWA)" in header and header.count("|") == len(METRICS) + 2
    row = next(ln for ln in lines if ln.startswith("| 2 |"))
    mean, std = report["results"]["2"]["mean"]["pixel_auroc"], report["results"]["2"]["std"]["pixel_auroc"]
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in row
    assert "## Per class, K = 2" in text and any(ln.startswith("| alpha |") for ln in lines)


def test_visuals(workspace: dict[str, Any]) -> None:
    visuals = workspace["root"] / "visuals"
    index = json.loads((visuals / "index.json").read_text())
    assert index["k"] == 2 and index["seed"] == 0 and index["scale"] == [0.0, 4.0]
    assert len(index["files"]) == 2 * 4
    alpha = [f for f in index["files"] if f["class"] == "alpha"]
    assert [f["anomaly"] for f in alpha] == [1, 1, 1, 0]  # anomalous first
    for entry in index["files"]:
        with Image.open(visuals / entry["file"]) as img:
            assert img.size == (3 * 64, 64) and img.format == "PNG"
            assert img.text["sowa:scale"].startswith("0..4")


def test_plot(workspace: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    plot_vs_k([("tiny", workspace["report"]), ("again", workspace["report"])], "pixel_aupro", out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.size[0] > 300
    with pytest.raises(ValueError, match="unknown metric"):
        plot_vs_k([("tiny", workspace["report"])], "accuracy", out)


def test_argument_errors(workspace: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="K must be >= 0"):
        evaluate(workspace["bundle"], workspace["data"], [-1], [0], progress=False)
    with pytest.raises(ValueError, match="no seed"):
        evaluate(workspace["bundle"], workspace["data"], [1], [], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        evaluate(workspace["bundle"], tmp_path / "empty", [0], [0], progress=False)


def test_cli(workspace: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "report.json"
    code = main(["eval", "--bundle", str(workspace["bundle"]), "--data", str(workspace["data"]), "--k", "0,1,2",
                 "--seeds", "0,1", "--device", "cpu", "--batch-size", "4", "--out", str(out), "--markdown",
                 str(tmp_path / "r.md"), "--metric-workers", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| K |" in printed and (tmp_path / "r.md").read_text() in printed
    report = json.loads(out.read_text())
    # the same run with metrics computed in a worker process gives the in-process numbers exactly
    assert report["results"] == workspace["report"]["results"]
    png = tmp_path / "k.png"
    assert main(["plot", str(out), str(out), "--label", "a", "--label", "b", "--metric", "image_auroc", "--out",
                 str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(out), "--label", "a", "--label", "b", "--out", str(png)]) == 2
    assert main(["eval", "--bundle", str(workspace["bundle"]), "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "no such dataset directory" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_per_kind_breakdown(workspace: dict[str, Any]) -> None:
    """Each defect kind against the class's normals: a kind the map ranks perfectly gets 1, an inverted one 0."""
    from training.report import class_metrics

    labels = np.array([0, 0, 1, 1])
    kinds = np.array(["good", "good", "crack", "stain"])
    masks = np.zeros((4, 2, 2), bool)
    masks[2, 0, 0] = masks[3, 0, 0] = True
    maps = np.full((4, 2, 2), 0.5)
    maps[2, 0, 0] = 0.9  # the crack pixel above every normal pixel
    maps[3, 0, 0] = 0.1  # the stain pixel below every normal pixel
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    values, _ = class_metrics(labels, scores, scores, masks, maps, kinds)
    assert values["by_kind"]["crack"] == {"image_auroc": 1.0, "pixel_auroc": 1.0}
    assert values["by_kind"]["stain"] == {"image_auroc": 0.0, "pixel_auroc": 0.0}
    # with ties, the ranked-negatives shortcut is scikit-learn's AUROC of the kind's pixels against all normal ones
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    maps = np.round(rng.random((4, 2, 2)), 1)
    values, _ = class_metrics(labels, scores, scores, masks, maps, kinds)
    positives, negatives = maps[2][masks[2]], maps[~masks]
    expected = roc_auc_score(np.r_[np.ones(positives.size), np.zeros(negatives.size)], np.r_[positives, negatives])
    assert values["by_kind"]["crack"]["pixel_auroc"] == pytest.approx(expected, abs=1e-12)
    report = workspace["report"]
    for k in ("0", "1", "2"):
        per_kind = report["results"][k]["per_kind"]
        assert list(per_kind) == ["spot"]
        assert 0.0 <= per_kind["spot"]["pixel_auroc"] <= 1.0
    # one kind per class here: the kind's pixel AUROC is the class's, averaged over classes
    r = report["results"]["2"]
    assert r["per_kind"]["spot"]["pixel_auroc"] == pytest.approx(r["mean"]["pixel_auroc"], abs=1e-12)
    assert "## Per defect kind" in markdown(report)


def test_each_class_is_evaluated_with_its_prompt_class(workspace: dict[str, Any]) -> None:
    """A bundle with a prompt context per class: `sowa eval` scores class `beta` with beta's context (as the
    service does), not with prompt class 0's."""
    torch.manual_seed(3)
    cfg = dataclasses.replace(tiny_config(), prompt=PromptConfig(length=4, class_names=("alpha", "beta")))
    model = SowaModel(cfg)
    perturb_trainables(model, 3)
    model.refresh_text()
    items, images = _class_batch(workspace["data"], "beta", model.image_size)
    with ThreadPoolExecutor(2) as pool:
        as_beta = run_class(model, items, {}, batch_size=4, pool=pool, class_name="beta")
        as_default = run_class(model, items, {}, batch_size=4, pool=pool)
    beta = model.predict(images, class_ids=[1] * len(items))
    assert torch.allclose(as_beta.text_scores, beta.text_scores, atol=1e-6)
    assert torch.allclose(as_beta.final_maps((0, None)), beta.anomaly_maps, atol=1e-5)
    assert not torch.allclose(as_beta.text_scores, as_default.text_scores, atol=1e-4)
