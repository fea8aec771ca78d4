import re

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.depth import block_losses, cached_block_losses, skip_layers
from nemo_minitron.importance.plots import plot_importance
from nemo_minitron.importance.compute import compute_importance
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.importance.width import BATCH_AGGS, WidthCollector
from nemo_minitron.models.build import build_gpt_model, causal_inputs, forward_logits
from nemo_minitron.pruning.plan import PruneTarget, make_plan
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed

AGGREGATIONS = [("mean", "l2"), ("l2", "mean"), ("var", "var")]


def _tokens(n: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n, seq_length + 1), generator=torch.Generator().manual_seed(seed))


def _model(arch, seed: int = 7):
    torch.manual_seed(seed)
    return build_gpt_model(arch).eval()


@torch.no_grad()
def _capture(model, calibration, micro_batch_size):
    """Raw activations of every site, float64, concatenated over micro-batches along the batch dim [s, N, c]."""
    stored = {"ffn": {}, "context": {}, "norm": {}, "layer_in": {}, "layer_out": {}}

    def keep(kind, key, x):
        stored[kind].setdefault(key, []).append(x.detach().double().clone())

    def keep_layer(module, args, kwargs, output, i):
        keep("layer_in", i, kwargs["hidden_states"])
        keep("layer_out", i, output[0])

    handles = []
    for i, layer in enumerate(model.decoder.layers):
        handles += [
            layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, a, i=i: keep("ffn", i, a[0])),
            layer.self_attention.linear_proj.register_forward_pre_hook(lambda m, a, i=i: keep("context", i, a[0])),
            layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: keep("norm", (i, 0), o)),
            layer.pre_mlp_layernorm.register_forward_hook(lambda m, a, o, i=i: keep("norm", (i, 1), o)),
            layer.register_forward_hook(lambda m, a, kw, o, i=i: keep_layer(m, a, kw, o, i), with_kwargs=True),
        ]
    for start in range(0, calibration.shape[0], micro_batch_size):
        forward_logits(model, calibration[start:start + micro_batch_size, :-1])
    for handle in handles:
        handle.remove()
    return {kind: {key: torch.cat(xs, dim=1) for key, xs in sites.items()} for kind, sites in stored.items()}


