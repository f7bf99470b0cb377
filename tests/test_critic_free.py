"""GRPO and RLOO through TRL, from our config, rewards and run layout: tiny CPU runs, for real."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import SwallowConfig, load_config
from swallowctl.core.errors import ConfigError, UsageError
from swallowctl.core.models import resolve
from swallowctl.memory import Budget, estimate, settings_from_config, tune
from swallowctl.memory.tuner import candidates, changes
from swallowctl.ppo.critic_free import RUN_INFO, CriticFreeTrainer, check_trl_args
from swallowctl.ppo.trainer import Interrupted, PPOTrainer

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"

SMALL = (
    "model.name_or_path=builtin:tiny-ja",
    "generation.max_new_tokens=8",
    "ppo.per_device_train_batch_size=4",
    "ppo.grad_accum_steps=1",
    "ppo.ppo_epochs=1",
    "ppo.num_generations=2",
    "ppo.lr=3e-3",
    "logging.report_to=[]",
    "rewards.0.function=japanese_ratio",
)


def config(tmp_path: Path, *more: str) -> SwallowConfig:
    return load_config(None, (*SMALL, f"output.dir={tmp_path / 'run'}", *more)).config


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# --- learning -----------------------------------------------------------------------------------


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The curves below are seed 42 with 2 torch threads (CI's cores). Another thread count
    rounds the float sums differently and draws other samples: grpo with 1 thread reached
    0.73 -> 0.83, learning too but under this test's margin. Pinned, so OMP_NUM_THREADS or the
    core count cannot change what is tested."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    ("algorithm", "more"),
    [
        ("grpo", ()),
        # RLOO subtracts kl_coef x the answer's summed log-ratio (k1) from its reward; at the
        # quick start's 0.05 that penalty (about 1 by update 5 at lr 3e-3) outweighs the reward
        # differences (about 0.1) and pulls it back: 0.73 -> 0.96 at update 8 -> 0.74 at 20.
        ("rloo", ("ppo.kl_coef=0.01",)),
    ],
)
def test_the_quick_start_learns_with_grpo_and_rloo(
    tmp_path: Path, algorithm: str, more: tuple[str, ...]
) -> None:
    cfg = load_config(
        QUICKSTART,
        (f"ppo.algorithm={algorithm}", f"output.dir={tmp_path / 'run'}", *more),
    ).config
    result = CriticFreeTrainer(cfg).run()
    scores = [x["objective/scores"] for x in lines(result.run_dir / "metrics.jsonl")]
    assert len(scores) == 20
    # The share of Japanese script in the answers, from the untrained policy's first rollout to
    # the mean of the last five updates (seed 42; the same numbers on every run): grpo
    # 0.73 -> 0.92 (0.88 at update 13), rloo 0.73 -> 1.00 (from update 7 on).
    assert sum(scores[-5:]) / 5 > scores[0] + 0.15, scores


# --- the same reward calls as PPO ----------------------------------------------------------------

RECORDER = """
import json, os

def record(prompts, completions, completion_ids, **kwargs):
    with open(os.environ["SWALLOW_RECORD"], "a", encoding="utf-8") as f:
        call = {"prompts": prompts, "completions": completions,
                "completion_ids": completion_ids, "kwargs": kwargs}
        f.write(json.dumps(call, ensure_ascii=False) + "\\n")
    return [float(len(c)) for c in completions]
