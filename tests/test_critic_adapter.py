"""`lora.critic: adapter`: the value's own LoRA adapter on the same base, on tiny-ja, for real."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import SMALL as TRAIN_SMALL

from swallowctl.core.config import SwallowConfig, load_config
from swallowctl.core.errors import ConfigError, UsageError
from swallowctl.infer import choose_model, open_backend, read_adapter
from swallowctl.ppo.policy import CRITIC, POLICY
from swallowctl.ppo.trainer import Interrupted, PPOTrainer

SMALL = (*TRAIN_SMALL, "lora.critic=adapter")  # the PPO tests' tiny run, with the adapter


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matrices gain nothing from threads; on a shared 2-core machine threads slow tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(tmp_path: Path, *more: str) -> SwallowConfig:
    return load_config(None, (*SMALL, f"output.dir={tmp_path / 'run'}", *more)).config


def grads(trainer: PPOTrainer) -> dict[str, dict[str, torch.Tensor]]:
    """The gradients now held, by owner: policy adapter, critic adapter, value head."""
    out: dict[str, dict[str, torch.Tensor]] = {"policy": {}, "critic": {}, "head": {}}
    for name, p in trainer.model.named_parameters():
        if ".lora_" not in name and not name.startswith("value_head"):
            continue
        owner = (
            "head"
            if name.startswith("value_head")
            else "critic"
            if f".{CRITIC}." in name
            else "policy"
        )
        assert p.requires_grad, name  # every trainable parameter stays trainable
        out[owner][name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out


def micro_step(trainer: PPOTrainer, b: dict[str, Any], adv_scale: float, vf_coef: float) -> Any:
    """One micro-batch's backward from zero grads; the losses scaled independently."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.cfg.ppo.vf_coef = vf_coef
    mask = b["batch"].response_mask
    advantages = torch.linspace(-1, 1, mask.numel()).reshape(mask.shape) * adv_scale
    returns = b["values"] + torch.linspace(0.5, -0.5, mask.numel()).reshape(mask.shape)
    idx = torch.arange(mask.shape[0])
    trainer.model.train()
    trainer._micro_step(b["batch"], b, advantages, returns, idx, len(idx), {})
    return grads(trainer)


def test_each_loss_trains_only_its_own_adapter_on_the_4bit_base(tmp_path: Path) -> None:
    trainer = PPOTrainer(
        config(
            tmp_path, "quantization.load_in_4bit=true", "ppo.entropy_coef=0", "ppo.total_updates=1"
        )
    )
    peft = trainer.accelerator.unwrap_model(trainer.model).peft
    assert any("Linear4bit" in type(m).__name__ for m in peft.modules())
    assert set(peft.peft_config) == {POLICY, CRITIC}
    b = trainer._rollout(trainer.stream.next_batch(4))
    # The critic adapter starts as a fresh LoRA (B = 0) and the head at zero: values start at 0
    # (and the critic adapter's first gradient is 0 too: one update first).
    assert torch.equal(b["values"], torch.zeros_like(b["values"]))
    trainer.run()
    b = trainer._rollout(trainer.stream.next_batch(4))

    base = micro_step(trainer, b, adv_scale=1.0, vf_coef=0.1)
    more_value = micro_step(trainer, b, adv_scale=1.0, vf_coef=0.4)
    more_policy = micro_step(trainer, b, adv_scale=3.0, vf_coef=0.1)
    for owner in ("policy", "critic", "head"):
        assert any(g.abs().sum() > 0 for g in base[owner].values()), owner
    for k, g in base["policy"].items():
        # No value-loss gradient in the policy adapter ...
        torch.testing.assert_close(more_value["policy"][k], g, rtol=0, atol=0)
        torch.testing.assert_close(more_policy["policy"][k], 3 * g, rtol=1e-4, atol=1e-7)
    for owner in ("critic", "head"):
        for k, g in base[owner].items():
            # ... and no policy-loss gradient in the critic adapter or the head.
            torch.testing.assert_close(more_policy[owner][k], g, rtol=0, atol=0)
            torch.testing.assert_close(more_value[owner][k], 4 * g, rtol=1e-4, atol=1e-7)

    # The critic's backward recomputes its checkpointed forward: with the critic adapter on, so
    # its gradients equal those of a pass without gradient checkpointing.
    backbone = peft.get_base_model()
    assert backbone.is_gradient_checkpointing
    backbone.gradient_checkpointing_disable()
    plain = micro_step(trainer, b, adv_scale=1.0, vf_coef=0.1)
    for owner in ("policy", "critic", "head"):
        for k, g in base[owner].items():
            torch.testing.assert_close(plain[owner][k], g, rtol=1e-5, atol=1e-9)


def test_resume_equals_uninterrupted_and_final_loads_in_infer(tmp_path: Path) -> None:
    straight_cfg = config(tmp_path / "a", "ppo.total_updates=4", "output.save_steps=10")
    straight = PPOTrainer(straight_cfg)
    straight.run()
    run_a = tmp_path / "a" / "run"
    lines = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    value_losses = [x["loss/value_avg"] for x in lines]
    assert value_losses[-1] < value_losses[0] / 2, value_losses  # the critic learns

    def interrupt_after_2(update: int, _m: dict[str, float]) -> None:
        if update == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = config(tmp_path / "b", "ppo.total_updates=4", "output.save_steps=10")
    with pytest.raises(Interrupted):
        PPOTrainer(cfg, on_update=interrupt_after_2).run()
    run_b = tmp_path / "b" / "run"
    assert (run_b / "checkpoint-2" / "critic" / "adapter_model.safetensors").is_file()
    shared = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"critic": "shared"})})
    with pytest.raises(UsageError, match=r"lora\.critic: adapter"):
        PPOTrainer(shared, resume=True)
    PPOTrainer(cfg, resume=True).run()
    for part in ("adapter_model.safetensors", "critic/adapter_model.safetensors"):
        a, b = load_file(run_a / "final" / part), load_file(run_b / "final" / part)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    head_a = load_file(run_a / "final" / "value_head.safetensors")
    head_b = load_file(run_b / "final" / "value_head.safetensors")
    torch.testing.assert_close(head_a["weight"], head_b["weight"], rtol=0, atol=1e-6)

    manifest = json.loads((run_a / "final" / "manifest.json").read_text())
    assert manifest["critic"] == "adapter"
    # infer finds the policy adapter at the top of final/ (not the critic beside it) ...
    info = read_adapter(run_a)
    assert info.path == run_a / "final"
    resolved, load_id = choose_model(None, info, SwallowConfig(), backend="torch")
    backend = open_backend("torch", resolved, load_id, SwallowConfig(), info)
    ids = backend.prompt_ids([{"role": "user", "content": "日本の首都はどこですか？"}])
    # ... and its logits are the trained policy's.
    peft = straight.accelerator.unwrap_model(straight.model).peft
    peft.eval()
    with torch.no_grad():
        expect = peft(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(backend.logits(ids), expect, atol=1e-4, rtol=0)


def test_nonsense_critic_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"lora\.critic_r: sizes the critic adapter"):
        load_config(None, ("lora.critic_r=8",))
    with pytest.raises(ConfigError, match=r"lora\.critic: grpo has no critic"):
        load_config(None, ("lora.critic=adapter", "ppo.algorithm=grpo"))
    cfg = load_config(None, ("lora.critic=adapter", "lora.critic_r=4", "lora.critic_alpha=8"))
    assert cfg.config.lora.critic_r == 4
