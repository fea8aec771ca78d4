"""Importance scoring under sequence parallelism: TP=2 with sequence_parallel=True gives the TP=1 scores."""

import pytest

from nemo_minitron.importance.compute import compute_importance
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_importance import _assert_close, _load_full_state, _model, _tokens

# seq var / batch var and seq l2 break if the ranks' partial sums went through the nonlinear steps before the
# TP reduction; the default (mean / l2) is what the pipeline uses.
AGGREGATIONS = [("mean", "l2"), ("var", "var"), ("l2", "mean")]
SEQ_LENGTH = 12
DEPTH = dict(depth_metrics=("block_influence", "lm_loss_drop"), block_sizes=(2,))


def _sp_worker(rank, world_size, arch, state, calibration, validation, references):
    init_distributed(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    model = build_gpt_model(arch, sequence_parallel=True).eval()
    _load_full_state(model, state)
    with pytest.raises(ValueError, match="calibration: seq_length=11 must be a multiple of tensor_model_parallel"):
        compute_importance(model, arch, calibration[:, 1:], seq_length=11, micro_batch_size=2)  # before any forward
    norm_rows = []  # the hooked norm outputs must really be sequence-sharded
    model.decoder.layers[0].input_layernorm.register_forward_hook(lambda m, a, o: norm_rows.append(o.shape[0]))
    for (seq_agg, batch_agg), expected in references.items():
        scores = compute_importance(model, arch, calibration, validation, seq_length=SEQ_LENGTH, micro_batch_size=2,
                                    seq_agg=seq_agg,
                                    batch_agg=batch_agg, **DEPTH)
        where = f"TP=2 SP rank {rank} {seq_agg}/{batch_agg}"
        for axis in ("hidden", "ffn", "heads", "groups"):
            _assert_close(getattr(scores, axis), getattr(expected, axis), f"{where} {axis}")
        assert scores.layers.keys() == expected.layers.keys() and scores.blocks.keys() == expected.blocks.keys()
        for metric, values in expected.layers.items():
            _assert_close(scores.layers[metric], values, f"{where} {metric}", atol=2e-5)
        _assert_close(scores.blocks[2], expected.blocks[2], f"{where} blocks[2]", atol=2e-5)
        for key in ("calibration_loss", "validation_loss"):
            assert abs(scores.meta[key] - expected.meta[key]) < 1e-5, f"{where} {key}"
    assert norm_rows and set(norm_rows) == {SEQ_LENGTH // 2}


def test_sequence_parallel_tp2_equals_tp1(tiny_arch, single_process):
    arch = tiny_arch.replace(num_layers=3)
    model = _model(arch)
    calibration = _tokens(4, SEQ_LENGTH, arch.vocab_size, seed=11)
    validation = _tokens(2, SEQ_LENGTH, arch.vocab_size, seed=12)
    references = {agg: compute_importance(model, arch, calibration, validation, seq_length=SEQ_LENGTH, micro_batch_size=2,
                                          seq_agg=agg[0],
                                          batch_agg=agg[1], **DEPTH) for agg in AGGREGATIONS}
    # batch var well above the comparison's atol, so the var/var check is sharp
    assert references[("var", "var")].hidden.min() > 1e-6
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    run_distributed(_sp_worker, 2, arch, state, calibration, validation, references)
