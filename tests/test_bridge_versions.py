"""Every Megatron-Bridge name the adapter (nemo_minitron/bridge, runtime/bridge_shims.py, runtime/absent_imports.py)
touches, read from the source of each Bridge release a NeMo Framework container ships: 0.3.0 (26.02), 0.3.1
(26.02.01), 0.4.0 (26.04), 0.5.0 (26.06), 0.6.0 (26.08). The wheels are downloaded by `make` into
.cache/bridge-wheels; nothing is imported from them. The adapter's branches on the version (RoPE scaling, where
validation settings live, how evaluation gets the pipeline's tensor shapes) are checked against each release, so a
release that moves one of these names fails here, not on a cluster.
"""

import ast
import zipfile
from functools import cached_property
from pathlib import Path

import pytest

from nemo_minitron.bridge.recipes import PRECISION_PRESETS
from nemo_minitron.runtime.absent_imports import IMPORTERS
from nemo_minitron.runtime.bridge_shims import _CUDA_FACTORY_MODULES

WHEELS = Path(__file__).resolve().parent.parent / ".cache" / "bridge-wheels"
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "0.5.0", "0.6.0")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in v.split("."))


class BridgeSource:
    """The Python modules of one Bridge wheel, parsed (ast) on demand."""

    def __init__(self, wheel: Path):
        self.zip = zipfile.ZipFile(wheel)
        self.files = set(self.zip.namelist())

    def module(self, dotted: str) -> ast.Module:
        base = dotted.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in self.files:
                return ast.parse(self.zip.read(path))
        raise AssertionError(f"module {dotted} is missing")

    def names(self, dotted: str) -> dict[str, ast.AST]:
        """Top-level names of the module: definitions, assignments and imports (name -> node)."""
        found = {}
        for node in self.module(dotted).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[node.name] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update({(alias.asname or alias.name).split(".")[0]: node for alias in node.names})
            elif isinstance(node, ast.Assign):
                found.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                found[node.target.id] = node
        return found

    def defined(self, dotted: str, name: str) -> tuple[str, ast.AST | None]:
        """(module, node) defining ``name`` as seen from module ``dotted``, following ``from megatron.bridge...
        import`` re-exports."""
        node = self.names(dotted).get(name)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.bridge"):
            original = next(alias.name for alias in node.names if (alias.asname or alias.name) == name)
            return self.defined(node.module, original)
        return dotted, node

    def imported_packages(self, dotted: str) -> set[str]:
        """Top-level packages the module imports at module level."""
        found = set()
        for node in self.module(dotted).body:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        return found

    def members(self, dotted: str, cls: str) -> set[str]:
        """Fields and methods of a class defined in the wheel, with those of its bases that the wheel defines."""
        dotted, node = self.defined(dotted, cls)
        assert isinstance(node, ast.ClassDef), f"{dotted}.{cls} is not a class"
        found = set()
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                found.add(item.target.id)
            elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.add(item.name)
        for base in node.bases:
            base = base.value if isinstance(base, ast.Subscript) else base  # Generic[T]
            if isinstance(base, ast.Name) and isinstance(self.defined(dotted, base.id)[1], ast.ClassDef):
                found |= self.members(dotted, base.id)
        return found

    def parameters(self, dotted: str, function: str) -> set[str]:
        _, node = self.defined(dotted, function)
        assert isinstance(node, ast.FunctionDef), f"{dotted}.{function} is not a function"
        args = node.args
        return {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}

    @cached_property
    def registered_presets(self) -> set[str]:
        return {node.name for node in self.module("megatron.bridge.training.mixed_precision").body
                if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list)}


def _source(version: str) -> BridgeSource:
    wheels = list(WHEELS.glob(f"megatron_bridge-{version}-*.whl"))
    assert wheels, f"no megatron-bridge {version} wheel in {WHEELS}: `make test` downloads them"
    return BridgeSource(wheels[0])


@pytest.fixture(scope="module", params=VERSIONS)
def bridge(request):
    return request.param, _source(request.param)


def test_modules_the_shims_patch_exist_and_use_torch(bridge):
    """The modules whose ``torch`` bridge_cpu() replaces import torch."""
    _, source = bridge
    for module in (m for m in _CUDA_FACTORY_MODULES if m.startswith("megatron.bridge")):
        assert "torch" in source.names(module), module


def test_every_absent_import_entry_is_needed_by_a_release():
    """Each Bridge importer that absent_imports serves a placeholder to imports that package at module level in at
    least one release (0.6 no longer imports Transformer Engine in peft/lora.py; the entry stays for 0.3-0.5)."""
    sources = {version: _source(version) for version in VERSIONS}
    for module, packages in IMPORTERS.items():
        if module.startswith("megatron.bridge"):
            users = [v for v, source in sources.items() if set(packages) <= source.imported_packages(module)]
            assert users, (module, packages)


