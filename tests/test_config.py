import pytest

from nemo_minitron.cli import DEMO_RECIPE
from nemo_minitron.config import load_recipe
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.pruning.plan import PruneTarget


def test_demo_recipe_loads_typed():
    recipe = load_recipe(DEMO_RECIPE)
    assert isinstance(recipe.prune["width"], PruneTarget)
    assert recipe.prune["width"].hidden_size == 384
    assert recipe.prune["depth"].num_layers == 15
    assert recipe.distill.student == "width"


@pytest.mark.parametrize("name", ["llama31_8b_to_4b", "mistral_nemo_12b_to_8b"])
def test_gpu_recipes_load(name, tmp_path):
    """The large recipes are valid apart from what needs their GPU machine (TE, FP8, the checkpoint)."""
    recipe = load_recipe(DEMO_RECIPE.parent / f"{name}.yaml",
                         ["model.transformer_impl=local", "model.fp8=null", f"model.source={tmp_path}"])
    assert recipe.parallel.sequence_parallel and recipe.distill.fuse_output_layer
    assert recipe.data.seq_length == 8192 and recipe.prune[recipe.distill.student]


def test_overrides_win_over_file():
    recipe = load_recipe(DEMO_RECIPE, ["distill.steps=5", "prune.width.hidden_size=192", "data.seq_length=64"])
    assert (recipe.distill.steps, recipe.prune["width"].hidden_size, recipe.data.seq_length) == (5, 192, 64)


def test_eval_tasks_load_typed():
    recipe = load_recipe(DEMO_RECIPE, ["eval.tasks=[hellaswag,arc_easy]", "eval.num_fewshot=0", "eval.task_limit=50"])
    assert (recipe.eval.tasks, recipe.eval.num_fewshot, recipe.eval.task_limit) == (["hellaswag", "arc_easy"], 0, 50)
    assert load_recipe(DEMO_RECIPE).eval.tasks == []


@pytest.mark.parametrize("override, words", [
    (["distill.loss=kl"], ["distill.loss", "forward_kl", "reverse_kl"]),
    (["distill.student=nope"], ["distill.student", "width", "depth"]),
    (["distill.global_batch_size=6"], ["distill.global_batch_size", "micro_batch_size"]),
    (["correct.min_lr=1.0"], ["correct.min_lr"]),
    (["data.seq_length=0"], ["data.seq_length"]),
    (["model.fp8=delayed"], ["model.fp8", "transformer_engine"]),
    (["model.source=/no/such/dir"], ["model.source", "smollm2-135m"]),
    (["distill.loss=topk_forward_kl"], ["distill.top_k"]),
    (["distill.stepz=3"], ["stepz"]),
    (["distill.steps=3"], ["distill.warmup_steps", "distill.steps"]),
    (["data.seq_length=abc"], ["seq_length"]),
    (["score.screen_tokens=129"], ["score.screen_tokens", "data.seq_length=128"]),
    (["score.screen_keep=0"], ["score.screen_keep"]),
    (["distill.cached_teacher_top_k=0"], ["distill.cached_teacher_top_k"]),
    (["score.block_task=winogrande", "score.block_sizes=[]"], ["score.block_task", "score.block_sizes"]),
    (["score.block_task=winogrande", "score.block_task_limit=0"], ["score.block_task_limit"]),
    (["distill.cached_teacher_top_k=8", "distill.loss=reverse_kl"], ["distill.cached_teacher_top_k", "forward_kl"]),
    (["distill.cached_teacher_top_k=8", "distill.fuse_output_layer=true"],
     ["distill.cached_teacher_top_k", "distill.fuse_output_layer"]),
    (["eval.tasks=[tiny_mc]", "eval.task_path=/no/such/dir"], ["eval.task_path", "/no/such/dir"]),
    (["eval.task_limit=0"], ["eval.task_limit"]),
    (["eval.num_fewshot=-1"], ["eval.num_fewshot"]),
    (["eval.tasks=[tiny_mc]", "parallel.pipeline_model_parallel_size=2"],
     ["eval.tasks", "parallel.pipeline_model_parallel_size=1"]),
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel_size"]),
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=3"],
     ["parallel.sequence_parallel", "data.seq_length (128)"]),
])
def test_bad_settings_name_the_field(override, words):
    with pytest.raises(ValueError) as err:
        load_recipe(DEMO_RECIPE, override)
    for word in words:
        assert word in str(err.value)


