import json

import pytest
import torch
import torch.distributed as dist

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.pruning.apply import apply_plan, check_shapes
from nemo_minitron.pruning.plan import PrunePlan, PruneTarget, make_plan, validate
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed

# 8 heads in 4 KV groups (2 heads per group), 3 layers.
GQA = ModelArch(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                vocab_size=128, kv_channels=8, max_position_embeddings=64)


def _scores(arch: ModelArch, seed: int = 0) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    return ImportanceScores(
        hidden=torch.rand(arch.hidden_size, generator=g), ffn=torch.rand(L, arch.ffn_hidden_size, generator=g),
        heads=torch.rand(L, arch.num_attention_heads, generator=g),
        groups=torch.rand(L, arch.num_query_groups, generator=g),
        layers={m: torch.rand(L, generator=g) for m in ("block_influence", "lm_loss_drop")},
        blocks={k: torch.rand(L - k + 1, generator=g) for k in range(1, L)},
    )


def _skewed_scores(arch: ModelArch) -> ImportanceScores:
    """Random scores whose top neurons and KV groups crowd into the first of two TP shards: neurons [0, 3F/8) and
    groups [0, G/2) score 1 higher than the rest."""
    scores = _scores(arch)
    scores.ffn[:, :3 * arch.ffn_hidden_size // 8] += 1
    scores.groups[:, :arch.num_query_groups // 2] += 1
    return scores


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _load(model, full: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy full (TP=1, all layers) weights into this rank's TP shard and pipeline stage of ``model``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name
            if name.startswith("decoder.layers."):
                i, rest = name[len("decoder.layers."):].split(".", 1)
                key = f"decoder.layers.{model.decoder.layers[int(i)].layer_number - 1}.{rest}"
            w = full[key]
            if getattr(p, "tensor_model_parallel", False):
                if ".linear_fc1." in name:  # [gate; up] -> [gate shard; up shard]
                    w = torch.cat([half.chunk(tp_size)[tp_rank] for half in w.chunk(2)])
                else:
                    w = w.chunk(tp_size, dim=p.partition_dim)[tp_rank]
            p.copy_(w)


def _slice(full: dict[str, torch.Tensor], arch: ModelArch, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The pruned model's weights cut from the full ones by viewing the fused layouts as [group, head, channel]."""
    h, H = plan.hidden_keep, arch.hidden_size
    G, m, d = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups, arch.kv_channels
    out = {k: full[k][:, h] for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in full}
    out["decoder.final_layernorm.weight"] = full["decoder.final_layernorm.weight"][h]
    for i, layer in enumerate(plan.layers_keep):
        src, dst = f"decoder.layers.{layer}.", f"decoder.layers.{i}."
        groups, heads = plan.groups_keep[layer], plan.heads_keep[layer] % m  # heads: index within their group

        def pick_heads(qkv):  # [G, m + 2, d, ...] -> [G' * (m' + 2) * d, ...]
            qkv = qkv[groups]
            q = torch.stack([qkv[j, heads[j]] for j in range(len(groups))])
            return torch.cat([q, qkv[:, m:]], dim=1).flatten(0, 2)

        out[dst + "self_attention.linear_qkv.weight"] = pick_heads(
            full[src + "self_attention.linear_qkv.weight"].view(G, m + 2, d, H))[:, h]
        if src + "self_attention.linear_qkv.bias" in full:
            out[dst + "self_attention.linear_qkv.bias"] = pick_heads(
                full[src + "self_attention.linear_qkv.bias"].view(G, m + 2, d))
        proj = full[src + "self_attention.linear_proj.weight"].view(H, G, m, d)[h][:, groups]
        out[dst + "self_attention.linear_proj.weight"] = torch.stack(
            [proj[:, j, heads[j]] for j in range(len(groups))], dim=1).reshape(len(h), -1)
        f = plan.ffn_keep[layer]
        gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate[f], up[f]])[:, h]
        out[dst + "mlp.linear_fc2.weight"] = full[src + "mlp.linear_fc2.weight"][h][:, f]
        for norm in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            out[dst + norm] = full[src + norm][h]
    return out


def test_keep_all_plan_is_identity(single_process):
    model = build_gpt_model(GQA)
    tokens = torch.randint(0, GQA.vocab_size, (2, 8))
    with torch.no_grad():
        before = forward_logits(model, tokens)
        plan = make_plan(GQA, _scores(GQA), PruneTarget())
        assert apply_plan(model, GQA, plan) == GQA
        assert torch.equal(forward_logits(model, tokens), before)


@pytest.mark.parametrize("target", [
    PruneTarget(num_attention_heads=4),                      # one of the two heads of every group
    PruneTarget(ffn_hidden_size=40),
    PruneTarget(num_query_groups=2, num_attention_heads=4),  # whole KV groups with their heads
], ids=["heads", "ffn", "groups"])
def test_pruning_equals_masking(target, single_process):
    """Dropping heads / neurons = zeroing their linear_proj / linear_fc2 columns in the unpruned model."""
    model = build_gpt_model(GQA)
    masked = build_gpt_model(GQA)
    _load(masked, _params(model))
    plan = make_plan(GQA, _scores(GQA), target)
    d = GQA.kv_channels
    with torch.no_grad():
        for layer, block in enumerate(masked.decoder.layers):
            kept_heads = set(plan.heads_keep[layer].flatten().tolist())
            for head in set(range(GQA.num_attention_heads)) - kept_heads:
                block.self_attention.linear_proj.weight[:, head * d:(head + 1) * d] = 0
            dropped = sorted(set(range(GQA.ffn_hidden_size)) - set(plan.ffn_keep[layer].tolist()))
            block.mlp.linear_fc2.weight[:, dropped] = 0
        apply_plan(model, GQA, plan)
        tokens = torch.randint(0, GQA.vocab_size, (2, 8))
        torch.testing.assert_close(forward_logits(model, tokens), forward_logits(masked, tokens), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == plan.arch.num_parameters()


@pytest.mark.parametrize("arch, target", [
    (GQA, PruneTarget(hidden_size=40)),
    (GQA.replace(tie_word_embeddings=False, add_qkv_bias=True),
     PruneTarget(hidden_size=48, ffn_hidden_size=48, num_attention_heads=2, num_query_groups=2, drop_layers=[1])),
], ids=["hidden", "all_axes_untied_bias"])
def test_pruned_model_equals_new_arch_with_sliced_weights(arch, target, single_process):
    """Pruned model = build_gpt_model(new arch) loaded with weights sliced from the full ones; then prune again."""
    model = build_gpt_model(arch)
    full = _params(model)
    plan = make_plan(arch, _scores(arch), target)
    new = apply_plan(model, arch, plan)
    reference = build_gpt_model(new)
    _load(reference, _slice(full, arch, plan))
    tokens = torch.randint(0, arch.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, tokens), forward_logits(reference, tokens), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) == new.num_parameters() < arch.num_parameters()

    again = PruneTarget(hidden_size=new.hidden_size - 8, ffn_hidden_size=new.ffn_hidden_size // 2,
                        num_layers=new.num_layers - 1, layer_metric="lm_loss_drop")
    newer = apply_plan(model, new, make_plan(new, _scores(new, seed=1), again))
    assert sum(p.numel() for p in model.parameters()) == newer.num_parameters()
    with torch.no_grad():
        assert torch.isfinite(forward_logits(model, tokens)).all()


def test_plan_keeps_the_global_top_units():
    scores = _skewed_scores(GQA)
    target = PruneTarget(hidden_size=40, ffn_hidden_size=36, num_attention_heads=2, num_query_groups=2)
    plan = make_plan(GQA, scores, target)

    def top(values, candidates, k):  # sorted() is stable: ties keep the lower index
        return sorted(sorted(candidates, key=lambda i: -values[i].item())[:k])

    assert plan.hidden_keep.tolist() == top(scores.hidden, range(64), 40)
    for layer in range(GQA.num_layers):
        assert plan.ffn_keep[layer].tolist() == top(scores.ffn[layer], range(96), 36) == list(range(36))
        groups = top(scores.groups[layer], range(4), 2)
        assert plan.groups_keep[layer].tolist() == groups == [0, 1]
        assert plan.heads_keep[layer].tolist() == [top(scores.heads[layer], (2 * g, 2 * g + 1), 1) for g in groups]

    scores.ffn[1], scores.groups[1], scores.heads[1] = 0.5, 0.5, 0.5
    tied = make_plan(GQA, scores, target)
    assert tied.ffn_keep[1].tolist() == list(range(36))
    assert tied.groups_keep[1].tolist() == [0, 1] and tied.heads_keep[1].tolist() == [[0], [2]]


def test_layer_choice_by_metric():
    arch = GQA.replace(num_layers=6)
    scores = _scores(arch)
    scores.blocks[3] = torch.tensor([3.0, 1.0, 2.0, 5.0])  # the block 1..3 is the cheapest to remove
    scores.layers["block_influence"] = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8, 0.7])
    scores.layers["lm_loss_drop"] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2, 0.3])
    keep = {metric: make_plan(arch, scores, PruneTarget(num_layers=3, layer_metric=metric)).layers_keep
            for metric in ("block_search", "block_influence", "lm_loss_drop")}
    assert keep == {"block_search": [0, 4, 5], "block_influence": [0, 4, 5], "lm_loss_drop": [1, 2, 3]}
    assert make_plan(arch, scores, PruneTarget(drop_layers=[5, 0])).layers_keep == [1, 2, 3, 4]


