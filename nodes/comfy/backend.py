"""Training backend on ComfyUI's own loaded model (MODEL, CLIP, VAE objects): SD1.x and SDXL.

Implements `trainer/backends/base.py`'s protocol with the same adapter semantics as
`DiffusersBackend` (which it extends): named PEFT LoRA adapters "policy" (trainable), "ref" and
"ema" (frozen, on request); the reference of plain DPO is the network with every adapter off.

How the LoRA sits on ComfyUI's network without changing it:
- ComfyUI's UNet (`model.model.diffusion_model`) uses LDM module names. The backend builds a
  *diffusers-named view*: a tree of plain containers whose leaves are the very `nn.Linear` /
  `nn.Conv2d` modules of the ComfyUI UNet, at their diffusers paths (`comfy.utils.unet_to_diffusers`).
  PEFT injects its `LoraLayer`s into the view only, so the ComfyUI module tree, its state-dict keys
  and its weight patches (LoRA stacks, lowvram casting) stay untouched. Target presets, saved
  keys (kohya `lora_unet_<diffusers path>` for SD1.x, LDM names for SDXL) and the in-memory
  `Offset` (diffusers keys, the NPO_OFFSET of the sampling nodes) are those of the diffusers path.
- The LoRA acts through a forward hook on each real module:
  `y = W x + scale * B(A(x))` (Hu et al. 2021, eq. 3) for the active adapter(s) only.
  `close()` removes every hook and restores the `requires_grad` flags: the user's MODEL is the
  same network afterwards (the backend also works on a `ModelPatcher.clone()`).
- ComfyUI loads weights under `torch.inference_mode()`; autograd cannot save such tensors, so
  `_detach_inference_tensors` replaces them by normal tensors with the same values, one tensor at
  a time (no extra memory once done; values, names and modules unchanged). The training itself must run under
  `torch.inference_mode(False)` (the ComfyUI node does that).

Conversions: the network output at integer timestep `t` is eps (or v) of the DDPM process
`x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps` on latents scaled by the model's `latent_format`
(SD1.5 x0.18215, SDXL x0.13025); `abar_t = 1 / (1 + sigma_t^2)` from ComfyUI's `model_sampling`.
Text: `clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)` (honours the CLIP object's
own settings, e.g. CLIP Set Last Layer). Images: `vae.encode` ([B, H, W, C] in [0, 1]).

This module imports without ComfyUI; `comfy.*` is imported inside `ComfyBackend.from_comfy` only.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable

import torch

from ...core.offsets.keys import weight_module_map
from ...core.schedule import gather, to_eps
from ...core.cond import Cond
from ...families import FAMILIES, detect_unet_config
from ...trainer.backends.diffusers import POLICY, BackendOptions, DiffusersBackend

# ComfyUI ModelType names -> the prediction types of core.schedule.to_eps
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
# the families the ComfyUI trainer trains, for the refusal of any other (SD: ComfyBackend; SD3/Flux: ComfyFlowBackend,
# whose ComfyUI model classes are FLOW_CLASSES -> our family names)
FLOW_CLASSES = {"SD3": "sd3", "Flux": "flux"}
TRAINABLE = "SD1.x / SD2.x, SDXL (eps or v-prediction), SD3 / SD3.5, Flux"

Forward = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x_t, t, cond) -> raw network output


# ---------------------------------------------------------------------------------------------
# the diffusers-named view
# ---------------------------------------------------------------------------------------------
class DiffusersView(torch.nn.Module):
    """A module tree exposing `modules[path]` at diffusers path `path` (the modules are shared, not copied).

    `config` carries the block layout (down/up block types, layers per block, SDXL added
    conditioning) that `core.offsets.keys` needs for LDM names and family detection.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], config: dict):
        super().__init__()
        self.config = dict(config)
        for path, mod in modules.items():
            parent = self
            *heads, leaf = path.split(".")
            for h in heads:
                child = parent._modules.get(h)
                if child is None:
                    child = torch.nn.Module()
                    parent.add_module(h, child)
                parent = child
            parent.add_module(leaf, mod)

    def forward(self, *args, **kwargs):  # pragma: no cover - a view is never called
        raise RuntimeError("DiffusersView is a naming view; run the ComfyUI network instead")


