"""minirbt: two-stage knowledge distillation of small Chinese BERT models (MiniRBT recipe)."""

import os

# Model arguments take local folders or Hugging Face model ids (minirbt.modeling.resolve_model): the hub is used
# when a name is not a folder here, online or from the local HF cache (HF_HUB_OFFLINE=1). Nothing is forced.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
