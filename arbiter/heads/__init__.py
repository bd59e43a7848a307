"""Direct Preference Heads: config, modules, the one feature function, storage and a runtime registry.

Imports only torch, safetensors and pydantic (a test enforces it), so training and service share it.
"""

from .config import FINAL_NORM_LAYER, FORMAT_VERSION, POOLERS, BackboneFingerprint, HeadConfig, SelectionRule
from .features import end_features, end_positions
from .io import HeadLoadError, load_head, read_config, save_head
from .modules import DPHHead, build_head, head_rewards, num_parameters
from .registry import HeadNotFound, HeadRegistry, LoadedHead

__all__ = [
    "FINAL_NORM_LAYER", "FORMAT_VERSION", "POOLERS", "BackboneFingerprint", "HeadConfig", "SelectionRule", "end_features",
    "end_positions", "HeadLoadError", "load_head", "read_config", "save_head", "DPHHead", "build_head",
    "head_rewards", "num_parameters", "HeadNotFound", "HeadRegistry", "LoadedHead",
]