def view_config(paths) -> dict:
    """Block layout of a UNet from its diffusers module paths (for `core.offsets.keys`)."""
    paths = list(paths)

    def count(prefix: str) -> int:
        idx = {int(p.split(".")[1]) for p in paths if p.startswith(prefix)}
        return 1 + max(idx) if idx else 0

    n_down, n_up = count("down_blocks."), count("up_blocks.")
    lpb = 1 + max((int(p.split(".")[3]) for p in paths if p.startswith("down_blocks.0.resnets.")), default=0)
    down = ["CrossAttnDownBlock2D" if any(p.startswith(f"down_blocks.{i}.attentions.") for p in paths) else "DownBlock2D"
            for i in range(n_down)]
    up = ["CrossAttnUpBlock2D" if any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths) else "UpBlock2D"
          for i in range(n_up)]
    added = any(p.startswith("add_embedding.") for p in paths)  # SDXL-style text_time added conditioning
    return {"down_block_types": down, "up_block_types": up, "layers_per_block": lpb,
            "addition_embed_type": "text_time" if added else None}


def network_ordered(modules: dict[str, torch.nn.Module], network: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """`modules` re-ordered by each module's position in `network.modules()` (a fixed order).

    `comfy.utils.unet_to_diffusers` builds its map by iterating Python *sets* of key names
    (`TRANSFORMER_BLOCKS`, `UNET_MAP_ATTENTIONS`, ...), whose order depends on the per-process string
    hash seed (PYTHONHASHSEED). PEFT initialises the LoRA A matrices in the view's module order from one
    seeded RNG stream, so in the map's order the same seed gave a different LoRA in every process.
    """
    position = {id(m): i for i, m in enumerate(network.modules())}
    missing = [p for p, m in modules.items() if id(m) not in position]
    if missing:
        raise ValueError(f"modules not in the network: {missing[:3]}")
    return dict(sorted(modules.items(), key=lambda kv: position[id(kv[1])]))


def _lora_hook(layer, module, args, output):
    """Forward hook: add the active adapters' low-rank update to the real module's output."""
    if layer.disable_adapters:
        return None
    x = args[0]
    out = output
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name], layer.lora_B[name]
        out = out + (b(a(x.to(a.weight.dtype))) * layer.scaling[name]).to(out.dtype)  # [B, out, ...]
    return out