def test_plan_json_round_trip(tmp_path):
    plan = make_plan(GQA, _scores(GQA), PruneTarget(hidden_size=48, num_query_groups=2, num_attention_heads=4,
                                                    num_layers=2))
    plan.save(tmp_path / "plan.json")
    old_run = {**plan.to_dict(), "tp_size": 2}  # plans of older runs record the TP size they were balanced over
    for loaded in (PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))), PrunePlan.load(tmp_path / "plan.json"),
                   PrunePlan.from_dict(old_run)):
        assert loaded.to_dict() == plan.to_dict()
        assert torch.equal(loaded.heads_keep, plan.heads_keep) and loaded.arch == plan.arch


@pytest.mark.parametrize("target, match", [
    (PruneTarget(num_attention_heads=6), r"num_attention_heads \(6\) must be a multiple of num_query_groups"),
    (PruneTarget(num_query_groups=2), r"num_attention_heads \(8\) gives 4 heads per KV group"),
    (PruneTarget(hidden_size=128), r"prune.hidden_size must be an integer in \[1, 64\]"),
    (PruneTarget(ffn_hidden_size=0), r"prune.ffn_hidden_size"),
    (PruneTarget(num_layers=2, layer_metric="random"), r"prune.layer_metric: 'random' is not allowed"),
    (PruneTarget(drop_layers=[0, 3]), r"prune.drop_layers must hold layer indices in \[0, 2\]"),
    (PruneTarget(drop_layers=[1, 1]), r"prune.drop_layers must be unique"),
    (PruneTarget(num_layers=2, drop_layers=[1]), r"prune.drop_layers .* exclude each other"),
], ids=["heads_per_group", "heads_exceed_group", "above_source", "zero", "metric", "drop_range", "drop_unique",
        "drop_and_num"])
