"""Contract: the branch-LoRA fast path equals the merged-weights two-model computation.

cond rows: theta + eta; uncond rows: theta + alpha*eta + beta*delta (METHODS.md "NPO guidance"),
on the tiny SD1.x and SDXL UNets, fp32, max relative error <= 1e-4.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from npo_suite.core.branch_lora import branch_offsets, two_model_eps
from npo_suite.core.guidance import offset_active
from npo_suite.core.offsets.types import DenseDelta, LowRankDelta, Offset
from npo_suite.core.offsets import extract_lora, materialize

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _targets(unet: nn.Module) -> dict[str, nn.Module]:
    """Attention/FF Linears, proj_in/out, ResNet convs (3x3 and 1x1 shortcut), time embedding projections."""
    keys = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "time_embedding.linear_1", "add_embedding.linear_1")
    return {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(keys)}


def random_lora(unet: nn.Module, rank: int, seed: int, std: float = 0.05, tucker_every: int = 3) -> Offset:
    """A LoRA with random, non-zero down AND up on every target (conv LoRA, some LoCon Tucker cores)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    convs = 0
    for name, m in _targets(unet).items():
        w = m.weight
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            convs += 1
            if convs % tucker_every == 0:  # LoCon with a Tucker mid core
                deltas[name] = LowRankDelta(
                    down=torch.randn(rank, w.shape[1], 1, 1, generator=g) * std,
                    up=torch.randn(w.shape[0], rank, 1, 1, generator=g) * std,
                    mid=torch.randn(rank, rank, *m.kernel_size, generator=g) * 0.3, scale=0.5)
                continue
            down = torch.randn(rank, w.shape[1], *m.kernel_size, generator=g) * std
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
        elif isinstance(m, nn.Conv2d):  # 1x1 conv: kohya stores [r, in, 1, 1]
            down = torch.randn(rank, w.shape[1], 1, 1, generator=g) * std
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * std
            up = torch.randn(w.shape[0], rank, generator=g) * std
        deltas[name] = LowRankDelta(down=down, up=up, scale=8.0 / rank)
    return Offset(unet=deltas)


def random_dense(unet: nn.Module, seed: int, std: float = 0.01) -> Offset:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _targets(unet).items():
        if not name.endswith(("to_q", "to_out.0", "proj_in", "conv2", "conv_shortcut", "time_emb_proj")):
            continue  # a representative subset keeps the SVD cheap
        bias = torch.randn(m.weight.shape[0], generator=g) * std if m.bias is not None else None
        out[name] = DenseDelta(weight=torch.randn(m.weight.shape, generator=g) * std, bias=bias)
    return Offset(unet=out)


def merged(unet: nn.Module, terms) -> nn.Module:
    """A deep copy with theta + sum_k w_k * delta_k materialised (the two-model reference)."""
    return materialize(unet, list(terms))


def _inputs(unet, batch: int, seed: int, sdxl: bool):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, 8, 8, generator=g)  # [B, C, H, W]
    hid = torch.randn(2 * batch, 7, c.cross_attention_dim, generator=g)  # [2B, L, D]: cond rows, then uncond
    kw = {"encoder_hidden_states": hid}
    if sdxl:
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * batch, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2 * batch, 1)}
    return x, kw


def _half(kw, part: int, batch: int):
    sl = slice(part * batch, (part + 1) * batch)
    out = {"encoder_hidden_states": kw["encoder_hidden_states"][sl]}
    if "added_cond_kwargs" in kw:
        out["added_cond_kwargs"] = {k: v[sl] for k, v in kw["added_cond_kwargs"].items()}
    return out


