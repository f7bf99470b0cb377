"""swallowctl's PPO against TRL 1.12's `trl.experimental.ppo`, same work, same CPU, one run.

    .venv/bin/python benchmarks/ppo_vs_trl.py                  # about a minute on 2 idle cores
    .venv/bin/python benchmarks/ppo_vs_trl.py --updates 20 --batch 16 --response-length 32
    .venv/bin/python benchmarks/ppo_vs_trl.py --repeat 2 --wait-quiet 900   # a shared machine
    .venv/bin/python benchmarks/ppo_vs_trl.py --trl-venv ~/trl112 --keep   # keep logs and runs

TRL removed its PPO trainer after 1.12, so TRL 1.12 lives in a throwaway venv of its own
(`--trl-venv`, created and filled on first use with the pins in `TRL_PINS` and the project's own
torch build): never in the project venv. Run this file with the project's Python.

Both sides train the same thing:
- policy `builtin:tiny-ja` (fp32 weights: on CPU neither side loads 4-bit) with a LoRA adapter
  (r, alpha, all-linear, dropout 0); the reference is the policy with the adapter disabled;
- reward `builtin:tiny-ja-reward` (ours: a reward `model:` entry naming its directory; TRL: its
  `reward_model`);
- the first N chat prompts of `builtin:prompts-ja` (mode `chat`, so with its system prompt),
  rendered through the tiny model's chat template;
- the same samples per update (per-device batch x gradient accumulation x mini-batches), response
  length, PPO epochs, mini-batches, learning rate (linear schedule, AdamW eps 1e-5), KL coef,
  sampling (temperature 0.7, top-p 1, top-k 0), rollout forward chunk, seed, number of updates;
- gradient checkpointing off on both (TRL 1.12's PPOTrainer never turns it on itself);
  `--gradient-checkpointing` turns it on for both (TRL: on its policy and value model);
- the same torch thread count (`--threads`, also OMP/MKL_NUM_THREADS), CUDA hidden from both.

What differs is each trainer's own design: TRL trains a separate value model (a full
`AutoModelForSequenceClassification` from the policy's directory with num_labels=1, as TRL's
examples do) and stops generation on the tokenizer's EOS only; swallowctl puts a value head on
the policy's backbone, stops on every Llama-3.1 stop id, clips gradients, and scores rewards from
the decoded text through the reward model's chat template.

Each side runs as its own child process (swallowctl: the project's Python; TRL: the throwaway
venv's), one after the other; with `--repeat N`, N rounds of (swallowctl, TRL) and each side's
fastest round is shown (every round's episodes/s is listed too). Printed, for each:
- training loop: wall time of the one call `PPOTrainer.run()` (swallowctl) / `PPOTrainer.train()`
  (TRL), time.perf_counter() around it inside the child. Model, tokenizer and data loading and
  trainer construction come before it and are not counted; every rollout, reward scoring and PPO
  epoch is; swallowctl's loop also writes its metrics/samples files and final adapter, TRL's saves
  nothing (save_strategy "no", num_sample_generations 0, report_to none);
- episodes/s = episodes (updates x samples per update) / training loop, and also "after update 1":
  from the end of update 1 to the end of the last (per-update callbacks: our `on_update`, TRL's
  `on_step_end`), which leaves out first-call warm-up and the final save;
- peak RSS: the child's whole-life maximum resident set (ru_maxrss from os.wait4 on that child
  alone: imports, loading and training), and the high-water mark just before the loop (VmHWM);
- the ratios ours/TRL for speed and memory, and whether the targets are met: at least 2x TRL's
  episodes/s and at most 0.7x its peak RSS;
- to judge the timings: each loop's CPU time (time.process_time), and how many cores other
  processes kept busy while each child ran (/proc/stat busy time less the child's own). With
  as many torch threads as cores, other work on the machine slows a side many-fold: compare only
  runs where that figure is near 0 for both sides. `--wait-quiet S` waits (up to S seconds)
  before each side until other processes use under 0.15 cores, and says whether it got there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRL_PINS: tuple[str, ...] = (
    # trl 1.12.0 is the last release with trl.experimental.ppo. Its floors are transformers>=4.56.2,
    # accelerate>=1.4.0, datasets>=4.7.0 (peft>=0.8.0 for the peft extra); pinned here: the newest
    # release of each that was out when trl 1.12.0 was (2026-08-26).
    "trl==1.12.0",
    "transformers==5.16.1",
    "accelerate==1.14.0",
    "peft==0.20.0",
    "datasets==5.0.1",
)
DEFAULT_TRL_VENV = Path(tempfile.gettempdir()) / "swallowctl-bench-trl112"
SPEED_TARGET = 2.0  # ours / TRL episodes per second, at least
MEMORY_TARGET = 0.7  # ours / TRL peak RSS, at most
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything both sides are given; printed with the results."""

    prompts: int
    batch: int  # per-device micro-batch
    grad_accum: int
    mini_batches: int
    ppo_epochs: int
    response_length: int
    lr: float
    updates: int
    threads: int
    seed: int
    lora_r: int
    lora_alpha: int
    kl_coef: float
    temperature: float
    gradient_checkpointing: bool

    @property
    def samples_per_update(self) -> int:
        return self.batch * self.grad_accum * self.mini_batches

    @property
    def episodes(self) -> int:
        return self.updates * self.samples_per_update


