"""PEFT is the oracle: AdaLoRA folders load both ways with the same logits, pruned ones too (Llama,
GPT-2's Conv1D), and a pruned folder saves again to the same tensors."""

from __future__ import annotations

import attrs
import peft
import pytest
import torch
from adalora_helpers import ARCHS, TOL, base, factors, options, output, peft_model, randomize, train
from grafting_adalora.plugin import grafting_check_saved_shapes
from safetensors.torch import load_file

import grafting
from grafting import AdaLoraConfig, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_peft_saves_grafting_loads(arch: str, tmp_path) -> None:
    theirs = peft_model(arch).eval()
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert factors(ours).keys() == factors(theirs).keys()
    assert_close(output(ours, arch), expected, changed_from=output(base(arch), arch), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_grafting_saves_peft_loads(arch: str, tmp_path) -> None:
    ours = get_peft_model(base(arch), AdaLoraConfig(**options(arch)))
    randomize(ours, 2)
    expected = output(ours, arch)
    ours.save_pretrained(tmp_path)
    assert "ranknum" not in " ".join(load_file(tmp_path / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(base(arch), tmp_path).eval()
    assert_close(output(theirs, arch), expected, changed_from=output(base(arch), arch), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_pruned_folders_load_both_ways(arch: str, tmp_path) -> None:
    theirs = peft_model(arch, 4)
    train(theirs, arch, range(7))  # through the final allocation at step 6
    theirs.eval()
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(base(arch), tmp_path / "peft")
    pattern = ours.peft_config["default"].rank_pattern
    for name, p in factors(ours).items():
        if name.endswith("lora_E"):
            assert p.shape[0] == sum(pattern[name]) < 4, name
    plain = output(base(arch), arch)
    assert_close(output(ours, arch), expected, changed_from=plain, **TOL, msg="grafting loads PEFT's")
    check = grafting.inspect_adapter(str(tmp_path / "peft"))["check"]
    assert check == {"ok": True, "problems": [], "shapes_checked": True}
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    unpruned = attrs.evolve(ours.peft_config["default"], rank_pattern=None)  # init_r everywhere: every layer differs
    assert len(grafting_check_saved_shapes(unpruned, shapes)) >= 3 * len(pattern)
    ours.save_pretrained(tmp_path / "grafting")
    assert_identical(
        load_file(tmp_path / "grafting" / "adapter_model.safetensors"),
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
    )
    again = peft.PeftModel.from_pretrained(base(arch), tmp_path / "grafting").eval()
    assert_close(output(again, arch), expected, changed_from=plain, **TOL, msg="PEFT loads grafting's")


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def _conv_net() -> _ConvNet:
    torch.manual_seed(0)
    return _ConvNet().double()


def test_adalora_conv2d_folders_load_both_ways(tmp_path) -> None:
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kwargs = {"init_r": 3, "target_r": 2, "total_step": 8, "target_modules": ["conv", "head"], "lora_alpha": 4}
    theirs = peft.get_peft_model(_conv_net(), peft.AdaLoraConfig(**kwargs, init_lora_weights=False))
    randomize(theirs, 7)
    with torch.no_grad():
        expected, plain = theirs(x), _conv_net()(x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(_conv_net(), tmp_path / "peft")
    with torch.no_grad():
        assert_close(ours(x), expected, changed_from=plain, **TOL)
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_conv_net(), tmp_path / "ours")
    with torch.no_grad():
        assert_close(again(x), expected, changed_from=plain, **TOL)
        merged = ours.merge_and_unload()
        assert_close(merged(x), expected, changed_from=plain, rtol=1e-9, atol=1e-9)