def _contract(unet, eta: Offset, delta: Offset, alpha: float, beta: float, sdxl: bool, batch: int = 2):
    pos_model = merged(unet, [(eta, 1.0)])
    neg_model = merged(unet, [(eta, alpha), (delta, beta)])
    groups = {"pos": [(eta, 1.0)], "neg": [(eta, alpha), (delta, beta)]}
    sigma_min, sigma_max = 1.0, 5.0
    with torch.no_grad(), branch_offsets(unet, groups) as br:
        for t in (500, 20):  # sigma(500) ~ 1.6 inside the interval, sigma(20) ~ 0.1 outside
            x, kw = _inputs(unet, batch, seed=t, sdxl=sdxl)
            abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t]
            active = offset_active(float(((1 - abar) / abar).sqrt()), sigma_min, sigma_max)
            assert active == (t == 500)
            br.set_rows(["pos"] * batch + ["neg" if active else "pos"] * batch)
            fast = unet(torch.cat([x, x]), t, **kw).sample  # [2B, C, H, W], one forward
            ref_neg = neg_model if active else pos_model
            ref_pos, ref_uncond = two_model_eps(pos_model, ref_neg, x, t, _half(kw, 0, batch), _half(kw, 1, batch))
            ref = torch.cat([ref_pos, ref_uncond])
            assert rel_err(fast, ref) <= TOL, (t, rel_err(fast, ref))
    # the offsets must matter, or the contract could not fail
    with torch.no_grad():
        x, kw = _inputs(unet, batch, seed=500, sdxl=sdxl)
        plain = unet(torch.cat([x, x]), 500, **kw).sample
        moved = neg_model(torch.cat([x, x]), 500, **kw).sample
    assert rel_err(moved, plain) > 1e-2
    # hooks are gone after the context
    assert all(not m._forward_hooks for m in unet.modules())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_contract_lora(family, request):
    pipe = request.getfixturevalue(family)
    unet = pipe.unet
    eta = random_lora(unet, rank=4, seed=1)
    delta = random_lora(unet, rank=3, seed=2)
    _contract(unet, eta, delta, alpha=0.5, beta=0.8, sdxl=family == "sdxl")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_contract_svd_extracted_and_dense(family, request):
    pipe = request.getfixturevalue(family)
    unet = pipe.unet
    dense = random_dense(unet, seed=3)
    delta, report = extract_lora(dense, rank=4)
    assert 0.0 < report["overall"] < 1.0 and not report["dropped"]
    eta = random_lora(unet, rank=2, seed=4, tucker_every=10**6)
    _contract(unet, eta, delta, alpha=0.3, beta=1.0, sdxl=family == "sdxl")
    # DenseDelta directly on the fast path (dense per-row matmul), also with bias
    _contract(unet, eta, dense, alpha=0.0, beta=0.7, sdxl=family == "sdxl", batch=3)


