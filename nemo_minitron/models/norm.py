"""RMSNorm for the local layer spec that also runs under sequence parallelism.

Megatron-Core's local spec wraps torch.nn.RMSNorm and refuses sequence_parallel=True (only apex / Transformer
Engine norms mark their weights). Under sequence parallelism every TP rank normalises its own sequence slice with
the same replicated weight, so each rank's weight gradient is a partial sum over its tokens; marking the weight
``sequence_parallel`` makes Megatron's finalize_model_grads all-reduce it over the tensor-parallel group.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension (torch.nn.RMSNorm), built from a
    TransformerConfig as Megatron-Core's build_module calls it; the weight has the config's params_dtype."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
