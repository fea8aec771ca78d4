"""nemo-minitron: the Minitron recipe (score, prune, distill) on Megatron-Core."""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Megatron-Core announces every optional GPU kernel it cannot find; on CPU that is expected, not news.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

__version__ = "0.1.0"
