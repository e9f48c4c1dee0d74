"""retrain: a reproducible transfer-learning pipeline for image classifiers.

The stage scripts in `stages/` are thin shells over this library; `retrain` on the command line
(`retrain backbones`, `retrain predict`) is another.
"""

import os

__version__ = "0.1.0"

# TensorFlow's C++ INFO/WARNING chatter hides the one line a user needs; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's INFO lines ("Creating initial MLflow database tables", "Validating input example") are
# its bookkeeping, not news for the user; its warnings still show.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
