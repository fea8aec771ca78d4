"""FP8 distillation through Transformer Engine: runs only where TE and a GPU exist, skipped cleanly elsewhere."""

import pytest
import torch

from nemo_minitron.models.arch import ModelArch, check_transformer_impl, transformer_engine_available


def test_transformer_engine_request_fails_clearly_without_it():
    if transformer_engine_available():
        pytest.skip("Transformer Engine is available here")
    with pytest.raises(ValueError, match="transformer_impl='transformer_engine' needs Transformer Engine"):
        check_transformer_impl("transformer_engine", "delayed")
    with pytest.raises(ValueError, match="model.fp8 needs"):
        check_transformer_impl("local", "delayed")


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine and a CUDA GPU")
def test_fp8_distillation_tracks_bf16(single_process):
    """A short KD run with FP8 (delayed scaling) follows the bf16 run's loss curve within a few percent."""
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.distillation.losses import VocabParallelKDLoss
    from nemo_minitron.distillation.teacher import Teacher
    from nemo_minitron.distillation.trainer import TrainConfig, train
    from nemo_minitron.models.build import build_gpt_model

    arch = ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                     vocab_size=4096, kv_channels=32, max_position_embeddings=256)
    data = torch.randint(0, arch.vocab_size, (64, 129))
    curves = {}
    for fp8 in (None, "delayed"):
        torch.manual_seed(0)
        teacher = build_gpt_model(arch, transformer_impl="transformer_engine", fp8=fp8, params_dtype=torch.bfloat16)
        torch.manual_seed(1)
        student = build_gpt_model(arch.replace(num_layers=2), transformer_impl="transformer_engine", fp8=fp8,
                                  params_dtype=torch.bfloat16)
        cfg = TrainConfig(steps=8, micro_batch_size=4, global_batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=1)
        history = train(student, data, cfg, ForwardStep(Teacher(teacher), VocabParallelKDLoss()), progress=False)
        curves[fp8] = torch.tensor([h["loss"] for h in history])
    assert curves["delayed"][-1] < curves["delayed"][0]
    assert torch.allclose(curves["delayed"], curves[None], rtol=0.05)
