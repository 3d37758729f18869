"""ComfyFlowBackend's plain logic without ComfyUI (nodes/comfy/flow.py): a toy network with ComfyUI's SD3
module names stands in for the MMDiT (the real models are tested in tests/comfyui/test_dit_training_node.py).

Checked: the presets pick ComfyUI's fused Linears by name; prompts of different token lengths are refused
with the lengths (joint attention cannot be padded exactly); predict_eps is refused, predict_v gives the
policy gradient only; the written file is kohya on ComfyUI's names with `.alpha`, `ss_*` and `npo_family`,
equal to the in-memory offset (file keys); an unsupported ComfyUI model class is named in the error; close()
leaves the network as it was.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open


class _Attn(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)


class _Half(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = _Attn(d)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.x_block, self.context_block = _Half(d), _Half(d)


class ToyMMDiT(torch.nn.Module):
    """ComfyUI MMDiT names (`joint_blocks.N.{x,context}_block.attn.{qkv,proj}`, `mlp.fc1/2`), 4 channels."""

    def __init__(self, d=4):
        super().__init__()
        torch.manual_seed(0)
        self.joint_blocks = torch.nn.ModuleList([_Block(d), _Block(d)])
        self.y_embedder = torch.nn.Linear(3, d)

    def forward(self, x, sigma, context, y):
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)  # [B, hw, C]
        ctx = context.mean(1, keepdim=True) + self.y_embedder(y)[:, None] + sigma.reshape(-1, 1, 1)
        for blk in self.joint_blocks:
            a = blk.x_block.attn
            tok = tok + a.proj(a.qkv(tok + ctx)[..., :c])
            ca = blk.context_block.attn
            ctx = ctx + ca.proj(ca.qkv(ctx)[..., :c])
            tok = tok + blk.x_block.mlp.fc2(torch.relu(blk.x_block.mlp.fc1(tok)))
        tok = tok + ctx  # every context projection reaches the output
        return tok.transpose(1, 2).reshape(b, c, h, w)


def _backend(net, targets="attn"):
    from npo_suite.nodes.comfy.flow import ComfyFlowBackend
    from npo_suite.trainer.backends.diffusers import BackendOptions, LoraOptions

    modules = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}

    def forward(x, sigma, cond):
        return net(x, sigma * 1000, cond.hidden, cond.added["pooled_projections"])

    def encode_text(prompts):  # one token per word: lengths differ with the word count
        return ([torch.ones(1, len(p.split()), 4) * i for i, p in enumerate(prompts)],
                [torch.ones(1, 3) * i for i, _ in enumerate(prompts)])

    return ComfyFlowBackend(modules, forward, comfy_class="SD3", shift=3.0, family="sd3", encode_text=encode_text,
                            network=net, options=BackendOptions(lora=LoraOptions(rank=2, alpha=4.0, targets=targets)))


def test_presets_pick_comfyui_fused_linears():
    net = ToyMMDiT()
    with _backend(net) as b:
        assert [n for n, _ in b._layers] == [f"joint_blocks.{i}.{s}.attn.{m}" for i in (0, 1)
                                            for s in ("x_block", "context_block") for m in ("qkv", "proj")]
        assert b.prediction_type == "flow" and b.abar is None and b.num_train_timesteps == 1000
        assert b.scheduler.config["shift"] == 3.0
    with _backend(net, "attn_ff") as b:
        assert sum(n.endswith(("mlp.fc1", "mlp.fc2")) for n, _ in b._layers) == 8
    with pytest.raises(ValueError, match="matched no module"):
        _backend(net, "to_q,to_k")


def test_prompt_lengths_predict_and_gradients():
    net = ToyMMDiT()
    with _backend(net) as b:
        c = b.encode_prompts(["a red cube", "a blue one"])
        assert c.hidden.shape == (2, 3, 4) and c.added["pooled_projections"].shape == (2, 3)
        with pytest.raises(ValueError, match=r"encodes to 2 text tokens, the run's other prompts to 3"):
            b.encode_prompts(["two words"])
        with pytest.raises(ValueError, match="flow model"):
            b.predict_eps(torch.zeros(1, 4, 2, 2), torch.tensor([0.5]), c.index([0]))
        x = torch.randn(2, 4, 2, 2)
        t = torch.tensor([0.2, 0.9])
        with torch.no_grad():
            for p in b.trainable_parameters():
                p.normal_()
            base = b.predict_v(x, t, c, adapter=None)
        v = b.predict_v(x, t, c)
        assert v.requires_grad and not torch.allclose(v, base)
        v.pow(2).mean().backward()
        assert all(p.grad is not None for p in b.trainable_parameters())
        assert all(p.grad is None for p in net.parameters())


def test_written_file_is_kohya_on_comfyui_names(tmp_path):
    from npo_suite.core.offsets import load_offset_file_keys
    from npo_suite.core.offsets.schema import npo_metadata

    net = ToyMMDiT()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with _backend(net) as b:
        with torch.no_grad():
            for p in b.trainable_parameters():
                p.normal_()
        path = b.write_lora(tmp_path / "l.safetensors", npo_metadata(method="dpo", role="positive", **b.lora_metadata()))
        off = b.export_offset()
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha")
    mods = {f"lora_unet_joint_blocks_{i}_{s}_attn_{m}" for i in (0, 1) for s in ("x_block", "context_block")
            for m in ("qkv", "proj")}
    assert keys == {f"{k}.{s}" for k in mods for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert float(alpha) == 4.0
    assert meta["npo_family"] == "sd3" and meta["ss_base_model_version"] == "sd3" and meta["ss_network_dim"] == "2"
    assert meta["npo_trained_in"] == "comfyui" and meta["npo_comfy_model"] == "SD3"
    back = load_offset_file_keys(path)
    assert off.file_keys and set(off.unet) == set(back.unet) == mods
    for k, d in off.unet.items():
        torch.testing.assert_close(back.unet[k].dense(), d.dense(), rtol=0, atol=1e-7)
    # close(): the network is as before (no hooks, flags, values)
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_unsupported_model_class_is_named():
    from npo_suite.nodes.comfy.flow import unsupported_model_error

    WAN21 = type("WAN21", (), {"model_type": type("T", (), {"name": "FLOW"})()})
    msg = str(unsupported_model_error(WAN21()))
    assert "Wan 2.1 (WAN21) with FLOW prediction" in msg and "SD3 / SD3.5, Flux" in msg
    Other = type("MyNewDiT", (), {})
    assert "MyNewDiT with ? prediction" in str(unsupported_model_error(Other()))

