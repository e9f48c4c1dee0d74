"""Feature extractors ("backbones"): the embedded EfficientNet-Lite0/1/2 and TF Hub image modules.

`load_backbone(spec, image_size=None)` is the one way in: a preset name (`print_presets()` lists
them), a TF Hub handle or a local SavedModel folder, all loaded by the same code and all checked
against TF Hub's image feature-vector convention (float32 [N, H, W, 3] in [0, 1] → float32
[N, D]). The embedded default is converted once from PyTorch weights into a SavedModel in the
retrain cache folder (`$RETRAIN_CACHE_DIR/backbones`, default `~/.cache/retrain/backbones`), as
are `efficientnet_lite1` and `efficientnet_lite2`.
"""

from retrain.backbones.loader import BACKBONE_VERSION, Backbone, load_backbone
from retrain.backbones.presets import EMBEDDED as DEFAULT_BACKBONE
from retrain.backbones.presets import PRESETS, describe_presets, print_presets

__all__ = [
    "BACKBONE_VERSION",
    "Backbone",
    "DEFAULT_BACKBONE",
    "PRESETS",
    "describe_presets",
    "load_backbone",
    "print_presets",
]
