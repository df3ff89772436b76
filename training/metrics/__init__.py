"""Accuracy metrics of the literature, per class (SOWA_SPEC.md §9): image and pixel AUROC, AP, F1-max, and
AUPRO both as MVTec defines it and as the research code computes it."""

from .aupro import aupro, aupro_sowa, pro_curve
from .ranking import auroc, average_precision, f1_max

__all__ = ["aupro", "aupro_sowa", "auroc", "average_precision", "f1_max", "pro_curve"]