def _detach_inference_tensors(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers by normal tensors with the same values; returns the count.

    The Parameter objects themselves are replaced (a tensor created under inference mode keeps no
    version counter, so swapping `.data` is not enough), as ComfyUI's own `set_attr_param` does.
    """
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def lcm_cat(hidden: list[torch.Tensor]) -> torch.Tensor:
    """[1, L_i, D] rows of different token lengths -> [B, L, D], L = lcm(L_i), each row repeated L/L_i times.

    Repeating every token of a context k times leaves cross-attention unchanged (each softmax weight
    is split into k equal parts): ComfyUI batches long prompts the same way (`CONDCrossAttn.concat`).
    """
    L = functools.reduce(math.lcm, [h.shape[1] for h in hidden])
    return torch.cat([h.repeat(1, L // h.shape[1], 1) for h in hidden])


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class ComfyBackend(DiffusersBackend):
    """Backend protocol on a ComfyUI UNet (through a diffusers-named view), CLIP and VAE.

    Build it with `ComfyBackend.from_comfy(model, clip, vae, options=...)` inside ComfyUI; the
    plain constructor takes the pieces (tests use it on a diffusers UNet, where the view is the
    identity map). Call `close()` (or use it as a context manager) when done.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], forward: Forward, *, abar: torch.Tensor,
                 prediction_type: str, family: str, encode_text: Callable[[list[str]], tuple[list, list]],
                 encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decode_latents_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", options: BackendOptions | None = None,
                 checkpoint_modules: list[torch.nn.Module] | None = None, network: torch.nn.Module | None = None,
                 source: str = "comfyui", reserve: Callable[[int], None] | None = None):
        """modules: diffusers path -> real module of the network; forward(x_t, t, cond) -> network output;
        encode_text(prompts) -> ([hidden [1, L, D]] per prompt, [pooled [1, P] or None] per prompt);
        encode_pixels: [B, 3, H, W] in [-1, 1] -> scaled latents; decode_latents_fn: the inverse;
        checkpoint_modules: blocks to run under activation checkpointing (gradient_checkpointing);
        network: the whole network (its inference tensors are converted, its flags restored on close; the
        LoRA layers are created, and seeded-initialised, in its module order, whatever the order of `modules`);
        reserve(nbytes): make room for a training working set of nbytes (ComfyUI model management)."""
        self.options = opts = options or BackendOptions()
        self._check_model(prediction_type, family, source)
        self.device = torch.device(device)
        self.family, self.prediction_type, self.source = family, prediction_type, source
        self.abar = None if abar is None else abar.to(torch.float64).cpu()  # None: a flow model (nodes/comfy/flow.py)
        self._forward, self._encode_text = forward, encode_text
        self._encode_pixels, self._decode = encode_pixels, decode_latents_fn
        self.vae, self.text_encoders, self.tokenizers, self.scheduler = None, [], [], None
        self.network = network
        self._reserve = reserve
        self.patcher = None  # from_comfy: the ModelPatcher clone that keeps the UNet loaded
        self._hooks: list = []
        self._patched_forwards: list[torch.nn.Module] = []
        self._closed = False
        if network is not None:
            modules = network_ordered(modules, network)  # the LoRA init order must not depend on the map's order
            _detach_inference_tensors(network)
        net_params = list(network.parameters()) if network is not None else \
            [p for m in modules.values() for p in m.parameters()]
        self._requires_grad = [(p, p.requires_grad) for p in net_params]
        self.unet = DiffusersView(modules, self._view_config(modules))
        self._lora_config = self._make_lora_config(opts.lora)
        self.adapters: list[str] = []
        self._layers: list = []
        self._params: dict[str, list[torch.nn.Parameter]] = {}
        try:
            for p, _ in self._requires_grad:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(opts.lora.seed)
                self._inject(POLICY)
            if opts.gradient_checkpointing:
                self._enable_checkpointing(checkpoint_modules or [])
            if opts.lora.init_path:
                self.load_lora_file(opts.lora.init_path)
            self._activate(POLICY)
        except BaseException:
            self.close()
            raise
        self._null: Cond | None = None

    def _check_model(self, prediction_type: str, family: str, source: str) -> None:
        """Refuse a model this backend cannot train (a subclass widens it: nodes/comfy/flow.py)."""
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{source}: prediction type {prediction_type!r} is not trainable here "
                             "(expected an eps- or v-prediction SD1.x/SDXL model)")
        if family not in FAMILIES or not FAMILIES[family].latent or FAMILIES[family].offsets is None:
            known = [n for n, f in FAMILIES.items() if f.latent and f.offsets is not None]
            raise ValueError(f"{source}: unsupported model family {family!r} (expected {' or '.join(known)})")

    def _view_config(self, modules: dict) -> dict:
        """The view's `config` (the UNet block layout `core.offsets.keys` reads)."""
        return view_config(modules)

    # ----------------------------------------------------------------- construction from ComfyUI
    @classmethod
    def from_comfy(cls, model, clip, vae=None, *, options: BackendOptions | None = None) -> "ComfyBackend":
        """From ComfyUI's MODEL (ModelPatcher), CLIP and VAE. Loads the UNet with ComfyUI's model
        management (a clone of the patcher: the user's MODEL keeps its own state). SD3 / Flux MODELs
        are `ComfyFlowBackend`'s (nodes/comfy/flow.py; `nodes.comfy.backends.backend_for` picks the one of a
        MODEL); any other family is refused with its name."""
        import comfy.model_management as mm
        import comfy.utils

        if type(model.model).__name__ in FLOW_CLASSES:
            raise ValueError(f"ComfyBackend trains SD1.x/SDXL UNets; this MODEL is {type(model.model).__name__}, which "
                             f"ComfyFlowBackend trains (nodes.comfy.backends.backend_for picks the backend of a MODEL)")
        mtype = getattr(model.model.model_type, "name", str(model.model.model_type))
        if mtype not in PREDICTION_TYPES:
            raise unsupported_model_error(model.model)
        patcher = model.clone()
        base = patcher.model
        dm = base.diffusion_model
        unet_config = base.model_config.unet_config
        modules, missing = {}, []
        for dk, lk in weight_module_map(comfy.utils.unet_to_diffusers(unet_config)).items():
            try:
                modules[dk] = dm.get_submodule(lk)
            except AttributeError:
                missing.append(lk + ".weight")
        if not modules:
            raise ValueError(f"{type(base).__name__}: no UNet module maps to a diffusers name; is this an SD1.x/SDXL model?")
        spec = detect_unet_config(unet_config)
        family = spec.name
        sigmas = base.model_sampling.sigmas.detach().to("cpu", torch.float64)  # [T]
        abar = 1.0 / (1.0 + sigmas ** 2)
        mm.load_models_gpu([patcher], force_full_load=True)
        device = patcher.load_device
        dtype = base.manual_cast_dtype or base.get_dtype()
        embedder = getattr(base, "embedder", None)
        latent_format = base.latent_format

        ensure_loaded, reserve = patcher_loading(mm, patcher)

        def forward(x, t, cond: Cond):
            ensure_loaded()
            y = None
            if spec.pooled and spec.time_ids:  # ComfyUI SDXL.encode_adm: pooled text + Timestep(256) of the 6 size numbers
                ids = cond.added["time_ids"].to(device, torch.float32)  # [B, 6]
                emb = embedder(ids.reshape(-1)).reshape(ids.shape[0], -1)  # [B, 1536]
                y = torch.cat([cond.added["text_embeds"].to(device, torch.float32), emb.to(device)], dim=1).to(dtype)
            return dm(x.to(device, dtype), t.to(device).float(), context=cond.hidden.to(device, dtype), y=y).float()

        encode_text, encode_pixels, decode = comfy_io(clip, vae, latent_format, device)

        blocks = [*dm.input_blocks, dm.middle_block, *dm.output_blocks]
        backend = cls(modules, forward, abar=abar, prediction_type=PREDICTION_TYPES[mtype], family=family,
                      encode_text=encode_text, encode_pixels=encode_pixels, decode_latents_fn=decode, device=device,
                      options=options, checkpoint_modules=blocks, network=dm, source=type(base).__name__,
                      reserve=reserve)
        backend.patcher = patcher
        backend.unmapped = missing
        return backend

    # ----------------------------------------------------------------- adapters
    def _inject(self, name: str) -> None:
        from peft import inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            try:
                inject_adapter_in_model(self._lora_config, self.unet, adapter_name=name)
            except ValueError as e:  # peft's NoMatchingPeftModuleError
                raise ValueError(f"{self.source}: lora targets {sorted(self._lora_config.target_modules)} matched no "
                                 f"module of the UNet ({e})") from None
        self.adapters.append(name)
        if not self._layers:
            self._layers = [(n, m) for n, m in self.unet.named_modules() if isinstance(m, LoraLayer)]
            if not self._layers:
                raise ValueError(f"lora targets {self._lora_config.target_modules} matched no module of the UNet")
            self._hooks = [m.base_layer.register_forward_hook(functools.partial(_lora_hook, m)) for _, m in self._layers]
        self._index_params(name)
        for p in self._params[name]:
            p.data = p.data.to(self.device, torch.float32)  # LoRA in float32 on the compute device

    def add_adapter(self, name: str, init_from: str | None = POLICY) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        self._inject(name)
        if init_from is None:
            self.reset_adapter(name)
        else:
            self.copy_adapter(init_from, name)
        self._activate(POLICY)

    def _enable_checkpointing(self, blocks: list[torch.nn.Module]) -> None:
        """Activation checkpointing per UNet block (recomputed in backward with the policy active)."""
        from torch.utils.checkpoint import checkpoint

        for m in blocks:
            original = m.forward

            def run(*args, __f=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(__f, *args, use_reentrant=False, **kwargs)
                return __f(*args, **kwargs)

            m.forward = run
            self._patched_forwards.append(m)

    def export_offset(self, name: str = POLICY):
        """Adapter `name` as an `Offset` keyed by diffusers paths (copies): the NPO_OFFSET of the sampling nodes."""
        from ...core.offsets.types import Offset
        from ...core.offsets import offset_from_peft

        return Offset(unet=offset_from_peft(self.unet, name, "unet"))

    def reserve_memory(self, nbytes: int) -> None:
        """Ask the host (ComfyUI model management) for room for `nbytes` of training working set; no-op without one."""
        if self._closed:
            raise RuntimeError("ComfyBackend is closed")
        if self._reserve is not None:
            self._reserve(int(nbytes))

    def close(self) -> None:
        """Release everything training added; the network is as before (same modules, weights, flags).

        Removes every hook and forward patch, drops the grads of LoRA and base parameters, restores the
        requires_grad flags, and lets go of the LoRA layers (the diffusers-named view), the ComfyUI
        patcher clone and the encode/forward closures, so nothing of the run stays reachable from a
        backend object that someone still holds."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._patched_forwards:
            m.__dict__.pop("forward", None)
        self._patched_forwards = []
        for ps in self._params.values():
            for p in ps:
                p.grad = None
        for p, flag in self._requires_grad:
            p.grad = None
            p.requires_grad_(flag)
        self._requires_grad = []
        self._params = {}
        self._layers = []
        self.adapters = []
        self.unet = None  # the view holds the LoRA layers; the real modules stay in the ComfyUI tree
        self.network = self.patcher = self._reserve = None
        self._forward = self._encode_text = self._encode_pixels = self._decode = None
        self._null = None

    def __enter__(self) -> "ComfyBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- protocol
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, negative: bool = False) -> Cond:
        # negative: ComfyUI's CLIP encodes a negative prompt as any other (the SD, SD3 and Flux families alike)
        hidden, pooled = self._encode_text(list(prompts))
        h = lcm_cat(hidden).to(self.device)  # [B, L, D]
        if not self.spec.pooled:
            return Cond(h)
        if any(p is None for p in pooled):
            raise ValueError(f"{self.source}: the CLIP model returned no pooled output; {self.spec.display_name} needs it")
        return Cond(h, {"text_embeds": torch.cat(pooled).to(self.device), "time_ids": self.time_ids(len(prompts))})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._encode_pixels is None:
            raise ValueError(f"{self.source}: no VAE given; connect a VAE to train on images")
        return self._encode_pixels(pixels).float().to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self._decode is None:
            raise ValueError(f"{self.source}: no VAE given; connect a VAE to decode latents")
        return self._decode(latents).float()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None = POLICY) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("ComfyBackend is closed")
        grad = adapter == POLICY and torch.is_grad_enabled()
        with self.use_adapter(adapter), torch.set_grad_enabled(grad):
            pred = self._forward(x_t.to(self.device), t.to(self.device), cond.to(self.device)).float()  # [B, C, h, w]
        return to_eps(pred, x_t.float().to(pred.device), gather(self.abar, t, pred), self.prediction_type)

    def lora_metadata(self) -> dict[str, str]:
        return {**super().lora_metadata(), "trained_in": "comfyui"}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._params.get(POLICY, []))
        return (f"ComfyBackend({self.source}, {self.family}, {self.prediction_type}, adapters={self.adapters}, "
                f"policy params={n:,}, rank={self.options.lora.rank}, device={self.device})")



def unsupported_model_error(base_model) -> ValueError:
    """The error for a ComfyUI model this trainer does not train, naming its class and prediction type."""
    from .keymap import FAMILIES as KNOWN

    cls = type(base_model).__name__
    mtype = getattr(getattr(base_model, "model_type", None), "name", "?")
    name = f"{KNOWN[cls]} ({cls})" if cls in KNOWN else cls
    return ValueError(f"Train Preference LoRA: this MODEL is {name} with {mtype} prediction, a model family the "
                      f"trainer does not train; it trains {TRAINABLE}")

def patcher_loading(mm, patcher):
    """(ensure_loaded(), reserve(nbytes)) for a ComfyUI ModelPatcher through model management `mm`: the model
    fully loaded (before every forward: another node may have offloaded it), and room for a training working set
    of nbytes beside it, the way comfy_extras/nodes_train.py asks (with an estimate, not 1e20)."""

    def ensure_loaded():
        mm.load_models_gpu([patcher], force_full_load=True)

    def reserve(nbytes: int) -> None:
        mm.load_models_gpu([patcher], memory_required=int(nbytes), force_full_load=True)

    return ensure_loaded, reserve


def comfy_io(clip, vae, latent_format, device):
    """(encode_text, encode_pixels, decode) on ComfyUI's CLIP and VAE objects: text as
    `clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)` per prompt (the CLIP object's own settings,
    e.g. CLIP Set Last Layer), pixels [B, 3, H, W] in [-1, 1] through `vae.encode` / `vae.decode` and the model's
    `latent_format` (its scale and shift). encode_pixels / decode are None without a VAE."""

    def encode_text(prompts):
        hidden, pooled = [], []
        for p in prompts:
            c, pl = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
            hidden.append(c.float().cpu())
            pooled.append(pl.float().cpu() if pl is not None else None)
        return hidden, pooled

    if vae is None:
        return encode_text, None, None

    def encode_pixels(px):
        img = ((px.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [B, H, W, 3] in [0, 1]
        return latent_format.process_in(vae.encode(img[..., :3]).float()).to(device)  # [B, C, h, w]

    def decode(latents):
        img = vae.decode(latent_format.process_out(latents.float().cpu()))  # [B, H, W, 3] in [0, 1]
        return (img.float().permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1).to(device)

    return encode_text, encode_pixels, decode


@contextlib.contextmanager
def training_mode():
    """Autograd on, inference mode off: ComfyUI runs nodes under `torch.inference_mode()`."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
