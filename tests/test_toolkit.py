"""The plugin toolkit (grafting.toolkit) and the rule that plugins use only grafting's public modules."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

import grafting
from grafting import ConfigError, GraftingWarning
from grafting.testing import assert_close, tiny_model
from grafting.toolkit import (
    RankAlphaPatterns,
    WeightDeltaAdapter,
    boolean,
    compute_dtype,
    convolve_as,
    default_targets,
    is_conv,
    is_linear,
    model_type,
    module_names,
    names,
    one_of,
    pattern_of,
    positive,
    positive_int,
    probability,
    warn_fan_in_fan_out,
)

ROOT = Path(__file__).resolve().parents[1]
#: What CONTRIBUTING calls grafting's public API for plugins.
PUBLIC = {"grafting", "grafting.protocol", "grafting.toolkit", "grafting.merge_utils", "grafting.testing"}


def _grafting_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "grafting":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "grafting"]
    return found


def test_plugins_import_only_public_modules() -> None:
    sources = sorted(ROOT.glob("plugins/*/src/**/*.py")) + sorted(ROOT.glob("contrib/*/src/**/*.py"))
    assert len(sources) > 20
    private = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sources
        for module in _grafting_imports(path)
        if module not in PUBLIC
    }
    assert not private, f"plugins import grafting internals: {sorted(private)}"


def test_plugins_convolve_through_the_toolkit() -> None:
    """No plugin calls torch's private ``_conv_forward``: ``toolkit.convolve_as`` takes a layer's geometry."""
    sources = sorted(ROOT.glob("plugins/*/src/**/*.py")) + sorted(ROOT.glob("contrib/*/src/**/*.py"))
    private = sorted(
        str(path.relative_to(ROOT))
        for path in sources
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr == "_conv_forward"
    )
    assert not private, f"plugins call torch's private _conv_forward: {private}"


@attrs.define(kw_only=True)
class _Options(RankAlphaPatterns):
    r: int = attrs.field(default=8, validator=positive_int)
    alpha: float = attrs.field(default=16, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=probability)
    flag: bool = attrs.field(default=False, validator=boolean)
    mode: str = attrs.field(default="a", validator=one_of("a", "b"))
    modules: list[str] | str | None = attrs.field(default=None, converter=module_names, validator=names)
    rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=pattern_of(positive_int))
    alpha_pattern: dict[str, float] = attrs.field(factory=dict, validator=pattern_of(positive))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, r"_Options\.r must be an integer > 0, got 0"),
        ("r", True, r"_Options\.r must be an integer > 0"),
        ("alpha", -1.0, r"_Options\.alpha must be a number > 0"),
        ("dropout", 1.0, r"_Options\.dropout must be in \[0, 1\)"),
        ("flag", 1, r"_Options\.flag must be True or False"),
        ("mode", "c", r"_Options\.mode must be one of \['a', 'b'\]"),
        ("modules", [1], r"_Options\.modules must be None, a regex string or a list of module names"),
        ("rank_pattern", {"q": 0}, r"_Options\.rank_pattern\['q'\] must be an integer > 0"),
        ("alpha_pattern", ["q"], r"_Options\.alpha_pattern must be a dict of module pattern"),
    ],
)
def test_validators_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _Options(**{field: value})


def test_module_names_and_patterns() -> None:
    options = _Options(modules={"v", "q"}, rank_pattern={"q_proj": 2, r"layers\.1\..*": 4}, alpha_pattern={"v_proj": 3})
    assert options.modules == ["q", "v"]
    assert options.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert options.rank_for("model.layers.1.mlp.up_proj") == 4
    assert options.rank_for("model.layers.0.mlp.up_proj") == 8
    assert options.scaling_for("model.layers.0.self_attn.v_proj") == 3 / 8
    assert options.scaling_for("model.layers.0.self_attn.q_proj", rank_stabilized=True) == 16 / 2**0.5


def test_layer_queries_and_default_targets() -> None:
    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    assert is_linear(gpt2.transformer.h[0].attn.c_attn)
    assert is_linear(llama.model.layers[0].self_attn.q_proj)
    assert not is_linear(llama.model.embed_tokens)
    assert is_conv(nn.Conv2d(1, 1, 1))
    assert model_type(llama) == "llama"
    assert model_type(nn.Linear(1, 1)) == ""
    assert default_targets({"llama": ("q_proj",)}, llama) == ["q_proj"]
    assert default_targets({"llama": ("q_proj",)}, gpt2) is None


def test_the_fan_in_fan_out_warning_is_shown_once_per_layer_type() -> None:
    model = tiny_model("gpt2", layers=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        grafting.get_peft_model(model, grafting.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=[]))
    messages = [str(w.message) for w in caught if issubclass(w.category, GraftingWarning)]
    assert messages == [
        "IA3Config.fan_in_fan_out=False does not fit the Conv1D layers it targets; grafting uses each layer's own weight layout"
    ]


def test_no_fan_in_fan_out_warning_when_it_fits() -> None:
    class Config:
        fan_in_fan_out = True

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_fan_in_fan_out(Config(), tiny_model("gpt2").transformer.h[0].attn.c_attn)
        warn_fan_in_fan_out(Config(), nn.Embedding(2, 2))  # not a linear layer: nothing to say
    with pytest.warns(GraftingWarning, match=r"Config\.fan_in_fan_out=True does not fit the Linear"):
        warn_fan_in_fan_out(Config(), nn.Linear(2, 2))


def test_the_compute_dtype_policy() -> None:
    """Autocast's dtype under autocast; a half input's dtype for "input" and wider weights; else the weights'."""
    half, single = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    assert compute_dtype("input", torch.float32, half) == torch.bfloat16
    assert compute_dtype("input", torch.float32, half.half()) == torch.float16
    assert compute_dtype("adapter", torch.float32, half) == torch.float32
    assert compute_dtype("input", torch.float32, single.double()) == torch.float32  # only half precision casts down
    assert compute_dtype("input", torch.bfloat16, single) == torch.bfloat16  # narrower weights: theirs
    assert compute_dtype("input", torch.float16, half) == torch.float16  # no wider: the weights' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype("adapter", torch.float32, single) == torch.bfloat16
        assert compute_dtype("adapter", torch.float32, single, autocast=False) == torch.float32  # elementwise
        assert compute_dtype("input", torch.float64, single) == torch.float64  # float64 stays out of autocast
    with pytest.raises(ConfigError, match=r"MyAdapter: precision must be one of \['input', 'adapter'\], got 'fast'"):
        compute_dtype("fast", torch.float32, single, where="MyAdapter")