@dataclass
class Side:
    """One child's outcome."""

    name: str
    rc: int | None = None
    peak_rss: int | None = None  # bytes, ru_maxrss of this child
    wall_s: float | None = None  # the child's whole life
    others_cores: float | None = None  # CPU cores other processes kept busy meanwhile
    quiet: str | None = None  # how waiting for an idle machine went before the start
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rc == 0 and "loop_s" in self.report


# --- the two runners (each written to the temp dir and run in its own process) ------------------

_COMMON = '''
import json, os, sys, time


def vm(key):
    """VmHWM / VmRSS of this process in bytes (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


settings = json.load(open(sys.argv[1]))
report_path = sys.argv[2]
import torch

torch.set_num_threads(settings["threads"])
rss_torch = vm("VmRSS")  # the floor: Python + torch, before anything either trainer brings
t_start = time.perf_counter()
'''

OURS_RUNNER = (
    _COMMON
    + """
from swallowctl.core.config import load_config
from swallowctl.ppo.trainer import PPOTrainer

# A run directory of this round's own (the trainer refuses to mix two runs in one).
run_dir = report_path.removesuffix(".json") + "-run"
cfg = load_config(None, [*settings["ours_overrides"], f"output.dir={run_dir}"]).config
stamps, metrics = [], []


def on_update(update, stats):
    stamps.append(time.perf_counter())
    metrics.append(stats)


trainer = PPOTrainer(cfg, on_update=on_update)
load_s = time.perf_counter() - t_start
hwm_before, rss_before = vm("VmHWM"), vm("VmRSS")
t0, c0 = time.perf_counter(), time.process_time()
result = trainer.run()
t1, c1 = time.perf_counter(), time.process_time()
last = metrics[-1] if metrics else {}
json.dump({
    "load_s": load_s, "loop_s": t1 - t0, "update_end_s": [s - t0 for s in stamps],
    "rss_after_torch": rss_torch, "loop_cpu_s": c1 - c0,
    "updates": result.updates_done, "hwm_before_loop": hwm_before, "rss_before_loop": rss_before,
    "hwm_end": vm("VmHWM"), "threads": torch.get_num_threads(), "torch": torch.__version__,
    "device": trainer.device, "samples_per_update": trainer.plan.sizes.samples_per_update,
    "last_score": last.get("objective/scores"), "last_eos": last.get("val/num_eos_tokens"),
}, open(report_path, "w"))
"""
)

