"""SOWA (hierarchical frozen window self-attention over CLIP) for few-shot anomaly detection: the network only.

Pure torch + open_clip; imports nothing from `service` or `training`.
"""

from .bundle import BundleError, BundleInfo, load_bundle, read_manifest, save_bundle
from .calibration import Calibration, ImageScores
from .config import AdapterConfig, BackboneConfig, ConfigError, ModelConfig, PromptConfig
from .inference import ClassMemory, Prediction, fit_class, predict_scored
from .memory_bank import MemoryBank
from .sowa import SowaModel, SowaOutput

__all__ = [
    "AdapterConfig",
    "BackboneConfig",
    "BundleError",
    "BundleInfo",
    "Calibration",
    "ClassMemory",
    "ConfigError",
    "ImageScores",
    "MemoryBank",
    "ModelConfig",
    "Prediction",
    "PromptConfig",
    "SowaModel",
    "SowaOutput",
    "fit_class",
    "load_bundle",
    "predict_scored",
    "read_manifest",
    "save_bundle",
]
