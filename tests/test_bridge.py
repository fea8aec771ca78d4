"""nemo_minitron.bridge against the project's own engines, through Megatron-Bridge's real pretrain() on gloo."""

import builtins
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nemo_minitron.models.arch import ModelArch
from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None,
                                reason="megatron-bridge is not installed")

TEACHER = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=128, kv_channels=16, max_position_embeddings=64)
STUDENT = TEACHER.replace(hidden_size=48, ffn_hidden_size=64)
LLAMA31_8B = ModelArch(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, vocab_size=128256, kv_channels=128, rope_scaling_factor=8.0)
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
HISTORY_KEYS = ("lr", "loss", "kd_loss", "lm_loss", "inter_loss", "grad_norm")


def _sequences(n, seed=0):
    return torch.randint(0, TEACHER.vocab_size, (n, 17), generator=torch.Generator().manual_seed(seed))


def _save_models(tmp, sp):
    """Teacher and student checkpoints (rank-collective), and the training sequences."""
    from nemo_minitron.models.build import build_gpt_model
    from nemo_minitron.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_gpt_model(TEACHER, sequence_parallel=sp), TEACHER, f"{tmp}/teacher")
    torch.manual_seed(1)
    save_checkpoint(build_gpt_model(STUDENT, sequence_parallel=sp), STUDENT, f"{tmp}/student")
    torch.save(_sequences(24), f"{tmp}/train.pt")
    torch.save(_sequences(8, seed=1), f"{tmp}/valid.pt")


def _forward_step(variant, teacher):
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.distillation.intermediate import IntermediateLoss

    if variant == "intermediate":
        return ForwardStep(teacher, lm_loss_weight=0.5, intermediate=IntermediateLoss([(0, 1), (1, 1)], kind="mse"))
    return ForwardStep(teacher, lm_loss_weight=0.5, fuse_output_layer=variant == "fused")


def _bridge_kd(tmp, tp, sp, variant, stage, checkpoint_dir=None, history_path=None, exit_interval=None, pp=1,
               eval_iters=0):
    """A Bridge KD run of the saved student from the saved teacher (eval_iters: validation batches of the saved
    validation sequences every stage.eval_interval steps and after training); returns (history, this rank's final
    student weights); the history is kept on the last pipeline stage."""
    from nemo_minitron.bridge.callbacks import HistoryCallback
    from nemo_minitron.bridge.data import PackedSequences
    from nemo_minitron.bridge.model import AttachProjections, LoadWeights, TeacherFromCheckpoint, gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch

    model = gpt_provider(STUDENT, seq_length=16, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         sequence_parallel=sp)
    teacher = TeacherFromCheckpoint(f"{tmp}/teacher", sequence_parallel=sp)
    forward_step = _forward_step(variant, teacher)
    hooks = [LoadWeights(f"{tmp}/student"), teacher]
    if forward_step.intermediate is not None:
        hooks.append(AttachProjections(forward_step.intermediate, teacher, seed=7))
    for hook in hooks:
        model.register_pre_wrap_hook(hook)
    dataset = PackedSequences(train_path=f"{tmp}/train.pt", validation_path=f"{tmp}/valid.pt", seed=7)
    config = container(model, dataset, stage, seed=1234, checkpoint_dir=checkpoint_dir, eval_iters=eval_iters)
    config.train.exit_interval = exit_interval
    history = HistoryCallback(history_path)
    weights = {}

    from megatron.bridge.training.callbacks import Callback

    class KeepWeights(Callback):
        def on_train_end(self, context):
            weights.update({k: v.detach().clone() for k, v in context.model[0].module.named_parameters()
                            if not k.startswith("kd_projections.")})  # the run's, not the student's

    launch(BridgeRun(config, forward_step, [history, KeepWeights()]))
    assert config.model.sequence_parallel == sp and config.model.tensor_model_parallel_size == tp
    return history.history, weights


def _assert_same_history(actual, expected, rtol=1e-5):
    assert [e["step"] for e in actual] == [e["step"] for e in expected]
    for a, e in zip(actual, expected):
        assert ("val_loss" in a) == ("val_loss" in e), (a, e)
        for key in (*HISTORY_KEYS, "val_loss"):
            if key in e:
                assert a[key] == pytest.approx(e[key], rel=rtol, abs=1e-9), (a["step"], key, a[key], e[key])


