"""The lm-evaluation-harness adapter (evaluation/lm_eval_adapter.py) on the tiny Llama of tiny_hf_run_inputs, against
the same weights as a Hugging Face model: log-probs computed directly, HF greedy generation, lm_eval's own HFLM on
a local task; and at TP=2 (sequence parallel) against the same references."""

import sys

import pytest
import torch
from lm_eval.api.instance import Instance

from nemo_minitron.evaluation.lm_eval_adapter import MegatronLM, evaluate_tasks
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.models.hf_convert import load_hf_checkpoint, load_hf_state_dict
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed

MAX_LENGTH = 128  # the tiny Llama's max_position_embeddings
LONG = "Now is the winter of our discontent made glorious summer by this sun of York; " * 4  # > MAX_LENGTH chars
# (context, continuation): multi-token continuations, an empty context (the EOS token stands in), a trailing space
# (lm_eval moves it into the continuation), a context truncated from the left; the last one is completed below
# with the HF model's greedy next characters (is_greedy true).
LOGLIKELIHOOD = [("Question: Who loved Juliet?\nAnswer:", " Romeo"), ("", "To be, or not to be"),
                 ("All the world's a ", "stage"), (LONG, " and all the clouds"), ("Who killed Duncan?", None)]
ROLLING = ["The course of true love never did run smooth.", LONG]  # the second needs 3 windows
# (context, gen_kwargs): the first is cut at a character of the greedy text (set below), the second runs to
# max_gen_toks.
GENERATE = [("Question: Where did Prospero live?\nAnswer:", {"until": None, "max_gen_toks": 12}),
            ("O Romeo, Romeo", {"until": ["@@"], "max_gen_toks": 8})]


def _instances(request_type, args):
    return [Instance(request_type=request_type, doc={}, arguments=a, idx=0) for a in args]


def _megatron(directory):
    """This rank's Megatron-Core model of the HF checkpoint ``directory`` (TP=2 with sequence parallelism)."""
    from megatron.core import parallel_state

    arch, state = load_hf_checkpoint(directory)
    model = build_gpt_model(arch, sequence_parallel=parallel_state.get_tensor_model_parallel_world_size() > 1)
    load_hf_state_dict(model, state, arch)
    return model