def test_text_encoder_rows(sd15):
    te, tok = sd15.text_encoder, sd15.tokenizer
    eta = random_lora_te(te, seed=5)
    ids = tok(["a photo of a cat", "blurry ugly"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        with branch_offsets(te, {"neg": [(eta, 1.0)]}, rows=[None, "neg"], component="te1"):
            fast = te(ids)[0]
        ref_model = materialize(te, [(Offset(text_encoders={"te1": eta}), 1.0)], component="te1")
        ref = torch.cat([te(ids[:1])[0], ref_model(ids[1:])[0]])
        moved = rel_err(ref_model(ids[1:])[0], te(ids[1:])[0])
    assert rel_err(fast, ref) <= TOL
    assert moved > 1e-3


def random_lora_te(te, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {n: LowRankDelta(torch.randn(2, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, 2, generator=g) * 0.1)
            for n, m in te.named_modules() if isinstance(m, nn.Linear) and n.endswith(("q_proj", "v_proj", "fc1"))}


def test_errors_are_clear(sd15):
    unet = sd15.unet
    bad = {"down_blocks.0.nonexistent.to_q": LowRankDelta(torch.zeros(1, 4), torch.zeros(4, 1))}
    with pytest.raises(ValueError, match="nonexistent"):
        with branch_offsets(unet, {"neg": [(bad, 1.0)]}):
            pass
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = {name: LowRankDelta(torch.zeros(2, 5), torch.ones(32, 2))}
    with pytest.raises(ValueError, match="do not match"):
        with branch_offsets(unet, {"neg": [(wrong, 1.0)]}):
            pass
    assert all(not m._forward_hooks for m in unet.modules())
    ok = {name: LowRankDelta(torch.ones(2, 32), torch.ones(32, 2))}
    x, kw = _inputs(unet, 2, 0, sdxl=False)
    with torch.no_grad(), branch_offsets(unet, {"neg": [(ok, 1.0)]}) as br:
        with pytest.raises(RuntimeError, match="set_rows"):
            unet(torch.cat([x, x]), 10, **kw)
        br.set_rows(["neg", None])  # 2 rows, but the batch has 4
        with pytest.raises(RuntimeError, match="leading dim"):
            unet(torch.cat([x, x]), 10, **kw)
        with pytest.raises(ValueError, match="unknown offset group"):
            br.set_rows(["pos"])


def test_follows_the_input_dtype_of_manually_cast_layers():
    """ComfyUI/Forge "manual cast" layers store weights in one dtype (here bf16) and compute in the
    input's (fp32): the per-row deltas must be computed in the output's dtype, not the weight's."""
    from torch import nn

    from npo_suite.core.branch_lora import branch_offsets
    from npo_suite.core.offsets.types import LowRankDelta

    class CastLinear(nn.Module):  # like comfy.ops.manual_cast.Linear: weight cast per forward
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
            self.in_features, self.out_features = w.shape[1], w.shape[0]

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    torch.manual_seed(0)
    net = nn.Sequential(CastLinear(torch.randn(6, 5)))
    d = LowRankDelta(torch.randn(2, 5), torch.randn(6, 2), 0.5)
    x = torch.randn(3, 5)
    with torch.no_grad(), branch_offsets(net, {"neg": [({"0": d}, 0.7)]}, rows=[None, "neg", "neg"]) as _:
        out = net(x)
    w = net[0].weight.float()
    want = torch.stack([x[0] @ w.t(), x[1] @ (w + 0.7 * d.dense()).t(), x[2] @ (w + 0.7 * d.dense()).t()])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [["neg", "neg", None, None], [None, None, "neg", "neg"], ["pos", "neg", "neg", "pos"],
                                  ["neg", None, "pos", None, "neg", "pos", "neg"], [None, None], ["pos", "pos", "pos"]])
def test_row_runs_equal_the_all_rows_product(rows):
    """The per-run path (no grad, Linear, <= MAX_SEGMENTS runs of equal rows) equals the merged model per
    row, as the all-rows path under autograd does; the 7-row case alternates into 5 runs (all-rows path).
    fp32 on a 3-layer MLP over [B, L, C] tokens: the two sides sum the same products in another order,
    relative error ~1e-7; bound 1e-5."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5))
    def lora(seed, scale):
        g = torch.Generator().manual_seed(seed)
        return {n: LowRankDelta(down=torch.randn(3, m.in_features, generator=g) * 0.3,
                                up=torch.randn(m.out_features, 3, generator=g) * 0.3, scale=scale)
                for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    eta, delta = lora(1, 0.5), lora(2, 2.0)
    groups = {"pos": [(eta, 1.0)], "neg": [(eta, 0.5), (delta, -1.5)]}
    models = {None: net, "pos": materialize(net, [(eta, 1.0)]), "neg": materialize(net, [(eta, 0.5), (delta, -1.5)])}
    x = torch.randn(len(rows), 7, 12)
    with torch.no_grad():
        want = torch.cat([models[r](x[i:i + 1]) for i, r in enumerate(rows)])
    with branch_offsets(net, groups, rows) as br:
        with torch.no_grad():
            fast = net(x)
        slow = net(x.clone().requires_grad_(True))  # autograd: the all-rows path
        runs = br._cache[br._rows_key][0]["segments"][0]
    assert rel_err(fast, want) <= 1e-5 and rel_err(slow.detach(), want) <= 1e-5
    active = [r for r in rows if r is not None]
    if not active:
        assert runs is None  # a module without active rows does nothing
    n_runs = sum(1 for i, r in enumerate(rows) if r is not None and (i == 0 or rows[i - 1] != r))
    if active:
        assert (runs is None) == (n_runs > 4)
        if runs is not None:
            assert len(runs) == n_runs and all(rows[a] is not None for a, _, _ in runs)