def _kd_equals_trainer(rank, world_size, tmp, pp, sp, variant):
    from nemo_minitron.config import TrainStageConfig
    from nemo_minitron.distillation.teacher import Teacher
    from nemo_minitron.distillation.trainer import train
    from nemo_minitron.models.checkpoint import load_checkpoint
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    from megatron.core import parallel_state

    tp = world_size // pp
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    sequence_parallel=sp), seed=1234)
    _save_models(tmp, sp)
    last_stage = parallel_state.is_pipeline_last_stage()
    stage = TrainStageConfig(steps=4, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-4,
                             warmup_steps=1, weight_decay=0.01, eval_interval=2)
    student, _ = load_checkpoint(f"{tmp}/student", sequence_parallel=sp)
    teacher, _ = load_checkpoint(f"{tmp}/teacher", sequence_parallel=sp)
    forward_step = _forward_step(variant, Teacher(teacher))
    expected = train(student, _sequences(24), stage.train_config(seed=7), forward_step, progress=False,
                     validation=_sequences(8, seed=1))
    assert [e["step"] for e in expected if "val_loss" in e] == [2, 4]
    if forward_step.intermediate is not None:
        assert expected[-1]["inter_loss"] > 0
    expected_weights = {k: v.detach().clone() for k, v in student.named_parameters()}
    # Bridge re-initialises the groups; it validates at steps 2 and 4 and once more after training
    history, weights = _bridge_kd(tmp, tp, sp, variant, stage, pp=pp, eval_iters=2)
    if last_stage:
        _assert_same_history(history, expected)
    else:
        assert history == []
    assert weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tp,pp,sp,variant", [(1, 1, False, "intermediate"), (2, 1, False, "fused"),
                                              (2, 1, True, "logits"), (1, 2, False, "logits")],
                         ids=["tp1-intermediate", "tp2-fused", "tp2-sp", "pp2"])
def test_bridge_kd_equals_trainer(tmp_path, tp, pp, sp, variant):
    """Bridge's pretrain() with ForwardStep reproduces the project trainer's loss history, validation losses (during
    training and in the validation pass pretrain() runs after it) and final weights (under pipeline parallelism the
    teacher's stages travel with the student's in both loops, validation included)."""
    run_distributed(_kd_equals_trainer, tp * pp, str(tmp_path), pp, sp, variant, timeout=600)


def _resume(rank, world_size, tmp, phase):
    """phase "straight": 4 steps in one run; "stop": the same run ended by Bridge's exit_interval after step 2
    (Bridge saves, then exits the process); "resume": started again on the stopped run's checkpoint."""
    from nemo_minitron.config import TrainStageConfig
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    if phase == "straight":
        _save_models(tmp, False)
    stage = TrainStageConfig(steps=4, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-4,
                             warmup_steps=1, save_interval=3)
    run = "straight" if phase == "straight" else "stopped"
    try:
        history, weights = _bridge_kd(tmp, 1, False, "logits", stage, checkpoint_dir=f"{tmp}/{run}",
                                      history_path=f"{tmp}/{run}.json", exit_interval=2 if phase == "stop" else None)
    except SystemExit as stop:
        assert phase == "stop" and stop.code == 0
        return
    torch.save(weights, f"{tmp}/{run}_weights.pt")


