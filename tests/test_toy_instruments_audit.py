"""Findings of the 2026-12-07 audit of the toy instruments, each with the behaviour it fixed."""
import torch

from apdm.toy import instruments as I


def test_a_tall_photo_is_shrunk_with_antialiasing_like_a_wide_one():
    stripes = (torch.arange(256) // 4 % 2).float()
    tall = stripes.view(1, 1, 256, 1).expand(1, 3, 256, 64).clone()
    wide = stripes.view(1, 1, 1, 256).expand(1, 3, 64, 256).clone()
    a, b = I._prepare(tall), I._prepare(wide)
    assert torch.allclose(a, b.transpose(-1, -2), atol=1e-6)  # the tall one was aliased (std 0.50 vs 0.26)


def test_batched_scoring_feeds_the_module_on_its_own_device():
    module = torch.nn.Linear(2, 2).to("meta")  # a stand-in for a GPU: the images stay on the CPU
    seen = []

    def fn(x):
        seen.append(x.device.type)
        return torch.zeros(x.shape[0])

    out = I._batched(module, torch.rand(5, 3, 8, 8), batch_size=2, fn=fn)
    assert seen == ["meta"] * 3 and out.device.type == "cpu" and out.shape == (5,)