def _reference_width(acts, arch, seq_agg, batch_agg):
    """The DESIGN formulas evaluated on full activation tensors x[s, N, c] in float64."""
    seq = {"mean": lambda x: x.abs().mean(0), "l2": lambda x: x.square().sum(0).sqrt(),
           "var": lambda x: x.var(0, unbiased=False)}[seq_agg]
    batch = {"l2": lambda v: v.square().sum(0).sqrt(), "mean": lambda v: v.mean(0),
             "var": lambda v: v.var(0, unbiased=False)}[batch_agg]
    L, A, G, d = arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
    ffn = torch.stack([batch(seq(acts["ffn"][i])) for i in range(L)])
    channels = torch.stack([batch(seq(acts["context"][i])) for i in range(L)])
    heads = channels.reshape(L, A, d).square().sum(-1).sqrt()
    groups = heads.reshape(L, G, A // G).square().sum(-1).sqrt()
    hidden = sum(batch(seq(x)) for x in acts["norm"].values())
    return {"hidden": hidden, "ffn": ffn, "heads": heads, "groups": groups}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("seq_agg,batch_agg", AGGREGATIONS)
def test_width_scores_match_full_tensor_reference(tiny_arch, single_process, seq_agg, batch_agg):
    model = _model(tiny_arch)
    calibration = _tokens(6, 12, tiny_arch.vocab_size, seed=1)
    acts = _capture(model, calibration, micro_batch_size=2)
    assert len(acts["norm"]) == 2 * tiny_arch.num_layers
    scores = compute_importance(model, tiny_arch, calibration, seq_length=12, micro_batch_size=2, seq_agg=seq_agg,
                                batch_agg=batch_agg, depth_metrics=())
    for axis, expected in _reference_width(acts, tiny_arch, seq_agg, batch_agg).items():
        assert getattr(scores, axis).dtype == torch.float32
        _assert_close(getattr(scores, axis), expected, axis)
    if (seq_agg, batch_agg) == ("mean", "l2"):  # the paper's formula, literally: sqrt(sum_b (mean_s |X|)^2)
        x = acts["ffn"][1]
        _assert_close(scores.ffn[1], torch.sqrt(sum(x[:, b].abs().mean(0) ** 2 for b in range(x.shape[1]))), "A_c")
    assert scores.layers == {} and scores.meta["calibration_sequences"] == 6


def test_one_pass_serves_every_batch_agg(tiny_arch, single_process):
    model = _model(tiny_arch)
    calibration = _tokens(4, 12, tiny_arch.vocab_size, seed=9)
    acts = _capture(model, calibration, micro_batch_size=2)
    with WidthCollector(model, seq_agg="l2") as width:
        validation_loss(model, calibration, micro_batch_size=2)
    for batch_agg in BATCH_AGGS:
        for axis, expected in _reference_width(acts, tiny_arch, "l2", batch_agg).items():
            _assert_close(width.scores(batch_agg)[axis], expected, f"{batch_agg} {axis}")


def test_block_influence_and_calibration_loss(tiny_arch, single_process):
    model = _model(tiny_arch)
    calibration = _tokens(4, 12, tiny_arch.vocab_size, seed=2)
    acts = _capture(model, calibration, micro_batch_size=2)
    scores = compute_importance(model, tiny_arch, calibration, seq_length=12, micro_batch_size=2)
    for i in range(tiny_arch.num_layers):
        h_in, h_out = acts["layer_in"][i], acts["layer_out"][i]
        cos = (h_in * h_out).sum(-1) / (h_in.norm(dim=-1) * h_out.norm(dim=-1))
        _assert_close(scores.layers["block_influence"][i], 1 - cos.mean(), f"BI layer {i}", atol=1e-6)
    with torch.no_grad():
        logits = forward_logits(model, calibration[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, tiny_arch.vocab_size), calibration[:, 1:].reshape(-1))
    assert abs(scores.meta["calibration_loss"] - loss.item()) < 1e-5


@torch.no_grad()
def _manual_logits(model, tokens, kept_layers):
    """Embedding -> the listed layers, called one by one -> final norm -> output layer; [b, s, V]."""
    position_ids, mask = causal_inputs(tokens)
    hidden = model.embedding(input_ids=tokens, position_ids=position_ids)
    rotary = model.rotary_pos_emb(tokens.shape[1])
    for i in kept_layers:
        hidden, _ = model.decoder.layers[i](hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
    hidden = model.decoder.final_layernorm(hidden)
    logits, _ = model.output_layer(hidden, weight=model.shared_embedding_or_output_weight())
    return logits.transpose(0, 1)


def _manual_loss(model, sequences, kept_layers) -> float:
    logits = _manual_logits(model, sequences[:, :-1], kept_layers)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sequences[:, 1:].reshape(-1)).item()


def test_skip_layers_runs_only_the_kept_layers(tiny_arch, single_process):
    model = _model(tiny_arch)
    tokens = _tokens(2, 10, tiny_arch.vocab_size, seed=3)[:, :-1]
    with torch.no_grad():
        full = forward_logits(model, tokens)
    torch.testing.assert_close(full, _manual_logits(model, tokens, [0, 1]))
    original = model.decoder.layers
    with skip_layers(model, [1]), torch.no_grad():
        torch.testing.assert_close(forward_logits(model, tokens), _manual_logits(model, tokens, [0]))
    with skip_layers(model, [0, 1]), torch.no_grad():
        assert len(model.decoder.layers) == 0
        torch.testing.assert_close(forward_logits(model, tokens), _manual_logits(model, tokens, []))
    assert model.decoder.layers is original and model.decoder.num_layers_per_pipeline_rank == 2
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, tokens), full)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        with skip_layers(model, [2]):
            pass