def test_bridge_resume_continues_the_loss_history(tmp_path):
    """A Bridge KD run stopped after 2 of 4 steps and started again equals the uninterrupted run: loss history
    (continued in the same history file) and final weights."""
    for phase in ("straight", "stop", "resume"):
        run_distributed(_resume, 1, str(tmp_path), phase, timeout=600)
        if phase == "stop":
            assert [e["step"] for e in json.loads((tmp_path / "stopped.json").read_text())] == [1, 2]
    straight = json.loads((tmp_path / "straight.json").read_text())
    _assert_same_history(json.loads((tmp_path / "stopped.json").read_text()), straight)
    expected, weights = torch.load(tmp_path / "straight_weights.pt"), torch.load(tmp_path / "stopped_weights.pt")
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _importance_equals_engine(rank, world_size, tmp):
    from nemo_minitron.bridge.callbacks import ImportanceCallback
    from nemo_minitron.bridge.data import PackedSequences
    from nemo_minitron.bridge.model import LoadWeights, gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch
    from nemo_minitron.config import TrainStageConfig
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.importance.compute import compute_importance
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import load_checkpoint
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=world_size), seed=1234)
    _save_models(tmp, False)
    calibration, validation = _sequences(8, seed=1), _sequences(4, seed=2)
    torch.save(calibration, f"{tmp}/calibration.pt")
    options = dict(seq_agg="var", batch_agg="mean", depth_metrics=("block_influence", "lm_loss_drop"),
                   block_sizes=(1,))
    teacher, _ = load_checkpoint(f"{tmp}/teacher")
    expected = compute_importance(teacher, TEACHER, calibration, validation, seq_length=16, micro_batch_size=2,
                                  **options)

    model = gpt_provider(TEACHER, seq_length=16, tensor_model_parallel_size=world_size)
    model.register_pre_wrap_hook(LoadWeights(f"{tmp}/teacher"))
    dataset = PackedSequences(train_path=f"{tmp}/calibration.pt", validation_path=f"{tmp}/calibration.pt")
    batches = TrainStageConfig(steps=1, micro_batch_size=2, global_batch_size=2, warmup_steps=0)
    config = container(model, dataset, batches, seed=1234, eval_iters=4, skip_train=True)
    callback = ImportanceCallback(TEACHER, f"{tmp}/scores", validation=validation, micro_batch_size=2, **options)
    launch(BridgeRun(config, ForwardStep(), [callback]))
    if rank == 0:
        saved = ImportanceScores.load(f"{tmp}/scores")
        for actual in (callback.scores, saved):
            for axis in ("hidden", "ffn", "heads", "groups"):
                torch.testing.assert_close(getattr(actual, axis), getattr(expected, axis), rtol=1e-5, atol=0)
            for metric, values in expected.layers.items():
                torch.testing.assert_close(actual.layers[metric], values, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(actual.blocks[1], expected.blocks[1], rtol=1e-5, atol=0)
            assert actual.meta["calibration_loss"] == pytest.approx(expected.meta["calibration_loss"], rel=1e-5)
            assert actual.meta["calibration_sequences"] == expected.meta["calibration_sequences"] == 8


@pytest.mark.parametrize("tp", [1, 2])
def test_importance_callback_equals_compute_importance(tmp_path, tp):
    """Scores collected in Bridge's evaluation loop equal importance/'s, on the same weights and tokens."""
    run_distributed(_importance_equals_engine, tp, str(tmp_path), timeout=600)


def test_absent_imports_serve_only_the_named_importers():
    from nemo_minitron.runtime.absent_imports import absent_imports

    code = "import transformer_engine.pytorch as te\nclass Adapter(te.Linear):\n    pass\n"
    real_import = builtins.__import__
    with absent_imports():
        namespace = {"__name__": "megatron.bridge.peft.lora"}
        exec(code, namespace)
        with pytest.raises(RuntimeError, match="transformer_engine"):
            namespace["Adapter"]()
        with pytest.raises(ImportError):
            exec(code, {"__name__": "megatron.core.tensor_parallel.layers"})
    assert builtins.__import__ is real_import
    with pytest.raises(ImportError):
        exec(code, {"__name__": "megatron.bridge.peft.lora"})


def test_bridge_shims_are_undone_after_the_run():
    from nemo_minitron.runtime.bridge_shims import _CUDA_FACTORY_MODULES, bridge_cpu

    with bridge_cpu():
        pass  # the first entry imports Bridge
    watched = {"import": lambda: builtins.__import__, "Stream": lambda: torch.cuda.Stream,
               "Tensor.type": lambda: torch.Tensor.type,
               "barrier": lambda: torch.distributed.barrier, "memory": lambda: torch.cuda.max_memory_allocated,
               "setup.initialize_megatron": lambda: importlib.import_module(
                   "megatron.bridge.training.setup").initialize_megatron,
               **{f"{m}.torch": (lambda m=m: importlib.import_module(m).torch) for m in _CUDA_FACTORY_MODULES}}
    before = {name: get() for name, get in watched.items()}
    with bridge_cpu():
        changed = [name for name, get in watched.items() if get() is not before[name]]
    assert not torch.cuda.is_available() and sorted(changed) == sorted(watched)
    assert {name: get() for name, get in watched.items()} == before


def bridge(*args, timeout=900):
    """`python -m nemo_minitron.bridge ARGS` in a fresh process."""
    import os
    import subprocess
    import sys

    from tests.test_pipeline import REPO

    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.bridge", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bridge {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _state(path):
    from nemo_minitron.runtime.distributed import ParallelConfig, destroy_distributed, init_distributed

    from nemo_minitron.models.checkpoint import load_checkpoint

    init_distributed(ParallelConfig())
    try:
        model, arch = load_checkpoint(path)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}, arch
    finally:
        destroy_distributed()


