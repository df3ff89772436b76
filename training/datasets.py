"""Anomaly-detection datasets in the layouts users have (SOWA_SPEC.md §8), as lists of items and loaded samples.

- `meta.json` (AnomalyCLIP / SOWA format): {"train"|"test": {class: [{img_path, mask_path, cls_name, anomaly}]}}
- MVTec AD folders: <class>/train/good/*, <class>/test/<defect>/*, <class>/ground_truth/<defect>/<stem>_mask.png
- VisA: split_csv/1cls.csv with columns object, split, label, image, mask

Listing checks that every file exists and that labels agree with masks; loading checks that an image decodes
and its mask has its size. Problems raise `DatasetError` naming the file: never a silent wrong label.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.preprocess import ImageDecodeError, load_image, preprocess

__all__ = ["DatasetError", "Item", "Sample", "list_items", "load_raw", "load_sample", "transform"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DatasetError(ValueError):
    """A dataset file that is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Item:
    image: Path
    mask: Path | None  # None: normal, or anomalous without a pixel mask
    cls_name: str
    anomaly: int  # 0 normal, 1 anomalous
    defect: str = "good"


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor  # (3, S, S) preprocessed
    mask: torch.Tensor  # (S, S) bool
    item: Item


def _exists(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    return path


def _from_meta(root: Path, split: str) -> list[Item]:
    path = root / "meta.json"
    try:
        meta = json.loads(path.read_text())
        classes = meta[split]
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable ({e})") from None
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: no '{split}' split") from None
    items = []
    for cls_name, entries in classes.items():
        for e in entries:
            try:
                anomaly = int(e["anomaly"])
                mask = _exists(root / e["mask_path"], "mask") if e.get("mask_path") else None
                image = _exists(root / e["img_path"], "image")
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{path}: malformed item in class '{cls_name}': {err}") from None
            if anomaly not in (0, 1):
                raise DatasetError(f"{path}: {e['img_path']}: anomaly must be 0 or 1, got {anomaly}")
            if anomaly == 0 and mask is not None:
                raise DatasetError(f"{path}: {e['img_path']} is labelled normal but has a mask")
            items.append(Item(image, mask, e.get("cls_name", cls_name), anomaly, e.get("specie_name") or
                              ("good" if anomaly == 0 else "defect")))
    return items


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []


def _from_mvtec(root: Path, split: str) -> list[Item]:
    items = []
    classes = sorted(d for d in root.iterdir() if (d / "train").is_dir() or (d / "test").is_dir())
    if not classes:
        raise DatasetError(f"{root}: neither meta.json, split_csv/ nor MVTec class folders (<class>/train, /test)")
    for cls_dir in classes:
        split_dir = cls_dir / split
        for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []:
            for image in _images(defect_dir):
                if defect_dir.name == "good":
                    items.append(Item(image, None, cls_dir.name, 0))
                    continue
                mask = _exists(cls_dir / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png", "mask")
                items.append(Item(image, mask, cls_dir.name, 1, defect_dir.name))
    return items


def _from_visa(root: Path, split: str) -> list[Item]:
    path = root / "split_csv" / "1cls.csv"
    items = []
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] != split:
                    continue
                anomaly = {"normal": 0, "anomaly": 1}.get(row["label"])
                if anomaly is None:
                    raise DatasetError(f"{path}: {row['image']}: label must be normal or anomaly, got "
                                       f"{row['label']!r}")
                mask = _exists(root / row["mask"], "mask") if row.get("mask") else None
                items.append(Item(_exists(root / row["image"], "image"), mask, row["object"], anomaly,
                                  "good" if anomaly == 0 else "defect"))
    except (OSError, KeyError, csv.Error) as e:
        raise DatasetError(f"{path}: unreadable or missing a column ({e})") from None
    return items


def list_items(root: str | Path, split: str = "test") -> list[Item]:
    """Every item of `split` ("train" or "test"), from meta.json when present, else VisA's CSV, else MVTec."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"split must be train or test, got {split!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if (root / "meta.json").is_file():
        return _from_meta(root, split)
    if (root / "split_csv" / "1cls.csv").is_file():
        return _from_visa(root, split)
    return _from_mvtec(root, split)


def load_raw(item: Item) -> tuple[Image.Image, np.ndarray]:
    """The item's decoded RGB image and its binary mask (H, W) bool at the image's size (all False if none)."""
    try:
        img = load_image(item.image)
    except ImageDecodeError as e:
        raise DatasetError(str(e)) from None
    if item.mask is None:
        return img, np.zeros((img.height, img.width), dtype=bool)
    try:
        with Image.open(item.mask) as m:
            m.load()
            raw = m.convert("L")
    except Exception as e:
        raise DatasetError(f"{item.mask}: unreadable mask ({e})") from None
    if raw.size != img.size:
        raise DatasetError(f"{item.mask}: mask is {raw.size[0]}x{raw.size[1]}, its image is "
                           f"{img.size[0]}x{img.size[1]}")
    return img, np.asarray(raw) > 0


def transform(img: Image.Image, mask: np.ndarray, size: int, mask_threshold: float = 0.5
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference preprocessing of the image; the {0, 255} mask resized bilinear and thresholded (§7.4)."""
    binary = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = np.asarray(binary.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    return preprocess(img, size), torch.from_numpy(resized > mask_threshold)


def load_sample(item: Item, size: int, mask_threshold: float = 0.5) -> Sample:
    """Reference preprocessing of the image; mask binarised (> 0), resized bilinear, thresholded (§7.4):
    `mask_threshold` 0.5 at test time, 0 for training."""
    img, mask = load_raw(item)
    image, m = transform(img, mask, size, mask_threshold)
    return Sample(image, m, item)
