import pytest

from nemo_minitron.cli import DEMO_RECIPE
from nemo_minitron.config import load_recipe
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
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel_size"]),
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=3"],
     ["parallel.sequence_parallel", "data.seq_length (128)"]),
])
def test_bad_settings_name_the_field(override, words):
    with pytest.raises(ValueError) as err:
        load_recipe(DEMO_RECIPE, override)
    for word in words:
        assert word in str(err.value)