def _bridge_loads_pruned(rank, world_size, run_dir):
    """Bridge's own loader reads `python -m nemo_minitron.bridge prune`'s checkpoints: the weights of
    `minitron prune`'s students."""
    from nemo_minitron.models.checkpoint import load_checkpoint
    from nemo_minitron.runtime.bridge_shims import bridge_cpu
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed()
    for name in ("width", "depth"):
        expected, arch = load_checkpoint(f"{run_dir}/pruned/{name}")
        with bridge_cpu():
            from megatron.bridge.training.model_load_save import load_megatron_model

            (model,) = load_megatron_model(f"{run_dir}/pruned/{name}/bridge/iter_0000000", skip_temp_dist_context=True)
        assert model.config.hidden_size == arch.hidden_size and model.config.num_layers == arch.num_layers
        actual = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        reference = {k: v for k, v in expected.state_dict().items() if isinstance(v, torch.Tensor)}
        assert actual.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_bridge_stages_equal_the_minitron_stages(tiny_hf_run_inputs, tmp_path):
    """From one prepared run folder: `minitron correct-teacher / score / prune / distill` and the Bridge stages
    (correct-teacher, score with the ImportanceCallback, distill with the prune hook) give the same corrected
    teacher, the same scores, and the same distilled student (weights, loss history, validation losses)."""
    import shutil

    from nemo_minitron.importance.scores import ImportanceScores
    from tests.test_pipeline import REPO, minitron, tiny_overrides

    prepared = tmp_path / "prepared"
    minitron("prepare", "--recipe", str(REPO / "recipes" / "demo.yaml"),
             *tiny_overrides(tiny_hf_run_inputs, prepared))
    project, bridged = tmp_path / "project", tmp_path / "bridge"
    shutil.copytree(prepared, project)
    shutil.copytree(prepared, bridged)
    for stage in ("correct-teacher", "score", "prune", "distill"):
        minitron(stage, "--run", str(project), f"run_dir={project}")
    for stage in ("correct-teacher", "score"):
        bridge(stage, "--run", str(bridged), f"run_dir={bridged}")
    # Keys the recipe lacks go to Bridge's ConfigContainer; a key neither has fails in one line naming it.
    shown = bridge("distill", "--run", str(bridged), "--dry-run", "train.exit_interval=7", "distill.steps=9")
    assert "exit_interval: 7" in shown and "train_iters: 9" in shown
    with pytest.raises(AssertionError, match="no_such_key") as failure:
        bridge("distill", "--run", str(bridged), "train.no_such_key=1")
    # one line, no traceback of the error (Bridge 0.6 logs tracebacks of optional imports it lacks at import time)
    assert "python -m nemo_minitron.bridge distill: train.no_such_key: neither a recipe setting nor a field of " \
           "Bridge's ConfigContainer" in str(failure.value) and "ValueError" not in str(failure.value)
    for stage in ("distill", "prune"):
        bridge(stage, "--run", str(bridged), f"run_dir={bridged}")
    minitron("prune", "--run", str(bridged), f"run_dir={bridged}")  # the same students in the project's format
    run_distributed(_bridge_loads_pruned, 1, str(bridged))

    for name in ("teacher_corrected", "distilled/width"):
        (expected, expected_arch), (actual, actual_arch) = _state(project / name), _state(bridged / name)
        assert actual_arch == expected_arch and actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert _state(bridged / "distilled/width")[1].hidden_size == 48
    expected, actual = ImportanceScores.load(project / "scores"), ImportanceScores.load(bridged / "scores")
    for axis in ("hidden", "ffn", "heads", "groups"):
        torch.testing.assert_close(getattr(actual, axis), getattr(expected, axis), rtol=1e-5, atol=0)
    torch.testing.assert_close(actual.blocks[2], expected.blocks[2], rtol=1e-5, atol=0)
    for name in ("teacher_corrected", "distilled/width"):
        expected = json.loads((project / name / "history.json").read_text())
        actual = json.loads((bridged / name / "history.json").read_text())
        _assert_same_history(actual, expected, rtol=1e-4)
        validations = [(e["step"], e["val_loss"]) for e in expected if "val_loss" in e]
        assert validations and [(e["step"], pytest.approx(e["val_loss"], rel=1e-4)) for e in actual
                                if "val_loss" in e] == validations
    assert (bridged / "distilled" / "width" / "hf" / "config.json").exists()


