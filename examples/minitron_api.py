"""The Minitron recipe from Python, without the CLI or YAML: score -> prune -> distill -> evaluate.

Runs on a tiny random Llama and random tokens so it finishes in seconds on a CPU; swap in your own
Megatron-Core model (models.hf_convert.load_hf_checkpoint + load_hf_state_dict) and packed text
(data.splits.write_splits, then load_split) for real work. Under torchrun every rank runs this same script.

    python examples/minitron_api.py
"""

import torch

from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import Teacher
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.compute import compute_importance
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import PruneTarget, make_plan
from nemo_minitron.runtime.distributed import ParallelConfig, destroy_distributed, init_distributed


def main():
    init_distributed(ParallelConfig(tensor_model_parallel_size=1))
    arch = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256, kv_channels=16, max_position_embeddings=64)
    teacher = build_gpt_model(arch)
    data = torch.randint(0, arch.vocab_size, (48, 33), generator=torch.Generator().manual_seed(0))
    calibration, validation, train_split = data[:8], data[8:16], data[16:]

    # 1. Importance of every width axis and of layers, from forward passes only.
    scores = compute_importance(teacher, arch, calibration, validation, seq_length=32,
                                depth_metrics=("block_influence",), block_sizes=(2,))
    # 2. Prune a copy of the teacher: half the hidden channels and MLP neurons, one head per KV group.
    student = build_gpt_model(arch)
    student.load_state_dict(teacher.state_dict())
    target = PruneTarget(hidden_size=32, ffn_hidden_size=64, num_attention_heads=2)
    student_arch = apply_plan(student, arch, make_plan(arch, scores, target))
    # 3. Distil: forward KL on logits (vocab-parallel), Megatron-Core DDP + optimizer + cosine schedule.
    cfg = TrainConfig(steps=10, micro_batch_size=4, global_batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=1)
    before = validation_loss(student, validation)
    history = train(student, train_split, cfg, ForwardStep(Teacher(teacher), VocabParallelKDLoss("forward_kl")),
                    progress=False)
    # 4. Evaluate.
    print(f"student {student_arch.num_parameters():,} params (teacher {arch.num_parameters():,})")
    print(f"KD loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; "
          f"student validation loss {before:.4f} -> {validation_loss(student, validation):.4f}")
    destroy_distributed()


if __name__ == "__main__":
    main()
