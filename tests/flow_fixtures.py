"""Shared checks of the flow-transformer tests (SD3, Flux: test_flow_families.py; SANA: test_sana.py;
test_flow_training.py, test_memory_estimate.py): tiny model folders, random offsets, the NPO per-row
contract and the "our LoRA = diffusers' loader" comparison."""
from __future__ import annotations

import torch

from npo_suite.core.npo import NPOSpec
from npo_suite.core.offsets.types import LowRankDelta


def build_flow_dirs(root) -> dict:
    """Tiny SD3 and Flux diffusers folders (seed 0) under `root`: {"sd3": path, "flux": path}."""
    from npo_suite.testing.tiny_models import build_flux, build_sd3

    build_sd3(root / "sd3", seed=0)
    build_flux(root / "flux", seed=0)
    return {"sd3": root / "sd3", "flux": root / "flux"}


def random_offset(model, targets, seed, scale=0.05, rank=2):
    """Random low-rank deltas on every Linear and ungrouped Conv2d whose name ends with one of `targets`
    (None: every one of them; grouped convs, e.g. SANA's depthwise conv_depth, are no LoRA target)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = LowRankDelta(torch.randn(rank, mod.in_features, generator=g) * scale,
                                     torch.randn(mod.out_features, rank, generator=g) * scale)
        elif isinstance(mod, torch.nn.Conv2d) and mod.groups == 1:
            out[name] = LowRankDelta(torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=g) * scale,
                                     torch.randn(mod.out_channels, rank, 1, 1, generator=g) * scale)
    assert out
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_npo_per_row(bundle, coverage: str, *, prompts, negatives, seeds, size: int, cfg_scale: float) -> None:
    """One batched forward with δ on the unconditional rows only equals one merged model per group (the
    two-model path), and differs from plain CFG. coverage "attn_ff": the family's preset modules; anything
    else: every Linear and ungrouped Conv2d. fp32: the two paths differ in summation order only (~3e-7
    measured); bound 1e-5."""
    from npo_suite.diffusers_host.generate import sample

    targets = bundle.family_spec.lora_target_modules("attn_ff") if coverage == "attn_ff" else None
    eta, delta = random_offset(bundle.unet, targets, 1), random_offset(bundle.unet, targets, 2, scale=0.2)
    spec = NPOSpec(eta=eta, delta=delta, alpha=0.5, beta=1.0)
    kw = dict(negative_prompts=negatives, offsets=spec, cfg_scale=cfg_scale, steps=3, height=size, width=size,
              decode=False)
    fast = sample(bundle, prompts, seeds, "npo", **kw).latents
    two = sample(bundle, prompts, seeds, "npo", npo_path="two-model", **kw).latents
    cfg = sample(bundle, prompts, seeds, "cfg", **kw).latents
    assert rel(fast, two) <= 1e-5, rel(fast, two)
    assert rel(fast, cfg) > 1e-3  # delta on the unconditional rows changes the result


def assert_lora_equals_diffusers(ours, theirs, base) -> None:
    """Our backend with a LoRA file as its policy adapter against diffusers' `load_lora_weights` of the same
    file, same inputs: same weights, two float32 implementations of W x + (B A) x (PEFT's per-layer form,
    scale folded into B in the file), rounding differs per layer by ~1e-7 relative, amplified through a few
    tiny layers; 1e-5 of the output scale bounds it with margin. The LoRA must act (> 1e-4 from the base)."""
    for y in (ours, theirs, base):
        assert torch.isfinite(y).all() and y.std() > 0
    assert (ours - base).abs().max() > 1e-4  # the LoRA acts
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max(), (ours - theirs).abs().max()


def velocities_with_and_without_lora(backend):
    """(x, t, cond, v with the policy adapter, v with no adapter) of `backend` on fixed inputs: 2 rows of 8x8
    latents, t 0.25 and 0.7, two prompts."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, backend.spec.latent_channels(backend.unet), 8, 8, generator=g)
    t = torch.tensor([0.25, 0.7])
    cond = backend.encode_prompts(["a photo of a cat", "a red house"])
    with torch.no_grad():
        ours = backend.predict_v(x, t, cond)
        with backend.use_adapter(None):
            base = backend.predict_v(x, t, cond)
    return x, t, cond, ours, base


def check_pairs_and_sweep(model, lora, tmp_path, capsys, *, cfg: str, size: list[str]) -> None:
    """`pairs` (npo with `lora`, the tiny local CLIP scorer at tmp_path/clip) gives rows for the two prompts, and
    `evaluate sweep` (two beta settings) one row per setting, through the CLI on `model`."""
    import json

    from npo_suite.cli import main

    assert main(["pairs", "--model", str(model), "--prompt", "a cat", "--prompt", "a red house",
                 "--samples-per-prompt", "3", "--mode", "npo", "--neg-offset", str(lora), "--steps", "2",
                 "--cfg", cfg, "--scorer", "clip_score", "--model-path", str(tmp_path / "clip"), "--rule", "all",
                 "--margin", "0", "--out", str(tmp_path / "pairs"), "--json", *size]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert rows and {r["prompt"] for r in rows} <= {"a cat", "a red house"}
    capsys.readouterr()
    assert main(["evaluate", "sweep", "--model", str(model), "--neg-offset", str(lora), "--betas", "0.5", "1.0",
                 "--prompt", "a cat", "--seeds", "0", "1", "--steps", "2", "--cfg", cfg, "--scorer", "clip_score",
                 "--guard", "clip_score", "--model-path", str(tmp_path / "clip"), "--n-boot", "50", "--json", *size]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]) == 2
