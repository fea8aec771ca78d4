"""kill -9 at random moments of a training run (tiny model, a checkpoint every step), resume each time: the final
weights and loss history equal an uninterrupted run's bitwise, no resume loads a half-written checkpoint (each
checks its manifest), and no process of a killed run outlives it."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
KILLS = 20
STEPS = 40

WORKER = """
import json, sys, torch
from safetensors.torch import save_file
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.runtime.distributed import init_distributed
if __name__ == "__main__":
    out = sys.argv[1]
    init_distributed(seed=3)
    arch = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=64, kv_channels=8, max_position_embeddings=32, tie_word_embeddings=True)
    model = build_gpt_model(arch)
    seqs = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(0))
    print("ready", flush=True)
    cfg = TrainConfig(steps=%d, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                      save_interval=1)
    history = train(model, seqs, cfg, checkpoint_dir=out + "/ckpt", arch=arch, progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
               and "_extra_state" not in k}, out + "/final.safetensors")
    open(out + "/history.json", "w").write(json.dumps([{k: v for k, v in h.items() if k != "seconds"}
                                                       for h in history]))
""" % STEPS


def _start(out: Path) -> subprocess.Popen:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


SUMMARY = {}  # of the last run of the test: what benchmarks/bench_reliability.py records


def _running(process: psutil.Process) -> bool:
    """Still running: a zombie has exited (only its exit status waits for a parent to read it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _result(out: Path):
    return load_file(str(out / "final.safetensors")), json.loads((out / "history.json").read_text())


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_then_resume_is_exact(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    proc = _start(reference)
    _finish(proc)
    run_seconds = time.perf_counter() - start
    expected_weights, expected_history = _result(reference)

    rng = random.Random(1234)
    kills, runs, orphans, resumes_exact = 0, 0, [], 0
    SUMMARY.clear()
    while kills < KILLS:
        out = tmp_path / f"run{runs}"
        out.mkdir()
        runs += 1
        run_kills = 0
        while True:  # kill this run at random moments until it gets through to the end
            proc = _start(out)
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, run_seconds / 6) if kills < KILLS else 0)
            if kills >= KILLS or proc.poll() is not None:
                _finish(proc)  # a resume that met a half-written checkpoint fails here, naming it
                break
            children = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            run_kills += 1
            _, alive = psutil.wait_procs(children, timeout=10)
            orphans += [p.pid for p in alive if _running(p)]
        weights, history = _result(out)
        assert history == expected_history, f"run {runs}"
        assert weights.keys() == expected_weights.keys()
        for name, tensor in expected_weights.items():
            assert torch.equal(weights[name], tensor), f"run {runs}: {name}"
        assert not list((out / "ckpt").glob("*.partial")) and not (out / "ckpt" / "writer.lock").exists()
        resumes_exact += run_kills  # every resume of this run led to the uninterrupted run's result
    assert not orphans, f"processes outlived their killed run: {orphans}"
    SUMMARY.update(kills=kills, resumes_exact=resumes_exact, half_written_loaded=0, orphans=0)
