"""Everything that needs TensorFlow, and nothing else: the heavy side of the project.

Only the processes that train or export a model import this package: training the head
(`head_training`, `search`), fine-tuning (`finetune`, `augment`), export (`export`,
`tflite_convert`, `graph_images`, `image_header`) and the one-time backbone conversions
(`backbones`, `efficientnet_lite`). Every other module of `retrain` runs on numpy, Pillow and
LiteRT, and tests/test_runtime.py fails if one of them imports TensorFlow.
"""

import os
import sys

from retrain.native_log import filtered_stderr

# TensorFlow's C++ start-up lines (oneDNN notes, CPU feature lists) are no warnings a user can act
# on; some ignore the log level, so the import also runs with them filtered out.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `import tensorflow` also imports Keras when it is installed, and Keras imports scikit-learn:
# 1.6 of its 3.5 s here, which export (no Keras in it) paid for nothing. So TensorFlow is imported
# with Keras hidden; the modules that train (`head_training`, `finetune`) import Keras themselves,
# after, as any module would, and `tf.keras` still loads it on first use.
_hide_keras = "keras" not in sys.modules
if _hide_keras:
    sys.modules["keras"] = None  # an ImportError for TensorFlow's optional import, nothing else
try:
    with filtered_stderr():
        import tensorflow  # noqa: F401
finally:
    if _hide_keras:
        del sys.modules["keras"]

# `retrain.head.logits` on TensorFlow: the ops training, fine-tuning and export run the head with.
TF_OPS = {
    "matmul": tensorflow.matmul,
    "relu": tensorflow.nn.relu,
    "tanh": tensorflow.tanh,
    "sigmoid": tensorflow.sigmoid,
}
