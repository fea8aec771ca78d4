"""Submit one Megatron-Bridge stage of a Minitron run to a Slurm cluster with NeMo-Run, in the nemo-minitron image.

    python examples/nemo_run_slurm.py distill --recipe /opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml \\
        --account ACCT --partition batch --nodes 2 --image REGISTRY/nemo-minitron:latest \\
        --host login.cluster --user me --job-dir /lustre/me/nemo-run \\
        run_dir=/results/llama31_8b_to_4b distill.steps=200 [--dryrun]

The run folder must have been prepared (`minitron prepare`), and scored before distill. Each Slurm task is one rank
(ntasks_per_node == gpus_per_node, no torchrun): the job script exports RANK / WORLD_SIZE / LOCAL_RANK from
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and MASTER_ADDR / MASTER_PORT from the first node of the allocation,
which is what `python -m nemo_minitron.bridge` reads. Without --host the job is submitted with the local sbatch
(run this on a login node). NeMo-Run is needed only by main(): it comes with the NeMo Framework container, or
`pip install nemo_run` on the machine that submits.
"""

from __future__ import annotations

import argparse
import shlex
import sys

STAGES = ("correct-teacher", "score", "prune", "distill")
DEFAULT_IMAGE = "nemo-minitron:latest"  # built from docker/Dockerfile (a registry path or an enroot .sqsh file)
DEFAULT_MOUNTS = ("/checkpoints:/checkpoints", "/data:/data", "/results:/results")
MASTER_PORT = 29500
# Per task, inside the container: this task's rank from Slurm, for torch.distributed's env:// rendezvous.
RANK_ENV = "export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID"
# Once, in the batch script on the first node (where scontrol exists); srun passes it to every task.
SETUP_LINES = ('export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
               f"export MASTER_PORT={MASTER_PORT}")


def job_spec(stage: str, recipe: str, *, account: str, partition: str | None, nodes: int = 1, gpus_per_node: int = 8,
             image: str = DEFAULT_IMAGE, mounts=DEFAULT_MOUNTS, time: str = "04:00:00", overrides=()) -> dict:
    """The job as plain data: ``executor`` (keyword arguments of ``nemo_run.SlurmExecutor``, less tunnel and
    packager), ``script`` (of ``nemo_run.Script``), ``command`` (what every rank runs) and ``name``."""
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    if not recipe:
        raise ValueError("recipe: give the recipe YAML file (a path inside the container)")
    if not account:
        raise ValueError("account: give the Slurm account")
    for field, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: must be an integer >= 1, got {value!r}")
    overrides = list(overrides)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"overrides: {item!r} is not of the form key=value")
    command = ["python", "-m", "nemo_minitron.bridge", stage, "--recipe", recipe, *overrides]
    return {
        "name": f"minitron-{stage}",
        "executor": {
            "account": account,
            "partition": partition,
            "nodes": nodes,
            "ntasks_per_node": gpus_per_node,  # one task per GPU, each one rank
            "gpus_per_node": gpus_per_node,
            "exclusive": True,
            "time": time,
            "container_image": image,
            "container_mounts": list(mounts),
            "setup_lines": SETUP_LINES,
        },
        "script": {"inline": f"{RANK_ENV}\nexec {shlex.join(command)}\n", "entrypoint": "bash"},
        "command": command,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--recipe", required=True, help="recipe YAML file, a path inside the container")
    parser.add_argument("--account", required=True)
    parser.add_argument("--partition")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--mount", action="append", help=f"container mount SRC:DST (repeat; default {DEFAULT_MOUNTS})")
    parser.add_argument("--host", help="submit through SSH to this login node (else the local sbatch)")
    parser.add_argument("--user", help="SSH user (with --host)")
    parser.add_argument("--job-dir", default="", help="NeMo-Run's job folder, on a filesystem the nodes share")
    parser.add_argument("--dryrun", action="store_true", help="print the sbatch script and exit")
    parser.add_argument("overrides", nargs="*", help="key=value, as for python -m nemo_minitron.bridge")
    args = parser.parse_intermixed_args(argv)
    try:
        spec = job_spec(args.stage, args.recipe, account=args.account, partition=args.partition, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, image=args.image, mounts=args.mount or DEFAULT_MOUNTS,
                        time=args.time, overrides=args.overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.host and not (args.user and args.job_dir):
        parser.error("--host needs --user and --job-dir")

    import nemo_run as run

    if args.host:
        tunnel = run.SSHTunnel(host=args.host, user=args.user, job_dir=args.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=args.job_dir)
    # The image already has nemo-minitron installed: ship no code (run.Packager() packages nothing).
    executor = run.SlurmExecutor(**spec["executor"], tunnel=tunnel, packager=run.Packager())
    run.run(run.Script(**spec["script"]), executor=executor, name=spec["name"], dryrun=args.dryrun, detach=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