def _prepared_run(root, arch):
    """What `minitron prepare` + `score` leave that building a Bridge config reads: the teacher's arch.json and
    the scores (random)."""
    from nemo_minitron.importance.scores import ImportanceScores

    (root / "teacher").mkdir(parents=True)
    arch.save(root / "teacher" / "arch.json")
    g = torch.Generator().manual_seed(0)
    ImportanceScores(hidden=torch.rand(arch.hidden_size, generator=g),
                     ffn=torch.rand(arch.num_layers, arch.ffn_hidden_size, generator=g),
                     heads=torch.rand(arch.num_layers, arch.num_attention_heads, generator=g),
                     groups=torch.rand(arch.num_layers, arch.num_query_groups, generator=g),
                     blocks={16: torch.rand(arch.num_layers - 15, generator=g)}).save(root / "scores")


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_recipe_functions_carry_the_recipe_into_bridge(tmp_path, monkeypatch, gpu):
    """The Bridge recipe functions turn the papers' YAML recipes into ConfigContainers: layout, schedule, batch,
    the student target, the recipe's bf16 mixed precision and distributed optimizer, and on a GPU overlapped
    communication."""
    from nemo_minitron.bridge import recipes
    from nemo_minitron.bridge.model import ApplyPlan

    arch = LLAMA31_8B
    _prepared_run(tmp_path, arch)
    overrides = [f"run_dir={tmp_path}", f"model.source={tmp_path}", "model.transformer_impl=local"]
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: gpu)
        width = recipes.llama31_8b_to_4b_width_config(overrides=overrides)
        depth = recipes.llama31_8b_to_4b_depth_config(overrides=[*overrides, "distill.steps=500"])
        corrected = recipes.llama31_8b_to_4b_width_config("correct-teacher", overrides)
    model = width.model
    assert (model.tensor_model_parallel_size, model.sequence_parallel, model.seq_length) == (8, True, 8192)
    assert (width.train.train_iters, width.train.global_batch_size, width.train.micro_batch_size) == (12000, 1024, 1)
    assert (width.optimizer.lr, width.optimizer.min_lr, width.scheduler.lr_warmup_iters) == (1e-4, 1e-5, 100)
    assert width.scheduler.lr_decay_style == "cosine" and width.checkpoint.save_interval == 500
    assert corrected.optimizer.lr == 2e-5 and corrected.train.train_iters == 1000
    assert depth.train.train_iters == 500
    targets = {name: next(h for h in cfg.model._pre_wrap_hooks if isinstance(h, ApplyPlan)).target
               for name, cfg in (("width", width), ("depth", depth))}
    assert (targets["width"].hidden_size, targets["width"].ffn_hidden_size) == (3072, 9216)
    assert targets["depth"].num_layers == 16 and targets["depth"].hidden_size is None
    assert width.mixed_precision.bf16 and width.mixed_precision.fp8 is None  # Bridge's bf16_mixed preset
    assert width.optimizer.bf16 and not width.optimizer.fp16
    assert model.params_dtype == torch.bfloat16 and width.optimizer.params_dtype == torch.bfloat16
    assert width.optimizer.use_distributed_optimizer and width.ddp.use_distributed_optimizer
    assert width.ddp.grad_reduce_in_fp32
    assert width.ddp.overlap_grad_reduce is gpu and width.ddp.overlap_param_gather is gpu
    plain = recipes.llama31_8b_to_4b_width_config(overrides=[*overrides, "model.params_dtype=fp16",
                                                             "parallel.use_distributed_optimizer=false",
                                                             "model.recompute_granularity=full"])
    assert plain.mixed_precision.fp16 and plain.optimizer.fp16 and not plain.optimizer.bf16
    assert not plain.optimizer.use_distributed_optimizer and not plain.ddp.overlap_param_gather
    assert (plain.model.recompute_granularity, plain.model.recompute_method) == ("full", "uniform")
    assert width.dist.distributed_backend == ("nccl" if gpu else "gloo")
    with pytest.raises(ValueError, match="stage: 'prune' is not a Bridge training stage"):
        recipes.llama31_8b_to_4b_width_config("prune", overrides)
    with pytest.raises(ValueError, match=r"prune.hidden_size must be an integer in \[1, 4096\]"):
        recipes.llama31_8b_to_4b_width_config(overrides=[*overrides, "prune.width.hidden_size=5000"])
    with pytest.raises(ValueError, match="intermediate losses need pipeline_model_parallel_size=1, got 2"):
        recipes.llama31_8b_to_4b_depth_config(overrides=[*overrides, "parallel.pipeline_model_parallel_size=2",
                                                         "distill.intermediate_pairs=[[0,0]]"])