TRL_RUNNER = (
    _COMMON
    + """
from datasets import Dataset
from peft import LoraConfig
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)
import transformers, trl, peft, accelerate, datasets
from trl.experimental.ppo import PPOConfig, PPOTrainer

s = settings
tok = AutoTokenizer.from_pretrained(s["policy_dir"], padding_side="left")
# As swallowctl's rollout.encode_prompts: chat template text, then tokens without a second BOS.
ids = [
    tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    for m in s["messages"]
]
dataset = Dataset.from_dict({"input_ids": ids})
f32 = torch.float32
policy = AutoModelForCausalLM.from_pretrained(s["policy_dir"], dtype=f32)
# TRL's separate value model: the policy's directory as a 1-label classifier, as TRL's examples do.
SeqCls = AutoModelForSequenceClassification
value = SeqCls.from_pretrained(s["policy_dir"], num_labels=1, dtype=f32)
reward = SeqCls.from_pretrained(s["reward_dir"], num_labels=1, dtype=f32)
if s["gradient_checkpointing"]:
    for m in (policy, value):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                  target_modules="all-linear", task_type="CAUSAL_LM")
args = PPOConfig(
    output_dir=report_path.removesuffix(".json") + "-run",
    per_device_train_batch_size=s["batch"],
    gradient_accumulation_steps=s["grad_accum"],
    num_mini_batches=s["mini_batches"],
    num_ppo_epochs=s["ppo_epochs"],
    total_episodes=s["episodes"],
    local_rollout_forward_batch_size=s["batch"],
    response_length=s["response_length"],
    stop_token="eos",
    temperature=s["temperature"],
    learning_rate=s["lr"],
    lr_scheduler_type="linear",
    warmup_steps=0,
    weight_decay=0.0,
    adam_epsilon=1e-5,
    kl_coef=s["kl_coef"],
    seed=s["seed"],
    num_sample_generations=0,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    bf16=False,
    fp16=False,
    use_cpu=True,
    gradient_checkpointing=s["gradient_checkpointing"],
)
stamps, logs = [], []


class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        stamps.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            all_logs.append(dict(logs))


all_logs = logs
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None,
                     reward_model=reward, train_dataset=dataset, value_model=value,
                     peft_config=lora, callbacks=[Clock()])
load_s = time.perf_counter() - t_start
hwm_before, rss_before = vm("VmHWM"), vm("VmRSS")
t0, c0 = time.perf_counter(), time.process_time()
trainer.train()
t1, c1 = time.perf_counter(), time.process_time()
last = [l for l in logs if "objective/scores" in l]
last = last[-1] if last else {}
json.dump({
    "load_s": load_s, "loop_s": t1 - t0, "update_end_s": [x - t0 for x in stamps],
    "rss_after_torch": rss_torch, "loop_cpu_s": c1 - c0,
    "updates": args.num_total_batches, "hwm_before_loop": hwm_before, "rss_before_loop": rss_before,
    "hwm_end": vm("VmHWM"), "threads": torch.get_num_threads(), "torch": torch.__version__,
    "device": str(trainer.accelerator.device), "samples_per_update": args.batch_size,
    "last_score": last.get("objective/scores"), "last_eos": last.get("val/num_eos_tokens"),
    "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                 "peft": peft.__version__, "accelerate": accelerate.__version__,
                 "datasets": datasets.__version__, "torch": torch.__version__},
}, open(report_path, "w"))
"""
)


# --- the throwaway TRL venv ---------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _installed(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n        out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError:\n        out[n] = None\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def _pin_name_version(pin: str) -> tuple[str, str]:
    name, _, version = pin.partition("==")
    return name, version


