import pytest
import torch

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.models.checkpoint import load_checkpoint, save_checkpoint
from nemo_minitron.models.hf_convert import gather_hf_state_dict
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed


def _logits(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(forward_logits(model, tokens))


def _assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _save_tp2_load_tp1_and_pp2(rank, world_size, arch, directory):
    """Save at TP=2; load at TP=1 (same weights, same logits) and at PP=2 (same weights, same loss)."""
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    sequences = torch.randint(0, arch.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    model = build_gpt_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights, logits = gather_hf_state_dict(model, arch), _logits(model, tokens)
    loss = validation_loss(model, sequences, micro_batch_size=1)
    save_checkpoint(model, arch, directory)

    init_distributed(ParallelConfig())  # TP=1, two data-parallel replicas
    model, loaded_arch = load_checkpoint(directory)
    assert loaded_arch == arch
    _assert_same_tensors(gather_hf_state_dict(model, arch), weights)
    assert (_logits(model, tokens) - logits).abs().max() < 1e-5

    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))  # includes the tied output layer's copy
    model, _ = load_checkpoint(directory)
    _assert_same_tensors(gather_hf_state_dict(model, arch), weights)
    assert abs(validation_loss(model, sequences, micro_batch_size=1) - loss) < 1e-5


def _tied_and_untied(rank, world_size, arch, directory):
    for tied in (True, False):
        _save_tp2_load_tp1_and_pp2(rank, world_size, arch.replace(tie_word_embeddings=tied), f"{directory}/{tied}")


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(tiny_arch, tmp_path):
    run_distributed(_tied_and_untied, 2, tiny_arch, str(tmp_path))


def test_load_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="arch.json"):
        load_checkpoint(tmp_path)


def test_manifest_records_every_file_and_fingerprint_names_the_content(tiny_arch, single_process, tmp_path):
    import hashlib
    import json

    from nemo_minitron.models.checkpoint import MANIFEST_FILE, fingerprint

    model = build_gpt_model(tiny_arch)
    save_checkpoint(model, tiny_arch, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.name for p in (tmp_path / "a").iterdir()} - {MANIFEST_FILE}
    assert set(manifest) == on_disk and {"arch.json", "metadata.json", "common.pt"} <= on_disk
    for name, entry in manifest.items():
        data = (tmp_path / "a" / name).read_bytes()
        assert entry == {"size": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}, name
    # same weights saved elsewhere: same fingerprint; without the manifest it is computed, to the same value
    save_checkpoint(model, tiny_arch, tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    (tmp_path / "b" / MANIFEST_FILE).unlink()
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_checkpoint(model, tiny_arch, tmp_path / "c")
    assert fingerprint(tmp_path / "c") != fingerprint(tmp_path / "a")


class _Exploit:
    """Unpickling it would call os.system: what a crafted checkpoint's .metadata can hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_is_refused_without_running_it(tiny_arch, single_process, tmp_path, monkeypatch):
    import pickle

    from nemo_minitron.models.checkpoint import TRUST_ENV

    model = build_gpt_model(tiny_arch)
    save_checkpoint(model, tiny_arch, tmp_path / "ok")
    loaded, _ = load_checkpoint(tmp_path / "ok")  # real metadata passes the restricted unpickler
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    marker = tmp_path / "code_ran"
    metadata = tmp_path / "ok" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ValueError, match=".metadata has"):  # the manifest written at save time no longer matches
        load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").unlink()  # a checkpoint from elsewhere, without one
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(tmp_path / "ok")
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")  # trusted: the plain pickle runs it (and the load then fails)
    with pytest.raises(BaseException):  # torch's CheckpointException is a BaseException
        load_checkpoint(tmp_path / "ok")
    assert marker.exists()


def test_truncated_checkpoint_file_is_named_before_loading(tiny_arch, single_process, tmp_path):
    save_checkpoint(build_gpt_model(tiny_arch), tiny_arch, tmp_path / "ck")
    shard = sorted((tmp_path / "ck").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard.name} has 100 bytes"):
        load_checkpoint(tmp_path / "ck")
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is missing"):
        load_checkpoint(tmp_path / "ck")


def test_checkpoint_without_manifest_missing_common_file_or_with_a_non_finite_weight(tiny_arch, single_process,
                                                                                     tmp_path):
    model = build_gpt_model(tiny_arch)
    save_checkpoint(model, tiny_arch, tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").unlink()  # as a copy that lost it would be
    (tmp_path / "ck" / "common.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint .*ck is incomplete: common.pt is missing or empty"):
        load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        model.decoder.layers[1].self_attention.linear_proj.weight[2, :3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"not saving .*bad: weight decoder.layers.1.self_attention."
                                                 r"linear_proj.weight holds 3 non-finite values \(of 4096\)"):
        save_checkpoint(model, tiny_arch, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