@pytest.mark.slow
def test_smollm2_recipe_through_bridge(tmp_path):
    """The embedded default (SmolLM2-135M on Shakespeare) through Megatron-Bridge, shortened: `minitron prepare`,
    then Bridge's score and distill stages, then `minitron prune` and `eval`: a few distillation steps from the
    teacher improve the width student."""
    from tests.test_pipeline import minitron

    run_dir = tmp_path / "demo"
    settings = [f"run_dir={run_dir}", "data.num_calibration=8", "data.num_validation=8", "data.num_selection=4",
                "score.block_sizes=[]", "prune.depth.layer_metric=block_influence", "distill.steps=3",
                "distill.warmup_steps=1", "distill.global_batch_size=4", "distill.eval_interval=0"]
    minitron("prepare", "--recipe", str(RECIPE_DIR / "demo.yaml"), *settings, timeout=900)
    bridge("score", "--run", str(run_dir), timeout=900)
    out = bridge("distill", "--run", str(run_dir), timeout=1500)
    assert "iteration        3/       3" in out
    minitron("prune", "--run", str(run_dir))  # the undistilled students, to compare with
    minitron("eval", "--run", str(run_dir))
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["teacher"]["val_loss"] < 5.0
    assert results["distilled/width"]["arch"]["hidden_size"] == 384
    assert results["distilled/width"]["val_loss"] < results["pruned/width"]["val_loss"] - 0.5
    history = json.loads((run_dir / "distilled" / "width" / "history.json").read_text())
    assert [e["step"] for e in history] == [1, 2, 3] and history[-1]["kd_loss"] < history[0]["kd_loss"]


def _indexed_data_lm(rank, world_size, tmp):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from nemo_minitron.bridge.callbacks import HistoryCallback
    from nemo_minitron.bridge.model import gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch
    from nemo_minitron.config import TrainStageConfig
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    generator = np.random.default_rng(0)
    prefix = f"{tmp}/corpus_text_document"
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(400):  # documents of tokens 2..126, each ended by token 1
        doc = np.append(generator.integers(2, 127, size=generator.integers(10, 40)), 1).astype(np.int32)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    with bridge_imports():
        from megatron.bridge.training.config import GPTDatasetConfig

    dataset = GPTDatasetConfig(random_seed=1, seq_length=16, blend=[[prefix], None], split="90,10,0",
                               reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                               num_workers=0, dataloader_type="single", path_to_cache=f"{tmp}/cache")
    batches = []

    class Recording(ForwardStep):
        def __call__(self, data_iterator, model):
            batch = next(data_iterator)
            batches.append(batch)
            return super().__call__(iter([batch]), model)

    history = HistoryCallback()
    stage = TrainStageConfig(steps=3, micro_batch_size=2, global_batch_size=4, warmup_steps=1)
    launch(BridgeRun(container(gpt_provider(TEACHER, seq_length=16), dataset, stage, seed=1), Recording(), [history]))
    assert [e["step"] for e in history.history] == [1, 2, 3] and len(batches) == 6
    for batch in batches:
        tokens, labels = batch["tokens"], batch["labels"]
        assert tokens.shape == (2, 16) and torch.equal(labels[:, :-1], tokens[:, 1:])
        assert int(tokens.min()) >= 1 and int(tokens.max()) <= 126, tokens.tolist()
    assert any((batch["tokens"] == 1).any() for batch in batches)  # windows run across document ends


def bridge_imports():
    from nemo_minitron.runtime.absent_imports import absent_imports

    return absent_imports()