def ensure_trl_venv(venv: Path, torch_pin: str, pip_args: list[str]) -> dict[str, str | None]:
    """Create `venv` if missing and install the pins unless they are already there."""
    python = venv_python(venv)
    if not python.exists():
        print(f"creating the throwaway TRL venv {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [torch_pin, *TRL_PINS]
    wanted = dict(_pin_name_version(p) for p in pins)
    have = _installed(python, list(wanted))
    if any(have[n] != v for n, v in wanted.items()):
        print(f"installing into {venv}: {' '.join(pins)} (a minute or two) ...", flush=True)
        cmd = [str(python), "-m", "pip", "install", "--quiet", *pip_args, *pins]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"pip install into {venv} failed:\n{_tail(done.stdout + done.stderr)}\n"
                "(pass --torch-pin / --pip-arg, e.g. --pip-arg=--extra-index-url="
                "https://download.pytorch.org/whl/cpu, for a CPU torch build)"
            )
        have = _installed(python, list(wanted))
    wrong = {n: have[n] for n, v in wanted.items() if have[n] != v}
    if wrong:
        raise RuntimeError(f"{venv} holds {wrong}, not the pins {pins}")
    return have


# --- running the children -----------------------------------------------------------------------


def child_env(threads: int, *, keep_pythonpath: bool) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ACCELERATE_") and (keep_pythonpath or k != "PYTHONPATH")
    }
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",  # both on CPU
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_child(
    side: Side, cmd: list[str], env: dict[str, str], log: Path, timeout: float, quiet_s: float
) -> None:
    """Run one child, wait for it alone (os.wait4: its own rusage), read its JSON report."""
    report = Path(cmd[-1])
    if quiet_s > 0:
        print(f"  waiting up to {quiet_s:.0f}s for the machine to go idle ...", flush=True)
    side.quiet = wait_quiet(quiet_s)
    busy0, start = _busy_cpu_s(), time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    side.error = f"killed after the {timeout:.0f}s timeout"
                    break
                time.sleep(0.1)
        except BaseException:  # Ctrl-C / SIGTERM here: take the child (its own session) along
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    side.wall_s = time.monotonic() - start
    busy1 = _busy_cpu_s()
    if busy0 is not None and busy1 is not None and side.wall_s > 0:
        mine = usage.ru_utime + usage.ru_stime
        side.others_cores = max(0.0, busy1 - busy0 - mine) / side.wall_s
    side.rc = proc.returncode
    # ru_maxrss is KiB on Linux, bytes on macOS.
    side.peak_rss = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    if side.rc != 0 and side.error is None:
        side.error = f"exit code {side.rc}:\n{_tail(log.read_text(errors='replace'))}"
    if side.error is None:
        try:
            side.report = json.loads(report.read_text())
        except (OSError, ValueError) as e:
            side.error = f"no report ({e}):\n{_tail(log.read_text(errors='replace'))}"
    if side.ok:
        r = side.report
        print(
            f"  {side.name}: loop {r['loop_s']:.2f}s, {len(r['update_end_s'])} updates, "
            f"peak RSS {(side.peak_rss or 0) / MIB:.1f} MiB, "
            f"other processes {_fmt(side.others_cores)} cores",
            flush=True,
        )
    else:
        print(f"  {side.name}: failed", flush=True)


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, cores: float = 0.15, window_s: float = 3.0) -> str:
    """Wait up to `limit_s` until the machine is idle (other work below `cores` CPU cores) for two
    windows in a row; say how it went. Applied before every child alike."""
    if limit_s <= 0:
        return "not checked"
    end, calm = time.monotonic() + limit_s, 0
    busy = _busy_cpu_s()
    while busy is not None:
        time.sleep(window_s)
        now = _busy_cpu_s()
        if now is None:
            break
        calm = calm + 1 if (now - busy) / window_s < cores else 0
        busy = now
        if calm >= 2:
            return "quiet"
        if time.monotonic() > end:
            return f"no ({limit_s:.0f}s)"
    return "unknown"


def _tail(text: str, lines: int = 25) -> str:
    return textwrap.indent("\n".join(text.strip().splitlines()[-lines:]), "    ")


# --- inputs -------------------------------------------------------------------------------------


def chat_messages(n: int) -> list[list[dict[str, str]]]:
    """The first `n` chat prompts of builtin:prompts-ja, as the policy sees them."""
    from swallowctl.core.config import load_config
    from swallowctl.ppo.data import load_prompts

    mode = load_config(None).config.mode("chat")
    rows = load_prompts("builtin:prompts-ja", mode, mode_name="chat", limit=None)
    if len(rows) < n:
        raise SystemExit(f"--prompts {n}: builtin:prompts-ja has only {len(rows)} chat prompts")
    return [r.messages for r in rows[:n]]


