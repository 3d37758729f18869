"""ComfyUI-node logic that needs no ComfyUI: row groups, per-row offsets, the branch wrapper, paths."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from npo_suite.core.offsets.types import DenseDelta, LowRankDelta, Offset
from npo_suite.core.npo import COND, UNCOND, NPOSpec, npo_groups
from npo_suite.core.npo import chunk_kinds as row_groups
from npo_suite.nodes.comfy.rows import NPOBranchWrapper


def test_row_groups_follow_cond_or_uncond_chunks():
    assert row_groups([0, 1], 4) == [0, 0, 1, 1]
    assert row_groups([1, 0], 2) == [1, 0]
    assert row_groups([1], 3) == [1, 1, 1]
    assert row_groups([2, 0, 1], 3) == [2, 0, 1]
    with pytest.raises(ValueError, match="equal chunks"):
        row_groups([0, 1], 3)
    with pytest.raises(ValueError):
        row_groups([], 2)


def test_npo_groups_weights():
    d = LowRankDelta(torch.ones(1, 2), torch.ones(2, 1))
    g = npo_groups({"a": d}, {"a": d, "b": d}, alpha=0.0, beta=0.5)
    assert [w for _, w in g["pos"]] == [1.0] and [w for _, w in g["neg"]] == [0.5]  # alpha = 0: no eta on uncond rows
    g = npo_groups({"a": d}, {"b": d}, alpha=0.3, beta=0.0)
    assert [w for _, w in g["neg"]] == [0.3]  # beta = 0: no delta
    assert npo_groups(None, None, 0.5, 1.0) == {"pos": [], "neg": []}


def _merged(module, deltas_weights):
    """A copy of `module` with W + sum(w * dW) (and dense biases) merged in."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        for d, w in deltas_weights:
            dw = d.dense(torch.float32)
            m.weight += w * dw.reshape(m.weight.shape)
            if isinstance(d, DenseDelta) and d.bias is not None:
                m.bias += w * d.scale * d.bias
    return m


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1_linear_shaped"])
def test_npo_rows_equal_merged_weights_per_row(kind):
    """The LDM module kinds ComfyUI's UNet has, through the NPO groups and core.branch_lora."""
    from npo_suite.core.branch_lora import branch_offsets

    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        mod, x = nn.Linear(6, 5), torch.randn(4, 3, 6, generator=g)  # [rows, tokens, in]
        eta = LowRankDelta(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), scale=0.5)
        delta = DenseDelta(torch.randn(5, 6, generator=g), bias=torch.randn(5, generator=g), scale=0.7)
    elif kind == "conv3x3":
        mod, x = nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.randn(4, 3, 8, 8, generator=g)
        eta = LowRankDelta(torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g), scale=0.25)
        delta = LowRankDelta(torch.randn(1, 3, 3, 3, generator=g), torch.randn(4, 1, 1, 1, generator=g))
    else:  # kohya may store a 1x1 conv's factors Linear-shaped
        mod, x = nn.Conv2d(3, 4, 1), torch.randn(4, 3, 5, 5, generator=g)
        eta = LowRankDelta(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g))
        delta = LowRankDelta(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), scale=2.0)
    alpha, beta = 0.3, 0.8
    root = nn.ModuleDict({"m": mod})
    groups = npo_groups({"m": eta}, {"m": delta}, alpha, beta)
    rows = ["pos" if g == COND else "neg" for g in row_groups([COND, UNCOND], 4)]  # rows 0,1 cond; 2,3 uncond
    with torch.no_grad():
        with branch_offsets(root, groups, rows=rows):
            got = root["m"](x)
        pos = _merged(mod, [(eta, 1.0)])(x)
        neg = _merged(mod, [(eta, alpha), (delta, beta)])(x)
    torch.testing.assert_close(got[:2], pos[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2:], neg[2:], rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _FakeBaseModel(nn.Module):
    """Stands in for ComfyUI's BaseModel: `apply_model(x, t, **c)` runs `diffusion_model`."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = _Net()

    def apply_model(self, x, t, **c):
        return self.diffusion_model(x)


def _wrapper_setup(sigma_min=None, sigma_max=None, previous=None):
    torch.manual_seed(0)
    base = _FakeBaseModel()
    eta = {"a": LowRankDelta(torch.randn(2, 4), torch.randn(4, 2), 0.5)}
    delta = {"b": LowRankDelta(torch.randn(1, 4), torch.randn(4, 1))}
    spec = NPOSpec(eta=Offset(unet=eta), delta=Offset(unet=delta), alpha=0.5, beta=1.0,
                   sigma_min=sigma_min, sigma_max=sigma_max)
    w = NPOBranchWrapper(eta, delta, spec, previous)
    return base, eta, delta, w


def _reference(base, terms_a, terms_b, x):
    net = copy.deepcopy(base.diffusion_model)
    net.a, net.b = _merged(net.a, terms_a), _merged(net.b, terms_b)
    return net(x)


def test_branch_wrapper_one_forward_equals_two_models_and_cleans_up():
    base, eta, delta, w = _wrapper_setup()
    x = torch.randn(4, 4)  # chunks [cond(2 rows), uncond(2 rows)]
    args = {"input": x, "timestep": torch.full((4,), 5.0), "c": {}, "cond_or_uncond": [0, 1]}
    with torch.no_grad():
        out = w(base.apply_model, args)
        pos = _reference(base, [(eta["a"], 1.0)], [], x)
        neg = _reference(base, [(eta["a"], 0.5)], [(delta["b"], 1.0)], x)
    torch.testing.assert_close(out[:2], pos[:2])
    torch.testing.assert_close(out[2:], neg[2:])
    assert not base.diffusion_model.a._forward_hooks and not base.diffusion_model.b._forward_hooks
    assert copy.deepcopy(w) is w  # ModelPatcher.clone must not copy the offsets


def test_branch_wrapper_uncond_only_chunk_and_sigma_window():
    base, eta, delta, w = _wrapper_setup(sigma_min=1.0, sigma_max=3.0)
    x = torch.randn(2, 4)
    with torch.no_grad():
        # ComfyUI may run the uncond chunk alone (memory-limited batching)
        inside = w(base.apply_model, {"input": x, "timestep": torch.full((2,), 2.0), "c": {}, "cond_or_uncond": [1]})
        outside = w(base.apply_model, {"input": x, "timestep": torch.full((2,), 9.0), "c": {}, "cond_or_uncond": [1]})
        neg = _reference(base, [(eta["a"], 0.5)], [(delta["b"], 1.0)], x)
        pos = _reference(base, [(eta["a"], 1.0)], [], x)
    torch.testing.assert_close(inside, neg)
    torch.testing.assert_close(outside, pos)  # outside the window the step is CFG of θ+η


def test_branch_wrapper_chains_previous_wrapper():
    calls = []

    def previous(apply_model, args):
        calls.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"]) * 2.0

    base, eta, delta, w = _wrapper_setup(previous=previous)
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = w(base.apply_model, {"input": x, "timestep": torch.ones(2), "c": {}, "cond_or_uncond": [0, 1]})
        ref = _reference(base, [(eta["a"], 1.0)], [], x)
    assert calls == [[0, 1]]
    torch.testing.assert_close(out[:1], 2.0 * ref[:1])  # our hooks were active inside the previous wrapper


def test_comfyui_tests_skip_without_comfyui_and_root_import_is_light():
    import importlib
    import sys

    importlib.import_module("npo_suite.nodes")
    assert "comfy_api" not in sys.modules and "comfy" not in sys.modules