def test_loss_drop_and_block_search_match_manual_forward(tiny_arch, single_process):
    arch = tiny_arch.replace(num_layers=3)
    model = _model(arch)
    calibration = _tokens(2, 12, arch.vocab_size, seed=4)
    validation = _tokens(4, 12, arch.vocab_size, seed=5)
    scores = compute_importance(model, arch, calibration, validation, seq_length=12, micro_batch_size=2,
                                depth_metrics=("block_influence", "lm_loss_drop"), block_sizes=(2, 3))
    baseline = _manual_loss(model, validation, [0, 1, 2])
    assert abs(scores.meta["validation_loss"] - baseline) < 1e-5
    without_one = [_manual_loss(model, validation, [j for j in range(3) if j != i]) for i in range(3)]
    _assert_close(scores.layers["lm_loss_drop"], torch.tensor(without_one) - baseline, "lm_loss_drop", atol=2e-5)
    without_two = [_manual_loss(model, validation, [2]), _manual_loss(model, validation, [0])]
    _assert_close(scores.blocks[2], torch.tensor(without_two), "blocks[2]", atol=2e-5)
    _assert_close(scores.blocks[3], torch.tensor([_manual_loss(model, validation, [])]), "blocks[3]", atol=2e-5)
    assert sorted(scores.blocks) == [2, 3] and set(scores.layers) == {"block_influence", "lm_loss_drop"}
    start = min(range(2), key=without_two.__getitem__)
    assert scores.best_block(2) == (start, pytest.approx(without_two[start], abs=2e-5))
    with pytest.raises(ValueError, match="searched block sizes: \\[2, 3\\]"):
        scores.best_block(1)


def test_cached_block_losses_equal_whole_model_passes(tiny_arch, single_process):
    arch = tiny_arch.replace(num_layers=4)
    model = _model(arch)
    validation = _tokens(4, 12, arch.vocab_size, seed=5)
    baseline, cached = cached_block_losses(model, validation, [1, 2, 3, 4], micro_batch_size=2)
    assert abs(baseline - validation_loss(model, validation, 2)) < 1e-6
    for k in (1, 2, 3, 4):
        _assert_close(cached[k], block_losses(model, validation, k, 2), f"blocks[{k}]", atol=1e-6)
    assert not any(h for layer in model.decoder.layers for h in layer._forward_pre_hooks.values())
    assert not model.embedding._forward_hooks and len(model.decoder.layers) == 4  # hooks and layers restored


def test_screening_measures_a_prefix_then_confirms_the_best_blocks(tiny_arch, single_process):
    arch = tiny_arch.replace(num_layers=4)
    model = _model(arch)
    calibration, validation = _tokens(2, 12, arch.vocab_size, seed=4), _tokens(4, 12, arch.vocab_size, seed=5)
    scores = compute_importance(model, arch, calibration, validation, seq_length=12, micro_batch_size=2,
                                depth_metrics=("lm_loss_drop",), block_sizes=(2,), screen_tokens=5, screen_keep=2)
    prefix = validation[:, :6]  # the first 5 inputs of every window and their labels
    screened = block_losses(model, prefix, 2, 2)
    _assert_close(scores.blocks[2], screened, "screened blocks[2]", atol=1e-6)
    _assert_close(scores.layers["lm_loss_drop"], block_losses(model, prefix, 1, 2) - validation_loss(model, prefix, 2),
                  "screened lm_loss_drop", atol=1e-6)
    assert abs(scores.meta["validation_loss"] - validation_loss(model, validation, 2)) < 1e-6  # all tokens
    assert scores.meta["screen_tokens"] == 5
    starts = torch.argsort(screened, stable=True)[:2].tolist()
    full = block_losses(model, validation, 2, 2)
    confirmed = scores.meta["block_confirmed"]["2"]
    assert sorted(map(int, confirmed)) == sorted(starts)
    for start in starts:
        assert abs(confirmed[str(start)] - full[start]) < 1e-6
    best = min(starts, key=lambda s: full[s].item())
    assert scores.best_block(2) == (best, pytest.approx(full[best].item(), abs=1e-6))
    # the plan follows the confirmed losses even where the screened ones disagree
    scores.meta["block_confirmed"]["2"] = {"0": 5.0, "2": 1.0}
    scores.blocks[2] = torch.tensor([0.0, 9.0, 9.0])
    plan = make_plan(arch, scores, PruneTarget(num_layers=2))
    assert plan.layers_keep == [0, 1]
    # without screening the blocks are the whole-window losses and no confirmation is stored
    exact = compute_importance(model, arch, calibration, validation, seq_length=12, micro_batch_size=2,
                               depth_metrics=(), block_sizes=(2,), screen_tokens=12)
    _assert_close(exact.blocks[2], full, "blocks[2]", atol=1e-6)
    assert "block_confirmed" not in exact.meta and exact.meta["screen_tokens"] is None