def test_indexed_dataset_through_bridge_gpt_dataset(tmp_path):
    """A Megatron indexed dataset through Bridge's GPTDatasetConfig (what the recipes use for `data.source` PREFIX):
    ForwardStep reads Bridge's GPT batches (next-token labels, documents packed with their end token)."""
    run_distributed(_indexed_data_lm, 1, str(tmp_path))


def _provider_equals_build(rank, world_size):
    from nemo_minitron.bridge.model import gpt_provider
    from nemo_minitron.runtime.bridge_shims import bridge_cpu
    from nemo_minitron.models.build import build_gpt_model, forward_logits
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(seed=0)
    tokens = _sequences(2)[:, :16]
    inv_freq = {}
    for factor in (None, 32.0):
        arch = TEACHER.replace(rope_scaling_factor=factor, max_position_embeddings=16)
        provider = gpt_provider(arch, seq_length=16)
        provider.finalize()
        with bridge_cpu():
            (model,) = provider.provide_distributed_model(wrap_with_ddp=False)
        expected = build_gpt_model(arch)
        model.load_state_dict(expected.state_dict())
        inv_freq[factor] = model.rotary_pos_emb.inv_freq
        torch.testing.assert_close(inv_freq[factor], expected.rotary_pos_emb.inv_freq, rtol=0, atol=0)
        torch.testing.assert_close(forward_logits(model, tokens), forward_logits(expected, tokens))
    assert not torch.equal(inv_freq[None], inv_freq[32.0])


def test_provider_builds_the_model_of_build_gpt_model():
    """Bridge's provider builds build_gpt_model's GPTModel: the same logits from the same weights, Llama-3.x RoPE
    scaling on or off with the arch (GPTModelProvider.rope_scaling from Bridge 0.3.1, Llama31ModelProvider in
    0.3.0)."""
    run_distributed(_provider_equals_build, 1)


@pytest.mark.parametrize("params_dtype,fp8", [("bf16", None), ("bf16", "delayed"), ("bf16", "tensorwise"),
                                              ("fp16", "delayed"), ("fp32", None)])