CONVOLUTIONS = [
    nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
    nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(1, 2), groups=2, padding_mode="reflect"),
    nn.Conv2d(4, 4, 3, stride=(2, 1), padding=(2, 0), groups=4, padding_mode="circular"),
    nn.Conv2d(4, 6, 2, padding="valid", padding_mode="replicate"),
    nn.Conv3d(2, 4, 3, padding="same", padding_mode="replicate"),
]


@pytest.mark.parametrize("layer", CONVOLUTIONS, ids=lambda layer: f"{type(layer).__name__}-{layer.padding_mode}")
def test_convolve_as_convolves_with_the_layer_geometry(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    """Another weight through the layer's stride, padding, dilation, groups and padding mode: the layer's own call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, layer.in_channels, *(7,) * (layer.weight.dim() - 2), generator=gen).double()
    layer = layer.double()
    weight = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        own = torch.func.functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,))
        assert_close(convolve_as(layer, x, weight, layer.bias), own, changed_from=layer(x))
        assert_close(convolve_as(layer, x, layer.weight), layer(x) - layer.bias.view(-1, *(1,) * (x.dim() - 2)))


class _FullDelta(WeightDeltaAdapter):
    """A toy method: a whole trained ΔW, ``delta = x·ΔWᵀ``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.randn(base_layer.weight.shape, generator=torch.Generator().manual_seed(1)))

    def delta_matrix(self) -> torch.Tensor:
        return self.delta.detach()

    def forward(self, x: torch.Tensor, call: grafting.LayerCall) -> torch.Tensor:
        return x @ self.delta.t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_weight_delta_adapter_merges_and_unmerges_its_delta_matrix(dtype: torch.dtype) -> None:
    """merge adds ``delta_matrix()`` to the weight (the merged layer gives the adapter's output), unmerge
    takes it back out (the base weight again, up to the weight dtype's rounding)."""
    layer = nn.Linear(6, 5).to(dtype)
    adapter = _FullDelta(layer).to(dtype)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        adapted = layer(x) + adapter(x, None)  # type: ignore[arg-type]
        adapter.merge(layer)
        assert_close(layer(x), adapted, changed_from=x @ before.t() + layer.bias)
        adapter.unmerge(layer)
    assert_close(layer.weight, before, changed_from=before + adapter.delta)
