from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.datasets import DatasetError, list_items, load_sample


def _img(path: Path, size: tuple[int, int] = (40, 30), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    a[10:20, 5:15] = 255
    Image.fromarray(a).save(path)
    return path


def _mvtec(root: Path) -> Path:
    _img(root / "bottle/train/good/000.png")
    _img(root / "bottle/test/good/000.png")
    _img(root / "bottle/test/crack/000.png")
    _mask(root / "bottle/ground_truth/crack/000_mask.png")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    train, test = list_items(root, "train"), list_items(root, "test")
    assert [(i.cls_name, i.anomaly) for i in train] == [("bottle", 0)]
    assert sorted((i.defect, i.anomaly, i.mask is not None) for i in test) == [("crack", 1, True), ("good", 0, False)]
    crack = next(i for i in test if i.anomaly)
    s = load_sample(crack, 64)
    assert s.image.shape == (3, 64, 64) and s.mask.dtype == torch.bool
    assert 0.05 < s.mask.float().mean() < 0.2  # the 10x10 of 40x30 square, resized
    (root / "bottle/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DatasetError, match="000_mask.png: mask not found"):
        list_items(root, "test")


def test_meta_json_and_label_checks(tmp_path: Path) -> None:
    _img(tmp_path / "a/good.png")
    _img(tmp_path / "a/bad.png")
    _mask(tmp_path / "a/bad_mask.png")
    meta = {"train": {"a": [{"img_path": "a/good.png", "mask_path": "", "cls_name": "a", "anomaly": 0}]},
            "test": {"a": [{"img_path": "a/good.png", "mask_path": "", "cls_name": "a", "anomaly": 0},
                           {"img_path": "a/bad.png", "mask_path": "a/bad_mask.png", "cls_name": "a",
                            "anomaly": 1, "specie_name": "scratch"}]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    test = list_items(tmp_path, "test")
    assert [(i.anomaly, i.defect) for i in test] == [(0, "good"), (1, "scratch")]
    meta["test"]["a"][0]["mask_path"] = "a/bad_mask.png"  # a normal item with a mask: a wrong label
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="labelled normal but has a mask"):
        list_items(tmp_path, "test")


def test_visa_csv(tmp_path: Path) -> None:
    _img(tmp_path / "candle/Data/Images/Normal/0.JPG")
    _img(tmp_path / "candle/Data/Images/Anomaly/1.JPG")
    _mask(tmp_path / "candle/Data/Masks/Anomaly/1.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/1.JPG,candle/Data/Masks/Anomaly/1.png\n")
    assert [(i.cls_name, i.anomaly) for i in list_items(tmp_path, "test")] == [("candle", 1)]
    assert len(list_items(tmp_path, "train")) == 1


def test_unreadable_image_and_wrong_mask_size_name_the_file(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _mask(root / "bottle/ground_truth/crack/000_mask.png", size=(20, 20))
    crack = next(i for i in list_items(root, "test") if i.anomaly)
    with pytest.raises(DatasetError, match=r"000_mask.png: mask is 20x20, its image is 40x30"):
        load_sample(crack, 64)
    (root / "bottle/test/crack/000.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="000.png"):
        load_sample(crack, 64)
    with pytest.raises(DatasetError, match="no such dataset"):
        list_items(tmp_path / "nowhere")
