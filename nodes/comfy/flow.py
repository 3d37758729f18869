"""Training backend on ComfyUI's flow-matching DiTs: SD3 / SD3.5 (`comfy.ldm.modules.diffusionmodules.mmdit`)
and Flux (`comfy.ldm.flux`).

Same adapter semantics as `ComfyBackend` (which it extends): named LoRA adapters "policy" / "ref" /
"ema" injected by PEFT into a naming view of the real modules, acting through forward hooks on them,
so ComfyUI's module tree, state-dict keys and weight patches stay untouched; `close()` restores it.

What differs from the UNet backend:
- Names: the view keeps ComfyUI's own module paths (`joint_blocks.0.x_block.attn.qkv`,
  `double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`), so the LoRA targets are ComfyUI's
  (fused) Linears (`LORA_TARGETS`); a diffusers name (`to_q`) matches nothing and is refused.
- The file: kohya `lora_unet_<module path with underscores>.lora_down/lora_up.weight` + `.alpha`, the
  names `comfy.lora.model_lora_keys_unet` builds from the model's own state dict (so ComfyUI's
  LoraLoader consumes every key), `ss_*` metadata with `ss_base_model_version` "sd3" / "flux1" and
  `npo_family`. The in-memory offset (NPO_OFFSET) has the same keys (`Offset.file_keys`), which the
  sampling nodes resolve with the same key map (nodes/comfy/keymap.py).
- The model: ComfyUI's `model_sampling` is CONST (rectified flow): x_t = (1 − σ)·x0 + σ·ε and the
  network output is the velocity v = ε − x0 (`BaseModel._apply_model`: denoised = x_t − σ·v). The
  backend is a flow backend (`prediction_type` "flow", `abar` None, `predict_v(x_t, t, cond)` with
  t = σ ∈ [0, 1]): it calls the diffusion model exactly as `_apply_model` does, at
  `model_sampling.timestep(σ)` (SD3: σ·1000, Flux: σ, which Flux scales by 1000 itself), so the trainer's
  t and ComfyUI's σ are the same number and the methods' flow forms (trainer/methods.py `Noising`) apply.
- Text: `clip.encode_from_tokens(tokens, return_pooled=True)` of the CLIP object: SD3's CLIP-L/G + T5
  context and pooled `y`; Flux's T5 context and CLIP-L pooled `y`. Flux-dev's embedded guidance is
  `BackendOptions.flux_guidance` (1.0 while training, as the diffusers backend: our default, not a
  measured choice); a Flux without a guidance embedding (schnell) gets none.
- Joint attention attends over text and image tokens together, so repeating text tokens to a common
  length (exact for the UNet's cross-attention, `lcm_cat`) would change the result: every prompt of a
  run must encode to the same token count (SD3: 77 CLIP + T5 min 77; Flux: T5 min 256 tokens); a longer
  prompt is refused with its length, never padded.

This module imports without ComfyUI; `comfy.*` is imported inside `ComfyFlowBackend.from_comfy` only.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch

from ...core.cond import Cond
from ...core.offsets.schema import metadata_value
from ...core.flow import FLOW
from ...trainer.backends.diffusers import POLICY, BackendOptions
from .backend import FLOW_CLASSES, ComfyBackend, comfy_io, patcher_loading, unsupported_model_error

# ComfyUI model class (comfy/model_base.py) -> our family name

# LoRA target presets on ComfyUI's module names (PEFT suffixes), per ComfyUI model class. Flux's single
# blocks fuse attention and MLP into linear1 (qkv + mlp in) / linear2 (proj + mlp out): "attn" takes them
# whole, as kohya's Flux LoRAs do.
LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "SD3": {"attn": ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")},
    "Flux": {"attn": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")},
}
LORA_TARGETS["SD3"]["attn_ff"] = LORA_TARGETS["SD3"]["attn"] + ("mlp.fc1", "mlp.fc2")
LORA_TARGETS["Flux"]["attn_ff"] = LORA_TARGETS["Flux"]["attn"] + ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")


# ComfyUI model classes whose blocks add residuals in place (comfy/ldm/flux/layers.py: `txt += ...` in
# DoubleStreamBlock, `x += ...` in SingleStreamBlock) on tensors autograd has saved (the LayerNorm input):
# inference code, but a backward pass through it fails ("modified by an inplace operation").
INPLACE_RESIDUALS = ("Flux",)


def _pack_saved(t: torch.Tensor):
    """Saved-tensor hook: a copy of every saved activation (a tensor with a grad_fn), so that ComfyUI's
    in-place residual adds cannot change what backward reads; weights and LoRA parameters (leaves, no
    grad_fn) are kept as they are (no copy of the model)."""
    return t.clone() if t.grad_fn is not None else t


def _copy_saved_activations():
    """Backward through ComfyUI's Flux: the activations autograd saves are copies (`_pack_saved`). Cost: one
    copy of each saved activation (the original is freed once the forward moves on); values unchanged."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved, lambda t: t)