def test_precision_survives_bridge_config_processing(tmp_path, monkeypatch, params_dtype, fp8):
    """The flagship recipe's precision as Bridge leaves it: after runtime_config_update (the mixed-precision preset
    copied onto the model / optimizer / DDP configs, then ConfigContainer.validate()), the student has the recipe's
    params dtype and FP8 recipe (16-bit weights, FP8 compute), and the teacher is built with the same."""
    from megatron.core.transformer import TransformerConfig

    from nemo_minitron.bridge import recipes
    from nemo_minitron.bridge.model import TeacherFromCheckpoint
    from nemo_minitron.models import arch as arch_module

    with bridge_imports():
        from megatron.bridge.training.config import runtime_config_update

    arch = LLAMA31_8B
    _prepared_run(tmp_path, arch)
    monkeypatch.setattr(arch_module, "transformer_engine_available", lambda: True)  # the GPU container's
    monkeypatch.setenv("WORLD_SIZE", "64")  # 8 nodes: TP=8 x DP=8
    overrides = [f"run_dir={tmp_path}", f"model.source={tmp_path}", f"model.params_dtype={params_dtype}",
                 f"model.fp8={fp8 or 'null'}"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[params_dtype]
    config = recipes.llama31_8b_to_4b_width_config(overrides=overrides)
    runtime_config_update(config)
    model = config.model
    assert (model.fp8, model.fp8_recipe if fp8 else None) == (("hybrid", fp8) if fp8 else (None, None))
    assert not model.fp8_param  # 16-bit primary weights: the pre-wrap hooks load and prune them
    assert (model.params_dtype, model.bf16, model.fp16) == (dtype, params_dtype == "bf16", params_dtype == "fp16")
    assert (config.optimizer.bf16, config.optimizer.fp16) == (params_dtype == "bf16", params_dtype == "fp16")
    assert model.transformer_impl == "transformer_engine"
    teacher = next(h for h in model._pre_wrap_hooks if isinstance(h, TeacherFromCheckpoint))
    teacher_config = TransformerConfig(**arch_module.transformer_config_kwargs(
        arch, tensor_model_parallel_size=8, pipeline_model_parallel_size=1, **teacher.build_kwargs))
    assert (teacher_config.fp8, teacher_config.fp8_recipe if fp8 else None) == (model.fp8, model.fp8_recipe if fp8
                                                                                else None)
    assert teacher_config.params_dtype == dtype


def test_fp8_needs_16_bit_weights_under_bridge(tmp_path, monkeypatch):
    """Bridge's FP8 presets are 16-bit mixed precision: FP8 with float32 weights is refused by name."""
    from nemo_minitron.bridge import recipes
    from nemo_minitron.models import arch as arch_module

    _prepared_run(tmp_path, LLAMA31_8B)
    monkeypatch.setattr(arch_module, "transformer_engine_available", lambda: True)
    with pytest.raises(ValueError, match="model.fp8 through Megatron-Bridge needs model.params_dtype bf16 or fp16"):
        recipes.llama31_8b_to_4b_width_config(overrides=[f"run_dir={tmp_path}", f"model.source={tmp_path}",
                                                         "model.params_dtype=fp32", "model.fp8=delayed"])


def _fused_with_overlapped_param_gather(rank, world_size, tmp):
    from nemo_minitron.bridge.callbacks import HistoryCallback
    from nemo_minitron.bridge.data import PackedSequences
    from nemo_minitron.bridge.model import LoadWeights, TeacherFromCheckpoint, gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch
    from nemo_minitron.config import TrainStageConfig
    from nemo_minitron.models.build import build_gpt_model
    from nemo_minitron.models.checkpoint import save_checkpoint
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(use_distributed_optimizer=True), seed=1234)
    student = STUDENT.replace(tie_word_embeddings=False)  # the output layer holds its own weight
    torch.manual_seed(0)
    save_checkpoint(build_gpt_model(TEACHER), TEACHER, f"{tmp}/teacher")
    torch.manual_seed(1)
    save_checkpoint(build_gpt_model(student), student, f"{tmp}/student")
    torch.save(_sequences(24), f"{tmp}/train.pt")
    stage = TrainStageConfig(steps=3, micro_batch_size=2, global_batch_size=4, lr=1e-2, warmup_steps=1)
    runs = {}
    for overlap in (False, True):
        model = gpt_provider(student, seq_length=16)
        teacher = TeacherFromCheckpoint(f"{tmp}/teacher")
        for hook in (LoadWeights(f"{tmp}/student"), teacher):
            model.register_pre_wrap_hook(hook)
        config = container(model, PackedSequences(train_path=f"{tmp}/train.pt", seed=7), stage, seed=1234,
                           use_distributed_optimizer=True)
        # what a GPU run gets: the gather of the updated weights overlaps the next forward, one bucket per
        # parameter so that the output layer's weight waits in its own module's pre-hook
        config.ddp.overlap_grad_reduce = config.ddp.overlap_param_gather = overlap
        config.ddp.bucket_size = 1
        history = HistoryCallback()
        launch(BridgeRun(config, _forward_step("fused", teacher), [history]))
        runs[overlap] = history.history
    _assert_same_history(runs[True], runs[False])


def test_fused_output_loss_waits_for_the_overlapped_param_gather(tmp_path):
    """The fused output-layer loss reads the output layer's weight without calling the layer; with the distributed
    optimizer's all-gather overlapped with the forward (overlap_param_gather, DP=2), it still trains on the
    gathered weights: the loss history equals the run without overlap."""
    run_distributed(_fused_with_overlapped_param_gather, 2, str(tmp_path), timeout=600)


def test_bridge_names_of_recipe_settings_change_the_recipe(tmp_path, capsys):
    """One source of truth: Bridge's names for what the recipe sets (model.tensor_model_parallel_size,
    train.train_iters) are aliases of the recipe's keys, so `--dry-run` shows the whole config following them (the
    schedule's decay length too), and a layout the prune target cannot shard over is refused before Bridge runs."""
    import yaml

    from nemo_minitron.bridge.__main__ import main

    _prepared_run(tmp_path, LLAMA31_8B)
    args = ["distill", "--recipe", str(RECIPE_DIR / "llama31_8b_to_4b.yaml"), "--dry-run", f"run_dir={tmp_path}",
            f"model.source={tmp_path}", "model.transformer_impl=local"]
    assert main([*args, "model.tensor_model_parallel_size=4", "train.train_iters=200"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["tensor_model_parallel_size"] == 4
    assert config["train"]["train_iters"] == config["scheduler"]["lr_decay_iters"] == 200
    assert main([*args, "model.tensor_model_parallel_size=3"]) == 1
    assert "tensor_model_parallel_size" in capsys.readouterr().err
