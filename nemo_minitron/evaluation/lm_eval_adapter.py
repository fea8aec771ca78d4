"""Downstream tasks of EleutherAI's lm-evaluation-harness (lm_eval) on a Megatron-Core GPTModel of this package.

``MegatronLM`` answers lm_eval's three request types with a GPTModel at any tensor-parallel size (pipeline size
1): every tensor-parallel rank runs the same requests and computes the same numbers. The full-vocabulary
log-softmax and the argmax are computed vocab-parallel from the [b, s, V/TP] logit shards (all-reduces of
per-token maxima and sums, the top-1 candidates of each shard all-gathered), the vocabulary never gathered.
Tokenisation, empty contexts, truncation and rolling windows follow lm_eval's Hugging Face model (HFLM), so the
scores equal HFLM's on the same weights.

lm_eval is an optional dependency: ``pip install 'nemo-minitron[eval]'``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_minitron.distillation.losses import _log_softmax, _tp_group, vocab_parallel_top_k
from nemo_minitron.models.build import forward_logits, unwrap
from nemo_minitron.runtime.distributed import device, is_rank0

try:
    from lm_eval.api.model import TemplateLM
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"downstream task evaluation needs lm-evaluation-harness ({err}): pip install 'nemo-minitron[eval]'"
    ) from err


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets), whether each target is the argmax), [b, s] each, of the vocab-sharded logits [b, s, V/TP]
    (tensor-parallel rank r holding vocabulary entries [r V/TP, (r + 1) V/TP)); float32, equal on every rank."""
    group = _tp_group()
    shard = logits.shape[-1]
    log_probs = _log_softmax(logits.float(), group, "logits")
    local = targets - (dist.get_rank(group) * shard if group is not None else 0)
    owned = (local >= 0) & (local < shard)
    picked = log_probs.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(owned, picked, 0.0)
    if group is not None:
        dist.all_reduce(picked, group=group)
    _, argmax = vocab_parallel_top_k(logits, 1, group)
    return picked, argmax[..., 0] == targets


