"""minirbt: two-stage knowledge distillation of small Chinese BERT models (MiniRBT recipe)."""

import os

# Every model is a local folder: never wait on a model hub that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