"""


def test_reward_functions_get_the_same_arguments_as_under_ppo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "swallow_recorder.py").write_text(RECORDER, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SWALLOW_RECORD", str(record))
    reward = ("rewards.0.function=swallow_recorder:record", "ppo.total_updates=1")
    PPOTrainer(config(tmp_path / "ppo", *reward)).run()
    CriticFreeTrainer(config(tmp_path / "grpo", "ppo.algorithm=grpo", *reward)).run()
    ppo, grpo = lines(record)

    resolved = resolve("builtin:tiny-ja")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.model_id)
    assert set(ppo["kwargs"]) == set(grpo["kwargs"]) >= {"finished", "mode", "prompt", "messages"}
    for call in (ppo, grpo):
        kw = call["kwargs"]
        prompts, texts, ids = call["prompts"], call["completions"], call["completion_ids"]
        assert len(texts) == len(ids) == len(kw["finished"]) == 4
        assert prompts == kw["prompt"]  # the row's text, not the rendered chat
        assert all(isinstance(t, str) for t in texts)
        assert tokenizer.batch_decode(ids, skip_special_tokens=True) == texts
        stops = set(resolved.stop_token_ids)
        assert kw["finished"] == [bool(i) and i[-1] in stops for i in ids]
        assert kw["mode"] == "chat"
        assert kw["messages"][0][0]["role"] == "system"  # the mode's system prompt, rendered
    # GRPO: two prompts, each answered num_generations = 2 times, side by side.
    assert grpo["prompts"][0] == grpo["prompts"][1] != grpo["prompts"][2]


# --- validation ---------------------------------------------------------------------------------


def test_settings_of_one_algorithm_are_validated_with_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    body = "ppo:\n  algorithm: grpo\n  per_device_train_batch_size: 4\n  grad_accum_steps: 2\n"
    path.write_text(body + "  num_generations: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path}:5: ppo.num_generations: 3 does not divide the 8")
    assert "use one of 2, 4, 8" in e.value.message
    path.write_text(body + "  num_generations: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}:5: ppo.num_generations: must be at least 2"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: ppo.num_generations: 3 does not divide"):
        load_config(None, ("ppo.algorithm=rloo", "ppo.num_generations=3"))
    # A behaviour only our PPO has is refused; a setting it merely ignores is a warning.
    path.write_text(body + "  target_kl: 0.1\n  vf_coef: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}:5: ppo.target_kl: not available with"):
        load_config(path)
    path.write_text(body + "  vf_coef: 0.5\n", encoding="utf-8")
    assert load_config(path).warnings == [
        f"{path}:5: ppo.vf_coef: 0.5 is not used by algorithm grpo (it has no value model)"
    ]
    (warning,) = load_config(None, ("ppo.num_generations=8",)).warnings
    assert "ppo.num_generations: 8 is not used by algorithm ppo" in warning
    with pytest.raises(ConfigError, match=r"ppo.entropy_coef: not available with algorithm rloo"):
        load_config(None, ("ppo.algorithm=rloo", "ppo.entropy_coef=0.01"))
    with pytest.raises(ConfigError, match="environments run with algorithm: ppo only"):
        load_config(None, ("ppo.algorithm=grpo", "environment.entrypoint=my_env:Env"))
    with pytest.raises(ConfigError, match=r"lora\.critic: grpo has no critic"):
        load_config(None, ("ppo.algorithm=grpo", "lora.critic=adapter"))
    # ppo.trl_args: real fields of this TRL's config class, and none that our keys set.
    cfg = load_config(None, ("ppo.algorithm=grpo", "ppo.trl_args={learning_rate: 1.0}")).config
    with pytest.raises(ConfigError, match=r"trl_args.learning_rate: swallowctl sets .* ppo.lr"):
        check_trl_args(cfg)
    cfg = load_config(None, ("ppo.algorithm=grpo", "ppo.trl_args={top_entropy_quantil: 1}")).config
    with pytest.raises(ConfigError, match="did you mean 'top_entropy_quantile'"):
        check_trl_args(cfg)
    check_trl_args(load_config(None, ("ppo.algorithm=grpo",)).config)


# --- run layout, signals, resume ----------------------------------------------------------------


def test_sigint_checkpoint_resume_final_and_infer(tmp_path: Path) -> None:
    # Two passes per update: TRL's optimizer steps 2, 4, 6 are our updates 1, 2, 3.
    more = ("ppo.algorithm=grpo", "ppo.ppo_epochs=2", "ppo.total_updates=3", "output.save_steps=2")
    straight = CriticFreeTrainer(config(tmp_path / "straight", *more)).run()
    cfg = config(tmp_path, *more)
    run = tmp_path / "run"

    def interrupt_after_1(update: int, _m: dict[str, float]) -> None:
        if update == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        CriticFreeTrainer(cfg, on_update=interrupt_after_1).run()
    assert e.value.exit_code == 130 and "--resume" in (e.value.hint or "")
    assert (run / "checkpoint-1" / "COMPLETE").is_file()
    info = json.loads((run / "checkpoint-1" / RUN_INFO).read_text())
    assert info == {"algorithm": "grpo", "update": 1, "trl_step": 2}
    assert not (run / "final").exists() and not (run / ".trl").exists()
    # Neither a fresh run, nor another algorithm, may continue in this directory.
    with pytest.raises(UsageError, match="already holds a run"):
        CriticFreeTrainer(cfg)
    r = CliRunner().invoke(app, ["train", *(f"--set={s}" for s in (*SMALL, f"output.dir={run}"))])
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = CliRunner().invoke(
        app, ["train", "--resume", *(f"--set={s}" for s in (*SMALL, f"output.dir={run}"))]
    )
    assert r.exit_code == 2 and "holds a grpo run" in r.stderr

    result = CriticFreeTrainer(cfg, resume=True).run()
    assert [x["update"] for x in lines(run / "metrics.jsonl")] == [1, 2, 3]
    first = lines(run / "metrics.jsonl")[0]
    assert {"objective/scores", "objective/kl", "lr", "episode", "reward/japanese_ratio"} <= set(
        first
    )
    assert "trl/loss" in first and first["episode"] == 4
    assert {x["update"] for x in lines(run / "samples.jsonl")} == {1, 2, 3}
    assert (run / "checkpoint-2" / "COMPLETE").is_file()  # saved after the resume
    manifest = json.loads((result.final_dir / "manifest.json").read_text())
    assert manifest["algorithm"] == "grpo" and manifest["updates"] == 3
    assert manifest["base_model"]["name"] == "builtin:tiny-ja"
    assert not (run / "final" / "value_head.safetensors").exists()
    # Resumed, the run is the run that never stopped (seed 42: the same adapter to the bit).
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    whole = load_file(straight.final_dir / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-ja").model_id)
    tuned = PeftModel.from_pretrained(base, str(run / "final"))
    lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # trained, not the zero init
    r = CliRunner().invoke(
        app, ["infer", "--adapter", str(run), "-p", "こんにちは", "--max-new-tokens", "4", "-q"]
    )
    assert r.exit_code == 0, r.stderr
    # Starting from a trained adapter (TRL keeps a frozen copy of it as the reference).
    more = ("ppo.algorithm=rloo", "ppo.total_updates=1", f"lora.init_adapter={run / 'final'}")
    again = CriticFreeTrainer(config(tmp_path / "from-sft", *more))
    assert "ref" in again.trainer.model.peft_config
    assert again.run().final_dir == tmp_path / "from-sft" / "run" / "final"


def test_cli_dry_run_prints_the_group_plan(tmp_path: Path) -> None:
    args = [f"--set={s}" for s in (*SMALL, "ppo.algorithm=rloo", f"output.dir={tmp_path}")]
    r = CliRunner().invoke(app, ["train", *args, "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert "rloo (TRL" in r.stderr and "2 prompts x 2 answers per update" in r.stderr
    assert "num_iterations 1, max_steps 100, beta 0.05" in r.stderr


# --- tune-memory --------------------------------------------------------------------------------


def test_tune_memory_models_the_group_and_no_critic() -> None:
    arch = resolve("swallow-8b", local_files_only=True).architecture
    ppo = settings_from_config(load_config(None).config)
    grpo_cfg = load_config(None, ("ppo.algorithm=grpo", "ppo.num_generations=8")).config
    grpo = settings_from_config(grpo_cfg)
    # Every answer of every prompt of an update is generated at once: 1 prompt x 8 answers.
    assert (grpo.rollout_batch, grpo.num_generations, grpo.value_head) == (8, 8, False)
    assert (ppo.rollout_batch, ppo.value_head) == (4, True)
    est_ppo, est_grpo = estimate(arch, ppo), estimate(arch, grpo)
    assert est_ppo.phase("rollout").bytes_of("value_head") > 0
    assert all(p.bytes_of("value_head") == 0 for p in est_grpo.phases)
    kv = est_grpo.phase("rollout").bytes_of("kv_cache")
    assert kv == 2 * est_ppo.phase("rollout").bytes_of("kv_cache")  # 8 sequences, not 4
    assert "(1 prompts x 8)" in next(
        t.basis for t in est_grpo.phase("rollout").terms if t.key == "kv_cache"
    )
    # The rollout batch is not a knob here: every candidate keeps it, no change writes it.
    assert {c.rollout_batch for c in candidates(grpo)} == {8}
    smaller = grpo.but(micro_batch=1, grad_accum=8)
    assert "ppo.local_rollout_forward_batch_size" not in changes(grpo, smaller, False)


def test_tune_memory_for_grpo_gives_up_samples_per_update_first() -> None:
    arch = resolve("swallow-8b", local_files_only=True).architecture
    cfg = load_config(
        None,
        (
            "ppo.algorithm=grpo",
            "ppo.num_generations=8",
            "ppo.per_device_train_batch_size=4",
            "ppo.grad_accum_steps=8",
        ),
    ).config
    grpo = settings_from_config(cfg)
    assert grpo.rollout_batch == 32  # 4 prompts x 8 answers, generated in one call
    # TRL's fused LM head has no chunk to set: no candidate changes it.
    assert {c.logits_chunk for c in candidates(grpo)} == {grpo.logits_chunk}
    minimal = grpo.but(micro_batch=1, grad_accum=32)
    budget = Budget(
        estimate(arch, minimal.but(grad_accum=16, rollout_batch=16)).peak_bytes, "16 answers"
    )
    result = tune(arch, grpo, budget)
    assert not result.fits
    first = result.advice[0]
    assert (first.key, first.current, first.value) == ("ppo.grad_accum_steps", 32, 16)
    assert "16 answers per update, now 32" in first.text
    # 24 answers (the next whole groups of 8) would not fit: 16 is the most.
    assert estimate(arch, minimal.but(grad_accum=24, rollout_batch=24)).peak_bytes > budget.bytes


def test_tune_memory_cli_shows_the_generation_batch_for_grpo() -> None:
    r = CliRunner().invoke(
        app,
        [
            "tune-memory",
            "--vram",
            "24",
            "--set",
            "ppo.algorithm=grpo",
            "--set",
            "ppo.num_generations=4",
        ],
    )
    assert r.exit_code == 0, r.stderr
    now = next(line for line in r.stdout.splitlines() if line.startswith("now:"))
    assert "generation batch 8 (2 prompts x 4)" in now and "logits chunk" not in now


def test_grpo_prompts_are_cut_as_ppo_cuts_them(tmp_path: Path) -> None:
    from swallowctl.ppo.rollout import fit_prompt

    data = tmp_path / "long.jsonl"
    long_prompt = "長い質問です。" * 200
    data.write_text(
        json.dumps({"prompt": long_prompt}, ensure_ascii=False)
        + "\n"
        + json.dumps({"prompt": "短い質問"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    cfg = config(
        tmp_path,
        "ppo.algorithm=grpo",
        f"data.prompts={data}",
        "data.max_prompt_tokens=120",
        "ppo.per_device_train_batch_size=2",
    )
    trainer = CriticFreeTrainer(cfg)
    prompts = trainer.dataset["prompt"]
    tok = trainer.tokenizer
    lengths = [
        len(
            tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False)
        )
        for p in prompts
    ]
    assert lengths[0] <= 120 < len(long_prompt)
    assert prompts[0] == fit_prompt(tok, trainer.bridge.rows[0].messages, 120)[0]
    assert prompts[0][-1]["content"] in long_prompt and prompts[1][-1]["content"] == "短い質問"