def test_validation_errors_name_the_field(target, match):
    with pytest.raises(ValueError, match=match):
        validate(GQA, target)
    with pytest.raises(ValueError, match=match):
        make_plan(GQA, _scores(GQA), target)


@pytest.mark.parametrize("target, tp_size, match", [
    (PruneTarget(ffn_hidden_size=90), 4, r"prune.ffn_hidden_size \(90\) must be divisible by the tensor-parallel"),
    (PruneTarget(num_query_groups=3, num_attention_heads=6), 2, r"prune.num_query_groups \(3\) must be divisible "
                                                                r"by the tensor-parallel size \(2\) or divide it"),
    (PruneTarget(num_query_groups=2, num_attention_heads=2), 4, r"prune.num_attention_heads \(2\) must be divisible"),
    (PruneTarget(), 3, r"arch.num_attention_heads \(8\) must be divisible by the tensor-parallel size \(3\)"),
], ids=["ffn", "groups", "heads", "source"])
def test_tensor_parallel_validation(target, tp_size, match):
    with pytest.raises(ValueError, match=match):
        validate(GQA, target, tp_size)


def test_fewer_kv_groups_than_tp_ranks_are_allowed():
    """Megatron-Core replicates a KV group over TP / G ranks when G divides TP."""
    validate(GQA, PruneTarget(num_query_groups=2, num_attention_heads=4), tp_size=4)
    validate(GQA.replace(num_query_groups=1), PruneTarget(ffn_hidden_size=48), tp_size=8)


def test_validation_checks_scores_against_the_model():
    scores = _scores(GQA)
    del scores.layers["lm_loss_drop"]
    with pytest.raises(ValueError, match=r"prune.layer_metric 'lm_loss_drop' is not in the scores"):
        make_plan(GQA, scores, PruneTarget(num_layers=2, layer_metric="lm_loss_drop"))
    with pytest.raises(ValueError, match=r"scores.ffn has shape \(4, 96\), expected \(3, 96\)"):
        make_plan(GQA, _scores(GQA.replace(num_layers=4)), PruneTarget(hidden_size=32))


def test_check_shapes_catches_config_without_pruned_weights(single_process):
    """The upstream failure: a config that records fewer heads while the weights keep them all."""
    model = build_gpt_model(GQA)
    check_shapes(model, GQA)
    model.config.num_attention_heads = 4
    with pytest.raises(AssertionError, match="self_attention"):
        check_shapes(model, GQA.replace(num_attention_heads=4))


