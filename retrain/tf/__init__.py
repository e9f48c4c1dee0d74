"""Everything that needs TensorFlow, and nothing else: the heavy side of the project.

Only the processes that train or export a model import this package: training the head
(`head_training`, `search`), fine-tuning (`finetune`, `augment`), export (`export`,
`tflite_convert`, `graph_images`, `image_header`) and the one-time backbone conversions
(`backbones`, `efficientnet_lite`). Every other module of `retrain` runs on numpy, Pillow and
LiteRT, and tests/test_runtime.py fails if one of them imports TensorFlow.
"""

import os

from retrain.native_log import filtered_stderr

# TensorFlow's C++ start-up lines (oneDNN notes, CPU feature lists) are no warnings a user can act
# on; some ignore the log level, so the import also runs with them filtered out.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
with filtered_stderr():
    import tensorflow  # noqa: F401