@pytest.mark.parametrize("changes,field", [
    (dict(seq_agg="max"), "seq_agg"),
    (dict(batch_agg="sum"), "batch_agg"),
    (dict(depth_metrics=("bi",)), "depth_metrics"),
    (dict(block_sizes=(0,)), "block_sizes"),
    (dict(block_sizes=(1,)), "validation"),
    (dict(depth_metrics=("lm_loss_drop",)), "validation"),
    (dict(micro_batch_size=3), "calibration"),
    (dict(seq_length=9), "rows have 9 tokens, but windows of seq_length=9 have 10"),  # plain rows [n, s]
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(screen_tokens=0), "screen_tokens"),
    (dict(screen_keep=0), "screen_keep"),
    (dict(arch_changes=dict(hidden_size=32)), "arch.hidden_size"),
])
def test_bad_options_raise_before_any_forward(tiny_arch, single_process, changes, field):
    model = _model(tiny_arch)

    def forbid(module, args):
        raise AssertionError("a forward pass ran before the options were validated")

    model.register_forward_pre_hook(forbid)
    changes = dict(changes)
    arch = tiny_arch.replace(**changes.pop("arch_changes", {}))
    with pytest.raises(ValueError, match=re.escape(field)):
        compute_importance(model, arch, _tokens(4, 8, tiny_arch.vocab_size, seed=6), **{"micro_batch_size": 2, "seq_length": 8,
                                                                                          **changes})


def test_missing_norm_fails_loudly(tiny_arch, single_process):
    from megatron.core.transformer.identity_op import IdentityOp

    model = _model(tiny_arch)
    model.decoder.layers[1].pre_mlp_layernorm = IdentityOp()
    with pytest.raises(RuntimeError, match="found 3 norm modules in 2 layers"):
        WidthCollector(model)