# 4 layers so PP=2 has two per stage; untied embeddings and a QKV bias exercise every parameter kind.
DIST = GQA.replace(num_layers=4, tie_word_embeddings=False, add_qkv_bias=True)
DIST_TARGET = PruneTarget(hidden_size=48, ffn_hidden_size=48, num_attention_heads=2, num_query_groups=2, num_layers=3)
# One KV group, fewer than the TP ranks: Megatron-Core replicates it on both; then prune that model again.
ONE_GROUP = PruneTarget(hidden_size=56, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1)
ONE_GROUP_AGAIN = PruneTarget(hidden_size=40, ffn_hidden_size=32)


def _gather(model) -> dict[str, torch.Tensor]:
    """The full (TP=1 layout) parameters of a TP-sharded model: the inverse of ``_load``."""
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if getattr(p, "tensor_model_parallel", False):
            shards = [torch.empty_like(w) for _ in range(dist.get_world_size())]
            dist.all_gather(shards, w.contiguous())
            if ".linear_fc1." in name:  # [gate shard; up shard] per rank -> [gate; up]
                w = torch.cat([torch.cat([shard.chunk(2)[i] for shard in shards]) for i in range(2)])
            else:
                w = torch.cat(shards, dim=p.partition_dim)
        out[name] = w
    return out


def _tp2_then_pp2(rank, world_size, full, cases, bad_plan, tokens, sequences, loss):
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    for steps, reference, logits in cases:
        model, arch = build_gpt_model(DIST), DIST
        _load(model, full, rank, 2)
        for plan in steps:  # each plan prunes the previous one's result
            arch = apply_plan(model, arch, PrunePlan.from_dict(plan))
        pruned = _gather(model)
        assert pruned.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(pruned[name], value), name
        with torch.no_grad():
            local = forward_logits(model, tokens)
        shards = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(shards, local)
        torch.testing.assert_close(torch.cat(shards, dim=-1), logits, rtol=0, atol=1e-5)
    model = build_gpt_model(DIST)
    with pytest.raises(ValueError, match=r"plan.arch.ffn_hidden_size \(47\) must be divisible by the tensor-parallel"):
        apply_plan(model, DIST, PrunePlan.from_dict(bad_plan))

    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    model = build_gpt_model(DIST)
    _load(model, full)
    apply_plan(model, DIST, PrunePlan.from_dict(cases[0][0][0]))
    # source layer 1 is dropped: stage 0 keeps one layer, stage 1 two
    assert [layer.layer_number for layer in model.decoder.layers] == ([1], [2, 3])[rank]
    assert abs(validation_loss(model, sequences, micro_batch_size=2) - loss) < 1e-5


def test_tp2_and_pp2_pruning_equal_tp1_pruning(single_process):
    """The kept units crowd into the first TP shard (_skewed_scores); pruning at TP=2 must still give the TP=1
    student: the same full weights (= the plain slicing reference) and logits, also with one replicated KV group."""
    scores = _skewed_scores(DIST)
    scores.blocks[1] = torch.tensor([5.0, 0.0, 5.0, 5.0])
    plan = make_plan(DIST, scores, DIST_TARGET)
    assert plan.layers_keep == [0, 2, 3]
    assert all(len([n for n in plan.ffn_keep[i].tolist() if n < 48]) >= 36 for i in range(4))  # uneven over 2 shards
    tokens = torch.randint(0, DIST.vocab_size, (2, 8))
    sequences = torch.randint(0, DIST.vocab_size, (4, 9))
    model = build_gpt_model(DIST)
    full = _params(model)
    apply_plan(model, DIST, plan)
    pruned, reference = _params(model), _slice(full, DIST, plan)
    assert pruned.keys() == reference.keys() and all(torch.equal(pruned[k], v) for k, v in reference.items())
    loss = validation_loss(model, sequences, micro_batch_size=2)
    with torch.no_grad():
        cases = [([plan.to_dict()], pruned, forward_logits(model, tokens))]

    one_group = make_plan(DIST, scores, ONE_GROUP)
    again = make_plan(one_group.arch, _scores(one_group.arch, seed=1), ONE_GROUP_AGAIN)
    model = build_gpt_model(DIST)
    _load(model, full)
    apply_plan(model, DIST, one_group)
    apply_plan(model, one_group.arch, again)
    with torch.no_grad():
        cases.append(([one_group.to_dict(), again.to_dict()], _params(model), forward_logits(model, tokens)))
    bad_plan = make_plan(DIST, scores, PruneTarget(ffn_hidden_size=47)).to_dict()
    run_distributed(_tp2_then_pp2, 2, full, cases, bad_plan, tokens, sequences, loss)
