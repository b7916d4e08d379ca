"""Launch a training stage: in this process (CPU, or one GPU) or through the `deepspeed` launcher.

    python startup_stage1.py --config configs/13b_stage1.yaml --gpus 8
    python startup_stage1.py --config configs/13b_stage1.yaml --hostfile hosts.txt   # several nodes
    python startup_stage1.py --config tiny_stage1                                    # CPU, one process
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

from chatterbox.config import ConfigError, add_config_arguments, config_from_args
from chatterbox.train.tracking import require_installed

WORKER_MODULE = "chatterbox.train.run"


def parse_args(stage: int, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"ChatterBox stage-{stage} training")
    add_config_arguments(parser, default=f"configs/13b_stage{stage}.yaml")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs per node (default: all visible; 0 or a CPU config runs one CPU process)")
    parser.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs")
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--resume", default=None, help='"auto" or a checkpoint directory (sets train.resume)')
    parser.add_argument("--overwrite", action="store_true",
                        help="start from step 0 even where output_dir holds checkpoints (they are moved aside, "
                             "to checkpoints.replaced-<time>/; sets train.overwrite_checkpoints)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many more global steps (a checkpoint is written there)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser.parse_args(argv)


def worker_command(args: argparse.Namespace) -> list[str]:
    cmd = ["-m", WORKER_MODULE, "--config", str(args.config)]
    for override in args.overrides:
        cmd += ["--set", override]
    if args.resume:
        cmd += ["--set", f"train.resume={args.resume}"]
    if args.overwrite:
        cmd += ["--set", "train.overwrite_checkpoints=true"]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    return cmd


def build_command(stage: int, args: argparse.Namespace) -> list[str]:
    cfg = config_from_args(args)
    if cfg.train.stage != stage:
        raise SystemExit(f"{args.config} is a stage-{cfg.train.stage} config; use startup_stage{cfg.train.stage}.py")
    try:  # here, not once the workers have built the model
        require_installed(cfg.train.report_to)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    import torch

    visible = torch.cuda.device_count()
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and visible == 0) or args.gpus == 0
    gpus = visible if args.gpus is None else args.gpus
    if on_cpu or (gpus == 1 and args.hostfile is None):
        return [sys.executable] + worker_command(args)
    if gpus > visible and args.hostfile is None:
        raise SystemExit(f"--gpus {gpus} but only {visible} GPU(s) are visible")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if gpus:
        cmd += ["--num_gpus", str(gpus)]
    if args.master_port:
        cmd += ["--master_port", str(args.master_port)]
    module_args = worker_command(args)
    return cmd + ["--module", module_args[1]] + module_args[2:]


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, whatever kills it (Linux's
    PR_SET_PDEATHSIG), so no orphaned run keeps writing checkpoints."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_until_done(cmd: list[str]) -> int:
    """Run ``cmd``; SIGTERM/SIGINT to the launcher are passed on to it, and it ends if the launcher is killed."""
    child = subprocess.Popen(cmd, env=os.environ.copy(), preexec_fn=_end_with_parent)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(stage: int, argv=None) -> int:
    args = parse_args(stage, argv)
    cmd = build_command(stage, args)
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run_until_done(cmd)
