"""`swallowctl train --num-processes N`: start N training processes through Accelerate.

The processes are Accelerate's (torch's elastic launcher, as `accelerate launch` starts them);
each runs `python -m swallowctl train` with the same config. What this module adds: the
launch arguments, a clean exit (the workers' exit code, no launcher traceback), and signals that
reach every worker once, so Ctrl-C stops them all after the same update with a checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swallowctl.core.errors import UsageError

log = logging.getLogger(__name__)

DEEPSPEED_STAGES = {"zero2": 2}
_LAUNCHED = "SWALLOWCTL_LAUNCHED"  # set for the workers this module starts


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process, from the launcher's environment (no torch import)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def started_by_us() -> bool:
    """True in a worker of `swallowctl train --num-processes` (plan and inputs already checked)."""
    return os.environ.get(_LAUNCHED) == "1"


def planned_processes(num_processes: int | None, accelerate_config: Path | None) -> int:
    """How many processes the launch will start (the flag, else the config file's count)."""
    if num_processes is not None or accelerate_config is None:
        return num_processes or 1
    import yaml

    try:
        data = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(
            f"{accelerate_config}: not a readable Accelerate config ({e})",
            hint="write one with `accelerate config`, or pass --num-processes",
        ) from None
    return int(data.get("num_processes", 1)) if isinstance(data, dict) else 1


def check_deepspeed(option: str | None) -> None:
    """`--deepspeed zero2` needs the deepspeed package: say so before anything loads."""
    if option is not None and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(
            f"--deepspeed {option} needs DeepSpeed, which is not installed",
            hint="pip install deepspeed (CUDA machines only), or leave out --deepspeed",
        )


def launch_args(
    num_processes: int | None,
    accelerate_config: Path | None,
    deepspeed: str | None,
    train_args: Sequence[str],
) -> list[str]:
    """`accelerate launch` arguments that run `python -m swallowctl <train_args>`."""
    args: list[str] = []
    if accelerate_config is not None:
        args += ["--config_file", str(accelerate_config)]
    if num_processes is not None:
        args += ["--num_processes", str(num_processes)]
    if deepspeed is not None:
        args += ["--use_deepspeed", "--zero_stage", str(DEEPSPEED_STAGES[deepspeed])]
    elif accelerate_config is None:
        # Without it, Accelerate starts one plain process on a machine without several GPUs.
        args += ["--multi_gpu"]
    if accelerate_config is None:
        # Stated, so Accelerate does not warn that it picked defaults; port 0: any free one.
        args += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        args += ["--main_process_port", "0"]
    return [*args, "-m", "swallowctl", *train_args]


def launch(args: list[str], *, verbose: bool = False) -> int:
    """Run the workers; return their exit code (rank 0's when it failed, else the first)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not verbose:  # the launcher's own notices (ports, worker exits): our errors say it
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed", "accelerate")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    parsed = launch_command_parser().parse_args(args)
    _check_gpus(parsed.num_processes)
    # The elastic agent would turn one Ctrl-C into a SIGINT to every worker and a SIGKILL 30 s
    # later, mid-update. Instead each signal goes to every worker once: they agree to stop
    # after the same update and save (a second Ctrl-C stops them at once).
    parsed.signals_to_handle = "SIGHUP,SIGQUIT"
    os.environ[_LAUNCHED] = "1"
    old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch_command(parsed)
    except subprocess.CalledProcessError as e:  # a config file for one process: a plain child
        return e.returncode if e.returncode > 0 else 1
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        log.debug("worker exit codes: %s", codes)
        code = codes.get(0, 0)
        if code <= 0:
            code = next((c for _, c in sorted(codes.items()) if c > 0), 1)
        return code
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0


def _check_gpus(num_processes: int | None) -> None:
    """On a CUDA machine each process needs a GPU of its own (NCCL refuses to share one)."""
    import torch

    count = torch.cuda.device_count()
    if num_processes and count and num_processes > count:
        raise UsageError(
            f"--num-processes {num_processes} needs {num_processes} GPUs; this machine has {count}",
            hint=f"use --num-processes {count} or fewer (CUDA_VISIBLE_DEVICES picks which)",
        )


def _forward(signum: int, _frame: Any) -> None:
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)