class MegatronLM(TemplateLM):
    """lm_eval model of a single-stage (PP=1) Megatron-Core GPTModel and its Hugging Face tokenizer.

    Args:
        model: the GPTModel (this rank's tensor shard; wrappers are fine), e.g. from build_gpt_model; it is put in
            eval mode.
        tokenizer: its Hugging Face tokenizer.
        batch_size: sequences per forward pass.
        max_length: the longest token window given to the model (default: its max_position_embeddings); longer
            inputs are truncated from the left.
    """

    max_gen_toks = 256  # generate_until's default, as HFLM

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        from megatron.core import parallel_state

        super().__init__()
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("MegatronLM needs pipeline_model_parallel_size=1, got "
                             f"{parallel_state.get_pipeline_model_parallel_world_size()}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or unwrap(model).max_sequence_length
        config = unwrap(model).config
        # sequence parallelism splits the sequence over the TP ranks: inputs are padded to a multiple of TP
        self._length_multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: BOS, else EOS (as HFLM)."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """token_logprobs of each sequence's tokens 1.. given the ones before, [b, s - 1] each: the sequences are
        right-padded (the causal mask keeps padding out of every real position)."""
        width = max(len(s) for s in sequences) - 1
        width += -width % self._length_multiple
        tokens = torch.zeros(len(sequences), width + 1, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
        tokens = tokens.to(device())
        return token_logprobs(forward_logits(self.model, tokens[:, :-1]), tokens[:, 1:])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """For each (key, context tokens, continuation tokens): (sum of log p(continuation | context), whether
        every continuation token is the argmax). Context + continuation are truncated from the left to
        max_length + 1 tokens; requests run longest first, batch_size at a time."""
        windows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length "
                                 f"{self.max_length}")
            windows.append((context + continuation)[-(self.max_length + 1):])
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(windows[i]))
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not is_rank0()) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                log_probs, greedy = self._logprobs([windows[i] for i in batch])
                for row, i in enumerate(batch):
                    end, n = len(windows[i]) - 1, len(requests[i][2])
                    results[i] = (log_probs[row, end - n:end].sum().item(), bool(greedy[row, end - n:end].all()))
                bar.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, its first token predicted from prefix_token_id: lm_eval's rolling
        windows, disjoint blocks of up to max_length predicted tokens, each after as much context as fits."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += log_prob
        return totals

    @torch.no_grad()
    def _next_tokens(self, sequences: list[list[int]]) -> list[int]:
        """The argmax next token of each sequence (batched, right-padded, the whole sequence re-run)."""
        width = max(len(s) for s in sequences)
        width += -width % self._length_multiple
        tokens = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
        logits = forward_logits(self.model, tokens.to(device()))
        last = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
        _, index = vocab_parallel_top_k(logits[torch.arange(len(sequences), device=logits.device), last], 1,
                                        _tp_group())
        return index[:, 0].tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, batch_size at a time, without a KV cache (every step re-runs
        the whole sequence). It ends at the end-of-text token, after max_gen_toks tokens (gen_kwargs, default
        256), or once the text holds one of the ``until`` strings, where it is cut. The context is truncated
        from the left to max_length - max_gen_toks tokens. Other generation options are ignored; sampling
        (do_sample: true) is refused."""
        results = []
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not is_rank0()) as bar:
            for start in range(0, len(requests), self.batch_size):
                rows = [self._generation(*request.args) for request in requests[start:start + self.batch_size]]
                active = list(rows)
                while active:
                    for row, token in zip(active, self._next_tokens([r["tokens"] for r in active])):
                        row["tokens"].append(token)
                        generated = row["tokens"][row["context_length"]:]
                        text = self.tokenizer.decode(generated, skip_special_tokens=True)
                        row["done"] = (token == self.eot_token_id or len(generated) >= row["max_gen_toks"]
                                       or any(stop in text for stop in row["until"]))
                    active = [row for row in active if not row["done"]]
                for row in rows:
                    text = self.tokenizer.decode(row["tokens"][row["context_length"]:], skip_special_tokens=True)
                    for stop in row["until"]:
                        text = text.split(stop)[0]
                    results.append(text)
                bar.update(len(rows))
        return results

    def _generation(self, context: str, gen_kwargs: dict) -> dict:
        """The state of one greedy generation: tokens (context, then generated), context_length, until,
        max_gen_toks."""
        if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0:
            raise ValueError(f"MegatronLM.generate_until decodes greedily; got generation kwargs {gen_kwargs}")
        until = gen_kwargs.get("until") or []
        until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
        max_gen_toks = gen_kwargs.get("max_gen_toks", self.max_gen_toks)
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a context in max_length "
                             f"{self.max_length}")
        tokens = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
        return {"tokens": tokens, "context_length": len(tokens), "until": until, "max_gen_toks": max_gen_toks,
                "done": False}


@functools.cache
def _task_manager(include_path: str | None):
    """lm_eval's index of its own task YAMLs and those under ``include_path`` (built once: it reads thousands of
    files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def evaluate_tasks(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
                   batch_size: int = 8, include_path: str | None = None, max_length: int | None = None
                   ) -> dict[str, dict[str, float]]:
    """lm_eval's ``simple_evaluate`` of ``model`` (a MegatronLM of it) on ``tasks``: {task: {metric: value}}, equal on
    every rank. Metric names drop lm_eval's default filter suffix (",none": "acc", "acc_stderr"); non-numeric
    entries are left out.

    Args:
        model, tokenizer, batch_size, max_length: see MegatronLM.
        tasks: lm_eval task or group names.
        num_fewshot: examples in each prompt (default: each task's own setting, else 0).
        limit: evaluate only the first ``limit`` documents of each task.
        include_path: a folder of extra task YAMLs (local tasks, e.g. on a machine without network access).
    """
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=MegatronLM(model, tokenizer, batch_size=batch_size, max_length=max_length),
                             tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                             task_manager=_task_manager(include_path), log_samples=False)
    # simple_evaluate returns the results on the process with LOCAL_RANK 0 only: global rank 0's go to all
    results = None if output is None else {
        task: {metric.removesuffix(",none"): float(value) for metric, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for task, metrics in output["results"].items()}
    if dist.is_initialized():
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results