def test_plots_written(tmp_path):
    L, H = 3, 16
    scores = ImportanceScores(hidden=torch.rand(H) + 0.1, ffn=torch.rand(L, 24), heads=torch.rand(L, 4),
                              groups=torch.rand(L, 2), layers={"block_influence": torch.rand(L)},
                              blocks={1: torch.rand(L), 2: torch.rand(L - 1)})
    paths = plot_importance(scores, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["ffn.png", "groups.png", "heads.png", "hidden.png", "layers.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Multi-process: TP=2, PP=2 and DP=2 (each rank half the calibration data) reproduce the single-process scores.

def _load_full_state(model, full: dict) -> None:
    """Copy a full (TP=1, PP=1) state dict into this rank's TP shard / PP stage of the tiny model."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    offset = model.decoder.layers[0].layer_number - 1
    for name, local in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        key = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        weight = full[key] if key in full else full["embedding.word_embeddings.weight"]  # tied output layer
        if name.endswith("mlp.linear_fc1.weight"):  # [gate; up]: each rank holds its slice of both
            weight = torch.cat([half.chunk(tp)[tp_rank] for half in weight.chunk(2)])
        elif weight.shape[0] != local.shape[0]:  # column-parallel / vocab-parallel rows
            weight = weight.chunk(tp)[tp_rank]
        elif weight.shape != local.shape:  # row-parallel columns
            weight = weight.chunk(tp, dim=1)[tp_rank]
        local.copy_(weight)


DEPTH = dict(depth_metrics=("block_influence", "lm_loss_drop"), block_sizes=(1, 2), screen_tokens=6, screen_keep=2)


def _parallel_worker(rank, world_size, arch, state, calibration, validation, references):
    from megatron.core import parallel_state

    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        model = build_gpt_model(arch).eval()
        _load_full_state(model, state)
        shares = calibration.chunk(parallel_state.get_data_parallel_world_size())
        share = shares[parallel_state.get_data_parallel_rank()]
        held_out = validation.chunk(parallel_state.get_data_parallel_world_size())[
            parallel_state.get_data_parallel_rank()]
        for i, ((seq_agg, batch_agg), expected) in enumerate(references.items()):
            depth = DEPTH if i == 0 else {}  # depth metrics once per layout (PP=2: block_losses, else cached)
            scores = compute_importance(model, arch, share, held_out if depth else None, seq_length=12,
                                        micro_batch_size=2, seq_agg=seq_agg, batch_agg=batch_agg, **depth)
            where = f"TP={tp} PP={pp} rank {rank} {seq_agg}/{batch_agg}"
            for axis in ("hidden", "ffn", "heads", "groups"):
                _assert_close(getattr(scores, axis), getattr(expected, axis), f"{where} {axis}")
            for metric, values in expected.layers.items():
                _assert_close(scores.layers[metric], values, f"{where} {metric}")
            for k, values in expected.blocks.items():
                _assert_close(scores.blocks[k], values, f"{where} blocks[{k}]")
            if depth:
                assert scores.meta["block_confirmed"].keys() == expected.meta["block_confirmed"].keys(), where
                for k, confirmed in expected.meta["block_confirmed"].items():
                    assert scores.meta["block_confirmed"][k].keys() == confirmed.keys(), where
                    for start, loss in confirmed.items():
                        assert abs(scores.meta["block_confirmed"][k][start] - loss) < 1e-5, where
            assert abs(scores.meta["calibration_loss"] - expected.meta["calibration_loss"]) < 1e-5, where
            assert scores.meta["calibration_sequences"] == calibration.shape[0], where


def test_tp2_pp2_dp2_equal_single_process(tiny_arch, single_process):
    model = _model(tiny_arch)
    calibration = _tokens(8, 12, tiny_arch.vocab_size, seed=8)
    validation = _tokens(4, 12, tiny_arch.vocab_size, seed=9)
    references = {agg: compute_importance(model, tiny_arch, calibration, validation if i == 0 else None,
                                          seq_length=12, micro_batch_size=2, seq_agg=agg[0], batch_agg=agg[1],
                                          **(DEPTH if i == 0 else {}))
                  for i, agg in enumerate((("mean", "l2"), ("var", "var")))}
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    run_distributed(_parallel_worker, 2, tiny_arch, state, calibration, validation, references)


def test_non_finite_scores_are_refused_naming_each_score():
    ok = torch.ones(4)
    scores = ImportanceScores(hidden=ok, ffn=torch.tensor([[1.0, float("nan")]]), heads=ok[None],
                              groups=torch.full((1, 2), float("inf")), layers={"block_influence": ok})
    with pytest.raises(FloatingPointError, match=r"importance scores of teacher/ are non-finite \(ffn: 1 values, "
                                                 r"groups: 2 values\)"):
        scores.check_finite("teacher/")
    ImportanceScores(hidden=ok, ffn=ok[None], heads=ok[None], groups=ok[None]).check_finite("teacher/")