def kohya_key(path: str) -> str:
    """ComfyUI module path -> the kohya LoRA name ComfyUI's key map gives its weight."""
    return "lora_unet_" + path.replace(".", "_")


class ComfyFlowBackend(ComfyBackend):
    """Backend protocol on ComfyUI's SD3 / Flux diffusion model (a flow backend: `predict_v`)."""

    def __init__(self, modules, forward, *, comfy_class: str, shift: float, comfy_patcher=None, **kw):
        """modules: ComfyUI module path -> Linear of the diffusion model; forward(x_t, σ, cond) -> velocity;
        comfy_class: "SD3" or "Flux" (the LoRA presets); shift: the model's static timestep shift (the
        validation preview's Euler schedule); comfy_patcher: the ModelPatcher whose key map reads
        `init_lora` files; the rest as `ComfyBackend` (abar None, prediction_type "flow")."""
        if comfy_class not in LORA_TARGETS:
            raise ValueError(f"ComfyFlowBackend: no LoRA targets for ComfyUI model class {comfy_class!r}")
        self.comfy_class = comfy_class
        self._comfy_patcher = comfy_patcher
        self._txt_len: int | None = None
        super().__init__(modules, forward, abar=None, prediction_type=FLOW, **kw)
        self.scheduler = types.SimpleNamespace(config={"num_train_timesteps": 1000, "shift": float(shift)})

    def _check_model(self, prediction_type: str, family: str, source: str) -> None:
        if prediction_type != FLOW or family not in FLOW_CLASSES.values():
            raise ValueError(f"{source}: ComfyFlowBackend trains flow models of families {sorted(FLOW_CLASSES.values())}, "
                             f"got family {family!r} with prediction {prediction_type!r}")

    def _view_config(self, modules: dict) -> dict:
        return {"comfy_class": self.comfy_class}  # ComfyUI's own names: no UNet block layout

    def lora_target_modules(self, targets) -> list[str]:
        """A preset of `LORA_TARGETS[comfy_class]` or a comma list / sequence of ComfyUI module-name suffixes."""
        if isinstance(targets, (list, tuple)):
            return list(targets)
        presets = LORA_TARGETS[self.comfy_class]
        if targets in presets:
            return list(presets[targets])
        names = [s.strip() for s in str(targets).split(",") if s.strip()]
        if not names:
            raise ValueError(f"lora targets {targets!r}: expected a preset ({', '.join(presets)}) or ComfyUI module names")
        return names

    def _make_lora_config(self, lora):
        from peft import LoraConfig

        if lora.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {lora.rank}")
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=self.lora_target_modules(lora.targets),
                          init_lora_weights="gaussian")

    # ----------------------------------------------------------------- construction from ComfyUI
    @classmethod
    def from_comfy(cls, model, clip, vae=None, *, options: BackendOptions | None = None) -> "ComfyFlowBackend":
        """From ComfyUI's SD3 / Flux MODEL (ModelPatcher), CLIP and VAE (a clone of the patcher is loaded
        with ComfyUI's model management; the user's MODEL keeps its own state)."""
        import comfy.model_management as mm

        opts = options or BackendOptions()
        comfy_class = type(model.model).__name__
        if comfy_class not in FLOW_CLASSES:
            raise unsupported_model_error(model.model)
        patcher = model.clone()
        base = patcher.model
        dm = base.diffusion_model
        ms = base.model_sampling
        mtype = getattr(base.model_type, "name", str(base.model_type))
        if mtype not in ("FLOW", "FLUX"):
            raise ValueError(f"{comfy_class}: model type {mtype}, expected ComfyUI's rectified-flow sampling (FLOW / FLUX)")
        # every Linear of the diffusion model, at its ComfyUI path (the presets pick among them)
        modules = {n: m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
        # Flux's ModelSamplingFlux shifts by exp(mu) (`flux_time_shift`), SD3's by `shift` (`time_snr_shift`)
        shift = math.exp(float(ms.shift)) if comfy_class == "Flux" else float(ms.shift)
        guidance_embed = bool(base.model_config.unet_config.get("guidance_embed", False))
        mm.load_models_gpu([patcher], force_full_load=True)
        device = patcher.load_device
        dtype = base.manual_cast_dtype or base.get_dtype()
        latent_format = base.latent_format

        ensure_loaded, reserve = patcher_loading(mm, patcher)

        def forward(x, sigma, cond: Cond):
            """The diffusion model's output (the velocity) as `BaseModel._apply_model` calls it."""
            ensure_loaded()
            t = ms.timestep(sigma.to(device).float()).float()  # SD3: σ·1000; Flux: σ
            kw = {}
            if comfy_class == "Flux" and guidance_embed:
                kw["guidance"] = torch.full((x.shape[0],), float(opts.flux_guidance), device=device, dtype=dtype)
            return dm(x.to(device, dtype), t, context=cond.hidden.to(device, dtype),
                      y=cond.added["pooled_projections"].to(device, dtype), **kw).float()

        encode_text, encode_pixels, decode = comfy_io(clip, vae, latent_format, device)

        blocks = [*dm.joint_blocks] if comfy_class == "SD3" else [*dm.double_blocks, *dm.single_blocks]
        backend = cls(modules, forward, comfy_class=comfy_class, shift=shift, comfy_patcher=patcher,
                      family=FLOW_CLASSES[comfy_class],
                      encode_text=encode_text, encode_pixels=encode_pixels, decode_latents_fn=decode, device=device,
                      options=opts, checkpoint_modules=blocks, network=dm, source=comfy_class, reserve=reserve)
        backend.patcher = patcher
        backend.unmapped = []
        backend.guidance = float(opts.flux_guidance) if comfy_class == "Flux" and guidance_embed else None
        return backend

    def _enable_checkpointing(self, blocks: list[torch.nn.Module]) -> None:
        """Activation checkpointing per block. ComfyUI's Flux blocks add to their input tensors in place
        (`txt += ...`, `x += ...`), which would change the inputs the checkpoint keeps for the recomputation:
        there each block runs on copies of its tensor inputs (values unchanged)."""
        if self.comfy_class not in INPLACE_RESIDUALS:
            return super()._enable_checkpointing(blocks)
        for m in blocks:
            original = m.forward

            def on_copies(*args, __f=original, **kwargs):
                def cp(v):
                    return v.clone() if isinstance(v, torch.Tensor) else v

                return __f(*[cp(a) for a in args], **{k: cp(v) for k, v in kwargs.items()})

            m.forward = on_copies
        super()._enable_checkpointing(blocks)

    # ----------------------------------------------------------------- protocol
    @property
    def num_train_timesteps(self) -> int:
        return 1000  # the trainer's flow t ∈ [0, 1]; the network's own timestep is `model_sampling.timestep(σ)`

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, negative: bool = False) -> Cond:
        # negative: ComfyUI's CLIP encodes a negative prompt as any other (the SD, SD3 and Flux families alike)
        prompts = list(prompts)
        hidden, pooled = self._encode_text(prompts)
        want = self._txt_len if self._txt_len is not None else hidden[0].shape[1]
        bad = [(p, h.shape[1]) for p, h in zip(prompts, hidden) if h.shape[1] != want]
        if bad:
            p, n = bad[0]
            raise ValueError(f"{self.source}: prompt {p[:80]!r} encodes to {n} text tokens, the run's other prompts to "
                             f"{want}; joint attention attends over text and image tokens together, so prompts of "
                             f"different lengths cannot share a batch exactly (padding or repeating tokens changes the "
                             f"attention). Shorten the prompt ({len(bad)} prompt(s) differ)")
        if any(p is None for p in pooled):
            raise ValueError(f"{self.source}: the CLIP model returned no pooled output; {self.spec.display_name} needs it")
        self._txt_len = want
        return Cond(torch.cat(hidden).to(self.device), {"pooled_projections": torch.cat(pooled).to(self.device)})

    def predict_eps(self, x_t, t, cond, adapter=POLICY):
        raise ValueError(f"predict_eps: {self.source} is a flow model (velocity prediction, continuous t); use predict_v")

    def predict_v(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None = POLICY) -> torch.Tensor:
        """The velocity v = ε − x0 [B, C, h, w] at noise level t = σ [B] in [0, 1], only `adapter` active."""
        if self._closed:
            raise RuntimeError("ComfyFlowBackend is closed")
        grad = adapter == POLICY and torch.is_grad_enabled()
        saved = _copy_saved_activations() if grad and self.comfy_class in INPLACE_RESIDUALS else contextlib.nullcontext()
        with self.use_adapter(adapter), torch.set_grad_enabled(grad), saved:
            return self._forward(x_t.to(self.device), t.to(self.device).float(), cond.to(self.device)).float()

    # ----------------------------------------------------------------- files
    def export_offset(self, name: str = POLICY):
        """Adapter `name` as an `Offset` keyed like the saved file (kohya names ComfyUI's key map resolves,
        `Offset.file_keys`): the NPO_OFFSET of the sampling nodes (nodes/comfy/keymap.py)."""
        from ...core.offsets import offset_from_peft
        from ...core.offsets.types import Offset

        deltas = offset_from_peft(self.unet, name, "unet")  # ComfyUI module path -> LowRankDelta
        return Offset(unet={kohya_key(p): d for p, d in deltas.items()}, file_keys=True)

    def write_lora(self, path, metadata: dict) -> "object":
        """The policy LoRA as a kohya file on ComfyUI's names (+ `.alpha`, `ss_*`, `npo_family`), atomically;
        `trainer.validation.save_lora` calls it."""
        from ...core.offsets import save_offset

        meta = {**metadata, "ss_base_model_version": self.spec.base_model_version}
        return save_offset(self.export_offset(), path, format="kohya", metadata=meta, family=self.family)

    def load_lora_file(self, path: str, name: str = POLICY) -> None:
        """Start adapter `name` from a LoRA file (`init_lora`): its keys resolved with ComfyUI's key map of
        this model; every module must be one of this run's targets, with this run's rank (refused otherwise)."""
        from ...core.offsets import load_offset_file_keys
        from .keymap import map_file_keys

        if self._comfy_patcher is None:
            raise ValueError(f"{path}: no ComfyUI model to resolve its keys with")
        off = load_offset_file_keys(path)
        mapped = map_file_keys(off.unet, self._comfy_patcher)
        if mapped.unmatched:
            raise ValueError(f"{path}: {len(mapped.unmatched)} key(s) do not apply to this {self.source} model "
                             f"(e.g. {mapped.unmatched[0]})")
        ours = {p: m for p, m in self._layers}
        missing = [p for p in mapped.modules if p not in ours]
        if missing:
            raise ValueError(f"{path}: {len(missing)} LoRA modules are not targets of this run (e.g. {missing[:3]}); "
                             "choose lora targets that include them")
        scale = self.options.lora.alpha / self.options.lora.rank
        pending = {}
        for p, d in mapped.modules.items():
            a, b = ours[p].lora_A[name].weight, ours[p].lora_B[name].weight
            down, up = getattr(d, "down", None), getattr(d, "up", None)
            if down is None or getattr(d, "mid", None) is not None:
                raise ValueError(f"{path}: module {p} is not a plain low-rank delta; cannot continue training from it")
            if down.numel() != a.numel() or up.numel() != b.numel():
                raise ValueError(f"{path}: module {p} has rank {d.rank}, this run uses lora rank "
                                 f"{self.options.lora.rank}; set lora_rank={d.rank}")
            pending[p] = (down.reshape(a.shape), up.reshape(b.shape) * (d.scale / scale))
        with torch.no_grad():
            for p, (down, up) in pending.items():
                ours[p].lora_A[name].weight.copy_(down)
                ours[p].lora_B[name].weight.copy_(up)

    def close(self) -> None:
        super().close()
        self._comfy_patcher = None  # the training clone of the MODEL's patcher: nothing of the run stays reachable

    def lora_metadata(self) -> dict[str, str]:
        o = self.options.lora
        meta = {"lora_rank": str(o.rank), "lora_alpha": str(o.alpha),
                "lora_targets": ",".join(self.lora_target_modules(o.targets)), "family": self.family,
                "trained_in": "comfyui", "comfy_model": self.comfy_class}
        if getattr(self, "guidance", None) is not None:
            meta["flux_guidance"] = metadata_value(self.guidance)  # "1": the embedded guidance while training
        return meta

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._params.get(POLICY, []))
        return (f"ComfyFlowBackend({self.source}, {self.family}, flow, adapters={self.adapters}, "
                f"policy params={n:,}, rank={self.options.lora.rank}, device={self.device})")

