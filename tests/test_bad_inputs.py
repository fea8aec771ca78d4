"""A corpus of bad inputs (recipes, model folders, data, run folders and checkpoints, score files, prune targets and
plans, parallel sizes, training state), each run through the CLI: it must exit 1 with exactly one line
`minitron COMMAND: message` that names the culprit (a file or a setting), and no traceback.

Most cases call cli.main in this process (it must leave no process group behind); the multi-rank ones run under
torch.distributed.run. benchmarks/bench_reliability.py runs this corpus and records the share reported clearly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nemo_minitron import cli
from nemo_minitron.bridge import __main__ as bridge_cli
from tests.test_pipeline import REPO, run_minitron, tiny_overrides

DEMO = str(REPO / "recipes" / "demo.yaml")
ERROR_LINE = re.compile(r"^(minitron|python -m nemo_minitron\.bridge) [\w-]+: ", re.M)
# torch.distributed.run's own report that a rank exited 1 (it prints a traceback of itself)
LAUNCHER_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:\s.*\n)*?"
                                r"torch\.distributed\.elastic\.multiprocessing\.errors\.ChildFailedError:")


class Case:
    """What a case builds its bad input from: the tiny model and corpus, a finished run folder (prepare, score,
    prune), and an empty folder of its own."""

    def __init__(self, inputs: Path, run: Path, tmp: Path):
        self.inputs, self.pristine_run, self.tmp = inputs, run, tmp

    def prepare(self, *overrides: str, model: Path | None = None, data: Path | None = None) -> list[str]:
        """`minitron prepare` of the tiny recipe (model / data replaced if given) into a new run folder."""
        args = tiny_overrides(self.inputs, self.tmp / "run")
        if model is not None:
            args = [a if not a.startswith("model.source=") else f"model.source={model}" for a in args]
        if data is not None:
            args = [a if not a.startswith("data.source=") else f"data.source={data}" for a in args]
        return ["prepare", "--recipe", DEMO, *args, *overrides]

    def model(self, without: tuple[str, ...] = (), **config) -> Path:
        """A copy of the tiny model folder without the files ``without``, its config.json updated by ``config``."""
        folder = self.tmp / "model"
        shutil.copytree(self.inputs / "model", folder, ignore=shutil.ignore_patterns(*without))
        if config:
            path = folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return folder

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def run(self) -> Path:
        """A copy of the finished run folder."""
        return Path(shutil.copytree(self.pristine_run, self.tmp / "run"))


CASES = {}  # name -> (build(Case) -> (argv, culprits), number of ranks)


def case(build=None, *, nproc: int = 1):
    """Register ``build``, which returns the argv of a failing command and the strings its message must hold."""
    if build is None:
        return lambda fn: case(fn, nproc=nproc)
    CASES[build.__name__] = (build, nproc)
    return build


# ---------------------------------------------------------------------------------------------------- recipes


@case
def recipe_missing(c):
    path = c.tmp / "nope.yaml"
    return ["run", "--recipe", str(path)], [str(path)]


@case
def recipe_yaml_syntax_error(c):
    path = c.file("bad.yaml", "model:\n  source: [unclosed\n")
    return ["run", "--recipe", str(path)], [str(path), "line 2"]


@case
def recipe_is_a_list(c):
    path = c.file("list.yaml", "- distill\n- prune\n")
    return ["run", "--recipe", str(path)], [str(path), "mapping"]


@case
def recipe_not_utf8(c):
    path = c.file("latin.yaml", "name: caf\xe9\n".encode("latin-1"))
    return ["run", "--recipe", str(path)], [str(path)]


@case
def recipe_unknown_key(c):
    return c.prepare("distill.stepz=3"), ["stepz"]


@case
def recipe_wrong_type(c):
    return c.prepare("data.seq_length=abc"), ["seq_length"]


@case
def recipe_run_folder_is_not_one(c):
    return ["score", "--run-dir", str(c.tmp)], [str(c.tmp / "recipe.yaml")]


@case
def recipe_of_run_folder_broken(c):
    run = c.run()
    (run / "recipe.yaml").write_text("distill: [\n")
    return ["score", "--run-dir", str(run)], [str(run / "recipe.yaml")]


@case
def recipe_quick_outside_study(c):
    return ["run", "--quick", "--recipe", DEMO], ["--quick"]


@case
def recipe_not_given(c):
    return ["score"], ["--recipe"]


@case
def recipe_missing_for_bridge(c):
    path = c.tmp / "nope.yaml"
    return ["bridge", "run", "--recipe", str(path)], [str(path)]


@case
def bridge_override_not_a_recipe_key(c):
    return ["bridge", "distill", "--run-dir", str(c.run()), "distill.stepz=5"], ["distill.stepz", "distill.steps"]


@case
def bridge_override_not_a_bridge_field(c):
    return (["bridge", "distill", "--run-dir", str(c.run()), "logger.log_intervall=3"],
            ["logger.log_intervall", "logger.log_interval"])


@case
def bridge_training_alias_for_several_stages(c):
    return ["bridge", "run", "--run-dir", str(c.run()), "train.train_iters=4"], ["train.train_iters", "distill.steps"]


# ---------------------------------------------------------------------------------------------- model folders


@case
def model_source_not_a_folder(c):
    return c.prepare(model=c.tmp / "no_such_model"), ["model.source", "no_such_model"]


@case
def model_folder_empty(c):
    model = c.model(without=("*",))
    return c.prepare(model=model), [str(model), "config.json"]


@case
def model_folder_config_only(c):
    model = c.model(without=("*.safetensors", "tokenizer*"))
    return c.prepare(model=model), [str(model), "safetensors"]


@case
def model_without_tokenizer(c):
    model = c.model(without=("tokenizer*",))
    return c.prepare(model=model), [str(model), "tokenizer"]


@case
def model_config_not_json(c):
    model = c.model()
    (model / "config.json").write_text("{model_type: llama")
    return c.prepare(model=model), [str(model / "config.json")]


@case
def model_type_unsupported(c):
    model = c.model(model_type="gpt2")
    return c.prepare(model=model), [str(model / "config.json"), "gpt2"]


@case
def model_activation_unsupported(c):
    model = c.model(hidden_act="gelu")
    return c.prepare(model=model), [str(model / "config.json"), "hidden_act"]


@case
def model_weights_truncated(c):
    model = c.model()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return c.prepare(model=model), [str(weights)]


@case
def model_weights_empty(c):
    model = c.model()
    (model / "model.safetensors").write_bytes(b"")
    return c.prepare(model=model), [str(model / "model.safetensors")]


@case
def model_index_lists_a_missing_shard(c):
    model = c.model()
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return c.prepare(model=model), [str(model / "model.safetensors.index.json"), "model-00002-of-00002"]


@case
def model_index_not_json(c):
    model = c.model()
    (model / "model.safetensors.index.json").write_text("")
    return c.prepare(model=model), [str(model / "model.safetensors.index.json")]


@case
def model_tokenizer_larger_than_vocabulary(c):
    model = c.model(vocab_size=64)
    return c.prepare(model=model), [str(model), "vocab_size"]


@case
def model_weights_do_not_match_config(c):
    model = c.model(intermediate_size=128)
    return c.prepare(model=model), [str(model), "mlp"]


# ------------------------------------------------------------------------------------------------------- data


@case
def data_missing(c):
    return c.prepare(data=c.tmp / "nope.txt"), [str(c.tmp / "nope.txt")]


@case
def data_folder_without_text(c):
    c.file("docs/notes.md", "text")
    return c.prepare(data=c.tmp / "docs"), [str(c.tmp / "docs")]


@case
def data_extension_unsupported(c):
    path = c.file("book.pdf", "%PDF")
    return c.prepare(data=path), [str(path), ".pdf"]


@case
def data_empty(c):
    path = c.file("empty.txt", "")
    return c.prepare(data=path), [str(path)]


@case
def data_too_short_for_one_sequence(c):
    path = c.file("short.txt", "too short")
    return c.prepare(data=path), [str(path), "data.seq_length"]


@case
def data_too_short_for_the_splits(c):
    return c.prepare("data.num_calibration=5000"), ["num_calibration=5000"]


@case
def data_not_utf8(c):
    path = c.file("latin.txt", "hello caf\xe9 ".encode("latin-1") * 100)
    return c.prepare(data=path), [str(path), "byte offset 9"]


@case
def data_not_utf8_in_a_folder(c):
    c.file("docs/a.txt", "fine text " * 100)
    path = c.file("docs/b.txt", b"\xff\xfe not utf-8")
    return c.prepare(data=c.tmp / "docs"), [str(path), "byte offset 0"]


@case
def data_jsonl_malformed_line(c):
    path = c.file("docs.jsonl", '{"text": "a fine document"}\n{"text": oops}\n')
    return c.prepare(data=path), [str(path), "line 2"]


@case
def data_jsonl_without_the_text_field(c):
    path = c.file("docs.jsonl", '{"body": "a document"}\n')
    return c.prepare(data=path), [str(path), "line 1", "'text'"]


@case
def data_jsonl_text_not_a_string(c):
    path = c.file("docs.jsonl", '{"text": "fine"}\n{"text": "fine"}\n{"text": 3}\n')
    return c.prepare(data=path), [str(path), "line 3"]


@case
def data_jsonl_not_utf8(c):
    path = c.file("docs.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    return c.prepare(data=path), [str(path), "line 2"]


@case
def data_json_malformed(c):
    path = c.file("docs.json", '[{"text": "a"}, {oops')
    return c.prepare(data=path), [str(path)]


@case
def data_parquet_not_parquet(c):
    path = c.file("docs.parquet", "text\nnot a parquet file\n")
    return c.prepare(data=path), [str(path), "parquet"]


@case
def data_parquet_without_the_text_column(c):
    import pandas as pd

    path = c.tmp / "docs.parquet"
    pd.DataFrame({"body": ["a document"]}).to_parquet(path)
    return c.prepare(data=path), [str(path), "'text'"]


@case
def data_csv_without_the_text_column(c):
    path = c.file("docs.csv", "body\na document\n")
    return c.prepare(data=path), [str(path), "'text'"]


@case
def data_blend_weight_zero(c):
    return c.prepare(f"data.source=[{{path: {c.inputs / 'corpus.txt'}, weight: 0}}]"), ["data.source[0].weight"]


@case
def data_blend_entry_missing(c):
    blend = f"[{{path: {c.inputs / 'corpus.txt'}, weight: 1}}, {{path: {c.tmp / 'nope.jsonl'}, weight: 1}}]"
    return c.prepare(f"data.source={blend}"), [str(c.tmp / "nope.jsonl")]


# ----------------------------------------------------------------------------------- run folders, checkpoints


def _damaged_run(c, *, remove=(), empty=(), truncate=(), write=None):
    """A copy of the run folder with the files ``remove`` deleted, ``empty`` emptied, ``truncate`` cut to 100
    bytes and ``write`` ({name: text}) overwritten (names relative to the run folder)."""
    run = c.run()
    for name in remove:
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in empty:
        (run / name).write_bytes(b"")
    for name in truncate:
        (run / name).write_bytes((run / name).read_bytes()[:100])
    for name, text in (write or {}).items():
        (run / name).write_text(text)
    return run


def _score(run):
    return ["score", "--run-dir", str(run)]


@case
def checkpoint_teacher_missing(c):
    run = _damaged_run(c, remove=["teacher"])
    return _score(run), [str(run / "teacher"), "minitron prepare"]


@case
def checkpoint_arch_json_missing(c):
    run = _damaged_run(c, remove=["teacher/arch.json"])
    return _score(run), [str(run / "teacher"), "arch.json"]


@case
def checkpoint_arch_json_not_json(c):
    run = _damaged_run(c, write={"teacher/arch.json": "{"})
    return _score(run), [str(run / "teacher" / "arch.json")]


@case
def checkpoint_common_pt_empty(c):
    run = _damaged_run(c, empty=["teacher/common.pt"], remove=["teacher/manifest.json"])
    return _score(run), [str(run / "teacher"), "common.pt"]


@case
def checkpoint_metadata_deleted(c):
    run = _damaged_run(c, remove=["teacher/.metadata"])
    return _score(run), [str(run / "teacher"), ".metadata"]


@case
def checkpoint_metadata_json_deleted(c):
    run = _damaged_run(c, remove=["teacher/metadata.json"])
    return _score(run), [str(run / "teacher"), "metadata.json"]


@case
def checkpoint_shard_truncated(c):
    run = _damaged_run(c, truncate=["teacher/__0_0.distcp"])
    return _score(run), [str(run / "teacher"), "__0_0.distcp"]


@case
def checkpoint_shard_truncated_without_manifest(c):
    run = _damaged_run(c, truncate=["teacher/__0_0.distcp"], remove=["teacher/manifest.json"])
    return _score(run), [str(run / "teacher")]


@case
def run_windows_json_damaged(c):
    run = _damaged_run(c, empty=["data/windows.json"])
    return _score(run), [str(run / "data" / "windows.json")]


@case
def run_split_damaged(c):
    run = _damaged_run(c, write={"data/calibration.npy": "not numpy"})
    return _score(run), [str(run / "data" / "calibration.npy")]


@case
def run_split_missing(c):
    run = _damaged_run(c, remove=["data/calibration.npy"])
    return _score(run), [str(run / "data" / "calibration.npy")]


@case
def run_token_cache_missing(c):
    run = c.run()
    windows = json.loads((run / "data" / "windows.json").read_text())
    windows["sources"][0]["prefix"] = str(c.tmp / "cleared")
    (run / "data" / "windows.json").write_text(json.dumps(windows))
    return _score(run), [str(c.tmp / "cleared.bin")]


# --------------------------------------------------------------------------------------------------- scores


def _prune(run, *overrides):
    return ["prune", "--run-dir", str(run), *overrides]


@case
def scores_missing(c):
    run = _damaged_run(c, remove=["scores"])
    return _prune(run), [str(run / "scores"), "minitron score"]


@case
def scores_not_safetensors(c):
    run = _damaged_run(c, write={"scores/scores.safetensors": "garbage"})
    return _prune(run), [str(run / "scores"), "minitron score"]


@case
def scores_summary_missing(c):
    run = _damaged_run(c, remove=["scores/scores.json"])
    return _prune(run), [str(run / "scores"), "minitron score"]


@case
def scores_summary_not_json(c):
    run = _damaged_run(c, write={"scores/scores.json": "{"})
    return _prune(run), [str(run / "scores"), "minitron score"]


@case
def scores_tensor_missing(c):
    from safetensors.torch import load_file, save_file

    run = c.run()
    path = run / "scores" / "scores.safetensors"
    tensors = load_file(path)
    del tensors["ffn"]
    save_file(tensors, path)
    return _prune(run), [str(run / "scores"), "ffn"]


@case
def scores_of_another_model(c):
    from safetensors.torch import load_file, save_file

    run = c.run()
    path = run / "scores" / "scores.safetensors"
    save_file({**load_file(path), "hidden": torch.ones(32)}, path)
    return _prune(run), ["scores.hidden", "another model"]


# ------------------------------------------------------------------------------------------ targets and plans


@case
def prune_target_wider_than_the_teacher(c):
    return c.prepare("prune.width.hidden_size=80"), ["prune.width.hidden_size", "80"]


@case
def prune_target_heads_not_a_multiple_of_groups(c):
    return c.prepare("prune.width.num_attention_heads=3"), ["prune.width.num_attention_heads"]


@case
def prune_target_name_not_an_identifier(c):
    return c.prepare("prune.my-target.hidden_size=32"), ["my-target"]


@case
def prune_target_at_the_prune_stage(c):
    return _prune(c.run(), "prune.depth.num_layers=9"), ["prune.depth.num_layers", "9"]


@case
def distill_student_not_pruned(c):
    run = _damaged_run(c, remove=["pruned/width"])
    return ["distill", "--run-dir", str(run)], [str(run / "pruned" / "width"), "minitron prune"]


@case
def plan_gpus_not_a_multiple_of_the_layout(c):
    return ["plan", "--recipe", DEMO, "--gpus", "3", "parallel.tensor_model_parallel_size=2"], ["--gpus 3"]


@case
def plan_model_without_config(c):
    return ["plan", "--recipe", DEMO, f"model.source={c.tmp}"], [str(c.tmp), "config.json"]


# --------------------------------------------------------------------------------------------- parallel sizes


@case
def parallel_tp_not_dividing_the_world_size(c):
    return c.prepare("parallel.tensor_model_parallel_size=3"), ["tensor_model_parallel_size", "3"]


@case
def parallel_tp_zero(c):
    return c.prepare("parallel.tensor_model_parallel_size=0"), ["parallel.tensor_model_parallel_size"]


@case
def parallel_pp_zero(c):
    return c.prepare("parallel.pipeline_model_parallel_size=0"), ["parallel.pipeline_model_parallel_size"]


@case
def parallel_sequence_parallel_without_tp(c):
    return c.prepare("parallel.sequence_parallel=true"), ["parallel.sequence_parallel"]


@case(nproc=2)
def parallel_target_not_sharding_over_tp(c):
    """Found on every rank after start-up: the pruned FFN of 63 neurons cannot be split over 2 TP ranks."""
    return (c.prepare("parallel.tensor_model_parallel_size=2", "prune.width.ffn_hidden_size=63"),
            ["prune.width.ffn_hidden_size", "63"])


@case(nproc=2)
def parallel_data_error_on_rank0_only(c):
    """Only rank 0 reads the corpus: the other rank must fail with it, not wait."""
    path = c.file("latin.txt", "caf\xe9 ".encode("latin-1") * 100)
    return c.prepare("parallel.tensor_model_parallel_size=2", data=path), [str(path), "byte offset 3"]


# ------------------------------------------------------------------------------------------------ training


def _train_state(c, latest: str):
    run = c.run()
    state = run / "distilled" / "width" / "train_state"
    state.mkdir(parents=True)
    (state / "latest").write_text(latest)
    return ["distill", "--run-dir", str(run)], state / "latest"


@case
def train_state_latest_empty(c):
    argv, latest = _train_state(c, "")
    return argv, [str(latest)]


@case
def train_state_latest_names_no_checkpoint(c):
    argv, latest = _train_state(c, "iter_0000004\n")
    return argv, [str(latest), "iter_0000004"]


@case
def train_loss_not_finite(c):
    return (["correct-teacher", "--run-dir", str(c.run()), "correct.lr=1e12", "correct.min_lr=1e11",
             "correct.steps=3", "correct.warmup_steps=0"], ["training step", "learning rate"])


NUM_CASES = len(CASES)


# ------------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache folder of this module's own (tokenised corpora), for this process and the CLI processes it runs."""
    saved = os.environ.get("MINITRON_CACHE_DIR")
    os.environ["MINITRON_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        del os.environ["MINITRON_CACHE_DIR"]
    else:
        os.environ["MINITRON_CACHE_DIR"] = saved


def call(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of the CLI (or of `python -m nemo_minitron.bridge` for argv "bridge ...") run in this
    process; a SystemExit is reported as the interpreter would. It must leave no process group behind."""
    capsys.readouterr()
    main = bridge_cli.main if argv[0] == "bridge" else cli.main
    try:
        code = main(argv[1:] if argv[0] == "bridge" else argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        print(stop.code, file=sys.stderr)
    from megatron.core import parallel_state

    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tiny_hf_run_inputs, tmp_path_factory, cache_dir):
    """The tiny recipe prepared, scored and pruned (in this process)."""
    run = tmp_path_factory.mktemp("bad_inputs") / "run"
    assert cli.main(["prepare", "--recipe", DEMO, *tiny_overrides(tiny_hf_run_inputs, run)]) == 0
    for stage in ("score", "prune"):
        assert cli.main([stage, "--run-dir", str(run)]) == 0
    return run


def check_reported(code: int, stderr: str, culprits: list[str]) -> None:
    """Exit code 1, no traceback, one error line naming every culprit."""
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


@pytest.mark.parametrize("name", [name for name, (_, nproc) in CASES.items() if nproc == 1])
def test_bad_input(name, tiny_hf_run_inputs, finished_run, tmp_path, capsys):
    argv, culprits = CASES[name][0](Case(tiny_hf_run_inputs, finished_run, tmp_path))
    check_reported(*call(argv, capsys), culprits)


@pytest.mark.parametrize("name", [name for name, (_, nproc) in CASES.items() if nproc > 1])
def test_bad_input_on_ranks(name, tiny_hf_run_inputs, finished_run, tmp_path):
    """Under torch.distributed.run every rank exits (no rank waits for a failed one) and one line is printed;
    the launcher's own report of the exit is the only traceback."""
    build, nproc = CASES[name]
    argv, culprits = build(Case(tiny_hf_run_inputs, finished_run, tmp_path))
    proc = run_minitron(*argv, nproc=nproc, timeout=300)
    check_reported(proc.returncode, LAUNCHER_TRACEBACK.sub("", proc.stderr), culprits)


def test_a_bad_input_in_a_fresh_process(tmp_path):
    """The CLI's own process: exit code 1 and the one line, nothing else of the error."""
    argv, culprits = recipe_yaml_syntax_error(Case(None, None, tmp_path))
    proc = run_minitron(*argv, timeout=300)
    check_reported(proc.returncode, proc.stderr, culprits)


def test_debug_raises_with_the_traceback(tmp_path):
    argv, _ = recipe_yaml_syntax_error(Case(None, None, tmp_path))
    with pytest.raises(ValueError, match="YAML syntax error"):
        cli.main([*argv, "--debug"])
    assert not dist.is_initialized()