# SmolLM2-135M, the embedded teacher (tests/test_embedded.py checks these against its converted config)
SMOLLM2 = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                    vocab_size=49152, kv_channels=64)


def test_the_readme_parallel_demo_commands_fit_the_model():
    """Every `torchrun` command of the README parses as torchrun parses it (its own flags, e.g. --run-path, must not
    swallow ours), and on the demo (`--recipe recipes/demo.yaml ...`, or `--run-dir DIR` of a run folder such a
    command made) gives a layout whose TP size divides the teacher's and every target's sharded sizes, checked as
    `minitron prepare` checks them before any compute."""
    import re
    import shlex

    from torch.distributed.run import get_args_parser

    from nemo_minitron.cli import parse_args
    from nemo_minitron.pruning.plan import validate

    readme = (DEMO_RECIPE.parent.parent / "README.md").read_text()
    commands = [shlex.split(c.replace("\\\n", " ")) for c in re.findall(r"^torchrun (?:[^\n]*\\\n)*[^\n]*", readme,
                                                                            flags=re.M)]
    run_overrides = {}  # run folder -> the overrides of the command that made it
    checked = 0
    for words in commands:
        launched = get_args_parser().parse_args(words[1:])  # exits on an ambiguous or unknown flag
        assert words[-len(launched.training_script_args):] == launched.training_script_args
        if launched.training_script == "nemo_minitron.cli":
            assert parse_args(launched.training_script_args).command in ("run", "distill")
        nproc = int(words[words.index("--nproc-per-node") + 1])
        if "--recipe" in words and words[words.index("--recipe") + 1] == "recipes/demo.yaml":
            overrides = words[words.index("--recipe") + 2:]
            run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))
            run_overrides[run_dir] = overrides
        elif "--run-dir" in words and words[words.index("--run-dir") + 1] in run_overrides:
            overrides = run_overrides[words[words.index("--run-dir") + 1]] + words[words.index("--run-dir") + 2:]
        else:
            continue
        recipe = load_recipe(DEMO_RECIPE, overrides)
        tp = recipe.parallel.tensor_model_parallel_size
        recipe.parallel.validate(nproc)
        SMOLLM2.check_tensor_parallel(tp)
        for target in recipe.prune.values():
            validate(SMOLLM2, target, tp_size=tp)
            target.new_arch(SMOLLM2).check_tensor_parallel(tp)
        checked += 1
    assert checked == 2, f"expected the README's two parallel demo commands, checked {checked}"
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2"):  # the README once documented TP=2
        SMOLLM2.check_tensor_parallel(2)
    assert parse_args(["distill", "--run-dir", "x"]).run == parse_args(["distill", "--run", "x"]).run == "x"
    with pytest.raises(SystemExit):  # ... and `--run DIR`, which torchrun reads as its --run-path
        get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "nemo_minitron.cli", "distill", "--run", "x"])


def test_saved_recipe_keeps_environment_interpolations_unresolved(tmp_path, monkeypatch):
    """A secret or site path passed as ${oc.env:VAR} is used, but the run folder's recipe.yaml holds the reference,
    not the value; loading that file resolves it again."""
    from nemo_minitron.config import save_recipe

    monkeypatch.setenv("MINITRON_TEST_SECRET", "s3cr3t-path")
    recipe = load_recipe(DEMO_RECIPE, ["data.text_field=${oc.env:MINITRON_TEST_SECRET}", "distill.steps=7"])
    assert recipe.data.text_field == "s3cr3t-path"
    save_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "${oc.env:MINITRON_TEST_SECRET}" in text and "s3cr3t-path" not in text
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.data.text_field == "s3cr3t-path" and again.distill.steps == 7 and again.prune == recipe.prune
