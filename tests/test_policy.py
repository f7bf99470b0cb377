"""The shared 4-bit base on CPU: gradients flow through the frozen quantized Linears."""

from __future__ import annotations

from pathlib import Path

import torch

from swallowctl.core.config import load_config
from swallowctl.core.models import resolve
from swallowctl.ppo import policy


def test_4bit_base_backpropagates_after_a_rollout_forward(tmp_path: Path) -> None:
    cfg = load_config(
        None, ("model.name_or_path=builtin:tiny-ja", "quantization.load_in_4bit=true")
    ).config
    precision = policy.decide_precision(cfg, "cpu")
    base = policy.load_base(resolve(cfg.model.name_or_path), cfg, precision)
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    embeds = base.get_input_embeddings()(ids).detach()

    def input_grad() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        base(inputs_embeds=x).logits.float().pow(2).mean().backward()
        assert x.grad is not None
        return x.grad

    base.train()
    before = input_grad()
    base.eval()  # the rollout: eval mode, no grad (bitsandbytes may repack its CPU weights here)
    with torch.no_grad():
        base(input_ids=ids)
    base.train()
    after = input_grad()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