def _greedy(hf, tokenizer, context, max_new_tokens):
    """The tokens of HF generate(do_sample=False) from ``context`` (it stops at the tokenizer's EOS)."""
    tokens = torch.tensor([tokenizer.encode(context)])
    with torch.no_grad():
        out = hf.generate(tokens, do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return out[0, tokens.shape[1]:].tolist()


def _sum_logprob(hf, tokens, n):
    """(sum of log p of the last n of ``tokens`` given those before, whether each is the argmax), from hf."""
    with torch.no_grad():
        log_probs = hf(torch.tensor([tokens[:-1]])).logits[0, -n:].log_softmax(-1)
    targets = torch.tensor(tokens[-n:])
    return log_probs.gather(-1, targets[:, None]).sum().item(), bool((log_probs.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def reference(tiny_hf_run_inputs):
    """The requests and the HF model's answers: {name: (requests, expected)} per request type."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_hf_run_inputs / "model"
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # (the character tokenizer has no decoder: decode() puts spaces between tokens, joining them does not)
    greedy = "".join(tokenizer.convert_ids_to_tokens(_greedy(hf, tokenizer, LOGLIKELIHOOD[-1][0], 2)))
    requests = LOGLIKELIHOOD[:-1] + [(LOGLIKELIHOOD[-1][0], greedy)]
    loglikelihood = []
    for context, continuation in requests:
        if context:  # continuation tokens: all after the context's tokens without its trailing spaces
            tokens = tokenizer.encode(context + continuation)
            n = len(tokens) - len(tokenizer.encode(context.rstrip()))
        else:
            tokens = [tokenizer.eos_token_id] + tokenizer.encode(continuation)
            n = len(tokens) - 1
        loglikelihood.append(_sum_logprob(hf, tokens[-(MAX_LENGTH + 1):], n))
    assert {greedy for _, greedy in loglikelihood} == {True, False}
    rolling = [_sum_logprob(hf, [tokenizer.eos_token_id] + tokenizer.encode(ROLLING[0]), len(ROLLING[0]))[0]]
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=2, max_length=MAX_LENGTH)
    rolling += hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(ROLLING[1],)]), disable_tqdm=True)
    first = tokenizer.decode(_greedy(hf, tokenizer, GENERATE[0][0], 12), skip_special_tokens=True)
    stop = next(c for c in first[5:] if not c.isspace())  # cut at its first occurrence
    generate = [(GENERATE[0][0], {"until": [stop], "max_gen_toks": 12}), GENERATE[1]]
    generated = [first.split(stop)[0],
                 tokenizer.decode(_greedy(hf, tokenizer, GENERATE[1][0], 8), skip_special_tokens=True)]
    return {"loglikelihood": (requests, loglikelihood), "loglikelihood_rolling": ([(t,) for t in ROLLING], rolling),
            "generate_until": (generate, generated), "hf": hf, "tokenizer": tokenizer, "directory": directory}


def _answers(lm, reference, request_type):
    requests, _ = reference[request_type]
    return getattr(lm, request_type)(_instances(request_type, requests), disable_tqdm=True)


def _check(lm, reference):
    """The adapter's answers to every reference request equal the HF model's."""
    answers = _answers(lm, reference, "loglikelihood")
    for (log_prob, greedy), (expected, expected_greedy) in zip(answers, reference["loglikelihood"][1], strict=True):
        assert log_prob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    answers = _answers(lm, reference, "loglikelihood_rolling")
    assert answers == pytest.approx(reference["loglikelihood_rolling"][1], abs=1e-4)
    assert _answers(lm, reference, "generate_until") == reference["generate_until"][1]


def test_requests_match_the_hf_model(reference, single_process):
    model = _megatron(reference["directory"])
    _check(MegatronLM(model, reference["tokenizer"], batch_size=2), reference)


def test_task_scores_match_lm_eval_hflm(reference, tiny_task_path, single_process):
    """evaluate_tasks on the local multiple-choice task scores exactly like lm_eval's HFLM on the HF model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    scores = evaluate_tasks(_megatron(reference["directory"]), reference["tokenizer"], ["tiny_mc"], batch_size=4,
                            include_path=str(tiny_task_path))
    hflm = HFLM(pretrained=reference["hf"], tokenizer=reference["tokenizer"], batch_size=4)
    expected = simple_evaluate(model=hflm, tasks=["tiny_mc"], log_samples=False, task_manager=TaskManager(
        include_path=str(tiny_task_path), include_defaults=False))["results"]["tiny_mc"]
    assert scores["tiny_mc"]["sample_len"] == 12
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert scores["tiny_mc"][metric] == expected[f"{metric},none"], metric
    assert scores["tiny_mc"]["acc"] != scores["tiny_mc"]["acc_norm"]  # length normalisation changed some answers


def _tp2_checks(rank, world_size, reference, task_path, expected_scores):
    from transformers import AutoTokenizer

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    model = _megatron(reference["directory"])
    tokenizer = AutoTokenizer.from_pretrained(reference["directory"])
    _check(MegatronLM(model, tokenizer, batch_size=3), reference)
    assert evaluate_tasks(model, tokenizer, ["tiny_mc"], include_path=task_path) == expected_scores
    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        MegatronLM(_megatron(reference["directory"]), tokenizer)


def test_tp2_matches_the_hf_model(reference, tiny_task_path, single_process):
    """TP=2 with sequence parallelism (inputs padded to even lengths) answers like the HF model, and both ranks
    return the TP=1 task scores (lm_eval returns them on LOCAL_RANK 0 only); PP=2 is refused."""
    expected_scores = evaluate_tasks(_megatron(reference["directory"]), reference["tokenizer"], ["tiny_mc"],
                                     include_path=str(tiny_task_path))
    picklable = {k: v for k, v in reference.items() if k not in ("hf", "tokenizer")}
    run_distributed(_tp2_checks, 2, picklable, str(tiny_task_path), expected_scores)


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "nemo_minitron.evaluation.lm_eval_adapter")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'nemo-minitron\[eval\]'"):
        import nemo_minitron.evaluation.lm_eval_adapter  # noqa: F401
