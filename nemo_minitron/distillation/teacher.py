"""The frozen teacher of a distillation run: live logits, or its top-K log-probs cached once on disk.

``Teacher`` and ``CachedTeacher`` share one method, ``targets(tokens)``, whose result is the second argument of the
matching loss: vocab-sharded logits for ``VocabParallelKDLoss``, (log-probs, indices) for ``CachedTopKKLLoss``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.distillation.losses import _AllReduceSum, _log_softmax, _tp_group, vocab_parallel_top_k
from nemo_minitron.models.build import forward_logits
from nemo_minitron.runtime.distributed import device, is_rank0


class Teacher:
    """A frozen model (eval mode, requires_grad False) run under no_grad.

    A plain object, not an nn.Module: it never becomes a submodule of the student, so it stays out of the
    student's parameters, optimizer and checkpoints.
    """

    def __init__(self, model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-sharded logits [b, s, V/TP] of tokens [b, s] (PP=1, or the last pipeline stage once its input
        hidden states are set with ``model.set_input_tensor``)."""
        return forward_logits(self.model, tokens)

    targets = logits

    @torch.no_grad()
    def top_k_log_probs(self, tokens: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k full-vocabulary log-probs per token and their global vocabulary indices, [b, s, top_k] each.

        The full-vocabulary log_softmax of the vocab-sharded logits, then ``vocab_parallel_top_k`` of it (under TP
        only top_k candidates per rank are gathered, never the vocabulary).
        """
        logits = self.logits(tokens).float()
        group = _tp_group()
        return vocab_parallel_top_k(_log_softmax(logits, group, "teacher_logits"), top_k, group)


def sequence_keys(tokens: torch.Tensor) -> list[int]:
    """One 63-bit key per row of tokens [n, s]: blake2b of the row's int64 token ids."""
    rows = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") >> 1 for row in rows]


def write_teacher_cache(teacher: Teacher, sequences: torch.Tensor, path: str | Path, *, top_k: int,
                        micro_batch_size: int = 4) -> Path:
    """Run the teacher once over packed sequences [n, s + 1] and save, per sequence, the top_k log-probs of every
    input position (tokens = sequence[:-1]) to a safetensors file: keys [n] int64 (``sequence_keys`` of the tokens),
    log_probs [n, s, top_k] float32, indices [n, s, top_k] int64; repeated rows are stored once. Collective: every
    rank computes all sequences, global rank 0 writes (under a temporary name, then renamed into place).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    tokens = sequences[:, :-1]
    keys = sequence_keys(tokens)
    first = sorted({key: i for i, key in reversed(list(enumerate(keys)))}.values())  # equal rows: equal targets
    tokens, keys = tokens[first], [keys[i] for i in first]
    log_probs, indices = [], []
    starts = range(0, tokens.shape[0], micro_batch_size)
    for start in tqdm(starts, desc=f"teacher top-{top_k} cache", unit="batch", disable=not is_rank0()):
        values, index = teacher.top_k_log_probs(tokens[start:start + micro_batch_size].to(device()), top_k)
        log_probs.append(values.cpu())
        indices.append(index.cpu())
    path = Path(path)
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({"keys": torch.tensor(keys, dtype=torch.int64), "log_probs": torch.cat(log_probs).contiguous(),
                   "indices": torch.cat(indices).contiguous()}, str(partial))
        os.replace(partial, path)  # readers never see a half-written cache
    if dist.is_initialized():
        dist.barrier()
    return path


def cached_teacher(teacher_dir: str | Path, sequences: torch.Tensor, top_k: int, load_model,
                   micro_batch_size: int = 4) -> "CachedTeacher":
    """The CachedTeacher of the checkpoint ``teacher_dir`` over ``sequences`` [n, s + 1], content-addressed in the
    cache folder: teacher_cache/<blake2b(teacher fingerprint, top_k, sequences)>.safetensors. Written on first use
    (``load_model()`` builds the live teacher only then), reused afterwards. Collective."""
    from nemo_minitron.models.checkpoint import fingerprint
    from nemo_minitron.runtime.cache import cache_path

    sequences = torch.as_tensor(sequences, dtype=torch.int64).contiguous()
    key = hashlib.blake2b(digest_size=16)
    key.update(f"{fingerprint(teacher_dir)} top_k={top_k} {tuple(sequences.shape)}".encode())
    key.update(sequences.numpy().tobytes())
    path = cache_path("teacher_cache", f"{key.hexdigest()}.safetensors")
    exists = path.is_file()
    if dist.is_initialized():
        dist.barrier()  # every rank decides before any rank writes
    if not exists:
        write_teacher_cache(Teacher(load_model()), sequences, path, top_k=top_k, micro_batch_size=micro_batch_size)
    return CachedTeacher(path)


class CachedTeacher:
    """The teacher's cached top-K log-probs (``write_teacher_cache``), looked up by the tokens of each sequence, so
    any data order or shuffling works."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        data = load_file(str(path))
        self.log_probs, self.indices = data["log_probs"], data["indices"]
        self.top_k = self.log_probs.shape[-1]
        self.row = {int(key): i for i, key in enumerate(data["keys"].tolist())}

    def targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs, indices) [b, s, top_k] of tokens [b, s], on the tokens' device."""
        rows = []
        for key in sequence_keys(tokens):
            if key not in self.row:
                raise KeyError("a training sequence is not in the teacher cache; write the cache from the same "
                               "sequences")
            rows.append(self.row[key])
        rows = torch.tensor(rows)
        if self.log_probs.shape[1] != tokens.shape[1]:
            raise ValueError(f"cached sequence length {self.log_probs.shape[1]} != tokens length {tokens.shape[1]}")
        return self.log_probs[rows].to(tokens.device), self.indices[rows].to(tokens.device)


class CachedTopKKLLoss(torch.nn.Module):
    """Top-K forward KL against cached teacher log-probs, vocab-parallel.

    Per token, with K the cached indices, q = softmax(log_probs / T) over K (the teacher renormalised over its top
    K) and log p_S the full-vocabulary log-softmax of student / T:
        loss = sum_{v in K} q(v) (log q(v) - log p_S(v))
    Each TP rank sums the terms of the indices in its vocabulary shard; the sum over the TP group is the loss.
    Equals VocabParallelKDLoss("topk_forward_kl", top_k=K) on the live teacher.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor],
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token loss [b, s] (float32) of student_logits [b, s, V/TP] against targets = (log_probs, indices)
        [b, s, K]; tokens with loss_mask 0 get loss 0."""
        log_probs, indices = targets
        group = _tp_group()
        shard = student_logits.shape[-1]
        logp_s = _log_softmax(student_logits.float() / self.temperature, group, "student_logits")
        log_q = (log_probs.float() / self.temperature).log_softmax(dim=-1)
        local = indices - (dist.get_rank(group) * shard if group is not None else 0)
        owned = (local >= 0) & (local < shard)
        logp_s_at = logp_s.gather(-1, local.clamp(0, shard - 1))
        loss = torch.where(owned, log_q.exp() * (log_q - logp_s_at), 0.0).sum(dim=-1)
        if group is not None:
            loss = _AllReduceSum.apply(loss, group, False)
        return loss if loss_mask is None else torch.where(loss_mask.bool(), loss, 0.0)