def ours_overrides(s: Settings, prompts_file: Path, reward_dir: Path) -> list[str]:
    """swallowctl's `--set` items for the settings (the runner adds each round's output.dir)."""
    return [
        "model.name_or_path=builtin:tiny-ja",
        f"rewards.0.model={reward_dir}",
        f"data.prompts={prompts_file}",
        "data.mode=chat",
        f"generation.max_new_tokens={s.response_length}",
        f"generation.temperature={s.temperature}",
        "generation.top_p=1.0",
        "generation.top_k=0",
        f"lora.r={s.lora_r}",
        f"lora.alpha={s.lora_alpha}",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
        "ppo.algorithm=ppo",
        f"ppo.lr={s.lr}",
        "ppo.lr_scheduler_type=linear",
        "ppo.warmup_ratio=0.0",
        "ppo.weight_decay=0.0",
        f"ppo.per_device_train_batch_size={s.batch}",
        f"ppo.grad_accum_steps={s.grad_accum}",
        f"ppo.num_mini_batches={s.mini_batches}",
        f"ppo.ppo_epochs={s.ppo_epochs}",
        f"ppo.total_updates={s.updates}",
        f"ppo.local_rollout_forward_batch_size={s.batch}",
        f"ppo.gradient_checkpointing={str(s.gradient_checkpointing).lower()}",
        f"ppo.kl_coef={s.kl_coef}",
        f"ppo.seed={s.seed}",
        f"output.save_steps={s.updates + 1}",  # no intermediate checkpoints; final/ only
        "logging.report_to=[]",
    ]


# --- the report ---------------------------------------------------------------------------------


def _steady(side: Side, per_update: int) -> float | None:
    ends = side.report.get("update_end_s") or []
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return (len(ends) - 1) * per_update / (ends[-1] - ends[0])


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def print_report(
    s: Settings, ours: Side, trl: Side, extra: dict[str, str], failed: list[Side]
) -> None:
    print("\n== settings (both sides) ==")
    for k, v in asdict(s).items():
        print(f"  {k}: {v}")
    print(f"  samples per update: {s.samples_per_update}, episodes: {s.episodes}")
    for k, v in extra.items():
        print(f"  {k}: {v}")

    sides = [ours, trl]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[Any], spec: str = ".2f") -> None:
        rows.append((label, [_fmt(v, spec) for v in values]))

    eps = [
        s.episodes / x.report["loop_s"] if x.ok and x.report["loop_s"] > 0 else None for x in sides
    ]
    steady = [_steady(x, s.samples_per_update) if x.ok else None for x in sides]
    peak = [x.peak_rss / MIB if x.ok and x.peak_rss else None for x in sides]
    row("updates done", [x.report.get("updates") for x in sides], "d")
    row("episodes", [s.episodes if x.ok else None for x in sides], "d")
    row("model load + set-up (s)", [x.report.get("load_s") for x in sides])
    row("training loop (s)", [x.report.get("loop_s") for x in sides])
    row("training loop CPU time (s)", [x.report.get("loop_cpu_s") for x in sides])
    row("episodes/s", eps, ".3f")
    row("episodes/s after update 1", steady, ".3f")
    row("peak RSS (MiB)", peak, ".1f")
    row("RSS after import torch (MiB)", [_mib(x.report.get("rss_after_torch")) for x in sides])
    row("RSS high-water before loop (MiB)", [_mib(x.report.get("hwm_before_loop")) for x in sides])
    row("other processes' CPU use (cores)", [x.others_cores for x in sides])
    row("machine idle at start", [x.quiet for x in sides], "s")
    row("torch threads", [x.report.get("threads") for x in sides], "d")
    row("torch", [x.report.get("torch") for x in sides], "s")
    row("device", [x.report.get("device") for x in sides], "s")
    row("last update objective/scores", [x.report.get("last_score") for x in sides], ".4f")
    row("last update val/num_eos_tokens", [x.report.get("last_eos") for x in sides], ".0f")

    width = max(len(label) for label, _ in rows) + 2
    print("\n== results (one run) ==")
    print(f"  {'':{width}}{'swallowctl':>14}{'TRL 1.12 PPO':>16}")
    for label, values in rows:
        print(f"  {label:<{width}}{values[0]:>14}{values[1]:>16}")

    print("\n== ours / TRL ==")
    if eps[0] and eps[1]:
        speed = eps[0] / eps[1]
        met = "met" if speed >= SPEED_TARGET else "NOT met"
        print(f"  speed  (episodes/s): {speed:.2f}x  (target >= {SPEED_TARGET}x: {met})")
        if steady[0] and steady[1]:
            print(f"  speed after update 1: {steady[0] / steady[1]:.2f}x  (for information)")
    else:
        print("  speed: n/a (a side did not finish)")
    if peak[0] and peak[1]:
        mem = peak[0] / peak[1]
        met = "met" if mem <= MEMORY_TARGET else "NOT met"
        print(f"  memory (peak RSS):   {mem:.2f}x  (target <= {MEMORY_TARGET}x: {met})")
        floor = [_mib(x.report.get("rss_after_torch")) for x in sides]
        if floor[0] and floor[1] and peak[1] - floor[1] > 0:
            above = (peak[0] - floor[0]) / (peak[1] - floor[1])
            print(f"  peak RSS above the import-torch floor: {above:.2f}x  (for information)")
    else:
        print("  memory: n/a (a side did not finish)")
    for x in sides:
        if not x.ok:
            print(f"\n{x.name} did not run: {x.error}")
    for x in failed:
        print(f"\n{x.name}, a failed round: {x.error}")


