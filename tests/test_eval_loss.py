import torch
import torch.nn.functional as F

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.models.build import build_gpt_model, forward_logits


def test_validation_loss_equals_plain_cross_entropy(tiny_arch, single_process):
    model = build_gpt_model(tiny_arch)
    seqs = torch.randint(0, tiny_arch.vocab_size, (4, 9))
    with torch.no_grad():
        logits = forward_logits(model, seqs[:, :-1])
    reference = F.cross_entropy(logits.reshape(-1, tiny_arch.vocab_size), seqs[:, 1:].reshape(-1)).item()
    assert abs(validation_loss(model, seqs, micro_batch_size=2) - reference) < 1e-5
