"""nemo-minitron: the Minitron recipe (score, prune, distill) on Megatron-Core."""

__version__ = "0.1.0"