def _loadavg() -> str:
    """1/5/15-minute load averages and CPU count: other work on the machine skews timings."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def _mib(v: Any) -> float | None:
    return v / MIB if isinstance(v, int | float) else None


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64, help="first N chat prompts")
    p.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--mini-batches", type=int, default=1)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32, help="max new tokens")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--gradient-checkpointing", action="store_true", help="on, for both sides")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV)
    p.add_argument(
        "--torch-pin",
        default=None,
        help="torch for the TRL venv (default: this Python's torch, same build on both sides)",
    )
    p.add_argument("--pip-arg", action="append", default=[], help="extra pip install argument")
    p.add_argument("--only", choices=["ours", "trl"], help="run one side only")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of both sides; the fastest of each is shown"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per side")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each side, wait up to this long for other processes to go idle",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running child is killed and the temp dir removed.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    s = Settings(
        prompts=a.prompts,
        batch=a.batch,
        grad_accum=a.grad_accum,
        mini_batches=a.mini_batches,
        ppo_epochs=a.ppo_epochs,
        response_length=a.response_length,
        lr=a.lr,
        updates=a.updates,
        threads=a.threads,
        seed=a.seed,
        lora_r=a.lora_r,
        lora_alpha=a.lora_alpha,
        kl_coef=a.kl_coef,
        temperature=0.7,
        gradient_checkpointing=a.gradient_checkpointing,
    )
    if s.prompts < s.samples_per_update:
        raise SystemExit(
            f"--prompts {s.prompts} < samples per update {s.samples_per_update}: TRL's "
            "dataloader drops incomplete batches"
        )
    from swallowctl.core.tiny import tiny_path

    policy_dir, reward_dir = tiny_path("policy"), tiny_path("reward")
    messages = chat_messages(s.prompts)
    tmp = Path(tempfile.mkdtemp(prefix="swallowctl-bench-"))
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in messages),
        encoding="utf-8",
    )
    payload = {
        **asdict(s),
        "episodes": s.episodes,
        "policy_dir": str(policy_dir),
        "reward_dir": str(reward_dir),
        "messages": messages,
        "ours_overrides": ours_overrides(s, prompts_file, reward_dir),
    }
    settings_file = tmp / "settings.json"
    settings_file.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    (tmp / "ours_runner.py").write_text(OURS_RUNNER, encoding="utf-8")
    (tmp / "trl_runner.py").write_text(TRL_RUNNER, encoding="utf-8")

    extra = {
        "policy": f"builtin:tiny-ja ({policy_dir})",
        "reward": f"builtin:tiny-ja-reward ({reward_dir})",
        "precision": "fp32 weights, LoRA adapters, no 4-bit (CPU)",
        "order": (
            f"{a.repeat} round(s) of swallowctl then TRL, one process at a time; "
            "each side's fastest round is shown"
            if a.only is None
            else f"{a.only} only, {a.repeat} round(s)"
        ),
        "temp dir": str(tmp) + (" (kept)" if a.keep else " (removed at exit)"),
    }
    trl_python: Path | None = None
    trl_error: str | None = None
    if a.only != "ours":
        try:
            torch_pin = a.torch_pin or f"torch=={metadata.version('torch')}"
            versions = ensure_trl_venv(a.trl_venv, torch_pin, a.pip_arg)
            extra["TRL venv"] = f"{a.trl_venv}: " + ", ".join(
                f"{k}=={v}" for k, v in versions.items()
            )
            trl_python = venv_python(a.trl_venv)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            trl_error = f"the TRL venv could not be set up: {e}"
    extra["load average at start"] = _loadavg()
    runs: dict[str, list[Side]] = {"ours": [], "trl": []}
    try:
        for i in range(1, a.repeat + 1):
            if a.only != "trl":
                print(f"round {i}: running swallowctl ...", flush=True)
                side = Side("swallowctl")
                cmd = [sys.executable, str(tmp / "ours_runner.py"), str(settings_file)]
                run_child(
                    side,
                    [*cmd, str(tmp / f"ours-{i}.json")],
                    child_env(s.threads, keep_pythonpath=True),
                    tmp / f"ours-{i}.log",
                    a.timeout,
                    a.wait_quiet,
                )
                runs["ours"].append(side)
            if a.only != "ours":
                side = Side("TRL 1.12 PPO")
                if trl_python is None:
                    side.error = trl_error
                else:
                    print(f"round {i}: running TRL 1.12 PPO ...", flush=True)
                    cmd = [str(trl_python), str(tmp / "trl_runner.py"), str(settings_file)]
                    run_child(
                        side,
                        [*cmd, str(tmp / f"trl-{i}.json")],
                        child_env(s.threads, keep_pythonpath=False),
                        tmp / f"trl-{i}.log",
                        a.timeout,
                        a.wait_quiet,
                    )
                runs["trl"].append(side)
        extra["load average at end"] = _loadavg()
        for key in ("ours", "trl"):
            if len(runs[key]) > 1:
                extra[f"every round, {key}"] = "; ".join(
                    f"{s.episodes / x.report['loop_s']:.3f} ep/s, others "
                    f"{_fmt(x.others_cores)} cores, {x.quiet}"
                    if x.ok
                    else "failed"
                    for x in runs[key]
                )
        ours = _best(runs["ours"], "swallowctl", "skipped (--only trl)")
        trl = _best(runs["trl"], "TRL 1.12 PPO", "skipped (--only ours)")
        shown = (id(ours), id(trl))
        failed = [x for x in runs["ours"] + runs["trl"] if not x.ok and id(x) not in shown]
        print_report(s, ours, trl, extra, failed)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if (ours.ok or a.only == "trl") and (trl.ok or a.only == "ours") else 1


def _best(sides: list[Side], name: str, skipped: str) -> Side:
    """The round with the shortest training loop (the least disturbed), else the first failure."""
    done = [x for x in sides if x.ok]
    if done:
        return min(done, key=lambda x: x.report["loop_s"])
    return sides[0] if sides else Side(name, error=skipped)


if __name__ == "__main__":
    sys.exit(main())