def test_names_the_adapter_calls(bridge):
    """Functions the adapter calls or patches, with the keywords it passes."""
    _, source = bridge
    expected_parameters = {
        ("megatron.bridge.training.pretrain", "pretrain"): {"config", "forward_step_func", "callbacks"},
        ("megatron.bridge.training.initialize", "initialize_megatron"): {"allow_no_cuda"},
        ("megatron.bridge.models.model_provider", "get_model"): {"use_cpu_initialization"},
        ("megatron.bridge.training.model_load_save", "save_megatron_model"): {"model", "path", "hf_tokenizer_path"},
        ("megatron.bridge.training.utils.omegaconf_utils", "process_config_with_overrides"): {"cli_overrides"},
        ("megatron.bridge.training.mixed_precision", "get_mixed_precision_config"): {"name"},
        ("megatron.bridge.training.config", "runtime_config_update"): {"cfg"},
    }
    for (module, function), keywords in expected_parameters.items():
        assert keywords <= source.parameters(module, function), (module, function)
    for module, name in (("megatron.bridge.training.setup", "initialize_megatron"),
                         ("megatron.bridge.training.setup", "set_jit_fusion_options"),
                         ("megatron.bridge.training.initialize", "compile_helpers"),
                         ("megatron.bridge.training.train", "get_tensor_shapes_adjust_fn_for_distillation"),
                         ("megatron.bridge.training.eval", "get_forward_backward_func"),
                         ("megatron.bridge.training.utils.omegaconf_utils", "create_omegaconf_dict_config"),
                         ("megatron.bridge.training.tokenizers.config", "TokenizerConfig"),
                         ("megatron.bridge.training.config", "DatasetProvider"),
                         ("megatron.bridge.training.config", "GPTDatasetConfig"),
                         ("megatron.bridge.models.gpt_provider", "local_layer_spec"),
                         ("megatron.bridge.models.gpt_provider", "transformer_engine_layer_spec")):
        assert name in source.names(module), (module, name)
    assert {p for p in PRECISION_PRESETS.values()} <= source.registered_presets
    assert "fp8_param_gather" in source.members("megatron.bridge.training.mixed_precision", "MixedPrecisionConfig")


def test_classes_the_adapter_builds_and_reads(bridge):
    """Fields and methods of the Bridge classes the adapter constructs (provider, container) or reads in its
    callbacks (CallbackContext). (TokenizerConfig's fields live in Megatron-Core from 0.6: they are checked by
    running the Bridge tests on each version.)"""
    _, source = bridge
    provider = source.members("megatron.bridge.models.gpt_provider", "GPTModelProvider")
    assert {"transformer_layer_spec", "vocab_size", "should_pad_vocab", "seq_length", "rotary_base",
            "share_embeddings_and_output_weights", "position_embedding_type", "provide",
            "register_pre_wrap_hook", "provide_distributed_model", "finalize"} <= provider
    container = source.members("megatron.bridge.training.config", "ConfigContainer")
    assert {"train", "model", "optimizer", "scheduler", "ddp", "dataset", "logger", "tokenizer", "checkpoint", "dist",
            "rng", "mixed_precision"} <= container
    assert {"state", "model", "optimizer", "loss_dict", "grad_norm", "total_loss_dict"} <= source.members(
        "megatron.bridge.training.callbacks", "CallbackContext")
    assert {"on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end", "on_eval_start",
            "on_eval_end"} <= source.members("megatron.bridge.training.callbacks", "Callback")


def test_the_adapters_version_branches_match_each_release(bridge):
    """model.gpt_provider: GPTModelProvider.rope_scaling from 0.3.1, else Llama31ModelProvider.scale_factor;
    recipes.container: ValidationConfig (and ConfigContainer.validation) from 0.4, else TrainingConfig's eval_*;
    callbacks.TeacherStages: evaluation asks for the pipeline's shape function from 0.4, else it is given one."""
    version, source = bridge
    provider = source.members("megatron.bridge.models.gpt_provider", "GPTModelProvider")
    assert ("rope_scaling" in provider) is (_version(version) >= (0, 3, 1))
    if "rope_scaling" not in provider:
        assert "scale_factor" in source.members("megatron.bridge.models.llama.llama_provider",
                                                "Llama31ModelProvider")
    new_validation = _version(version) >= (0, 4)
    assert ("ValidationConfig" in source.names("megatron.bridge.training.config")) is new_validation
    assert ("validation" in source.members("megatron.bridge.training.config", "ConfigContainer")) is new_validation
    if not new_validation:
        assert {"eval_iters", "eval_interval", "skip_train"} <= source.members(
            "megatron.bridge.training.config", "TrainingConfig")
    evaluation = source.names("megatron.bridge.training.eval")
    assert ("get_tensor_shapes_adjust_fn_for_distillation" in evaluation) is new_validation
