"""Training backend on a diffusers denoiser + its text encoder(s): a UNet2DConditionModel (SD1.x, SDXL,
the digits worlds) or a flow-matching transformer of a `families.flow.FlowFamily` (SD3/SD3.5, Flux, SANA).

Implements `trainer/backends/base.py`'s protocol. All LoRA adapters live on ONE network as named
PEFT adapters ("policy" trainable; "ref"/"ema" frozen copies on request); the reference of plain
DPO is the base network with every adapter switched off (diffusers
`examples/research_projects/diffusion_dpo`), always inside a context manager with try/finally.

Conventions:
- Text encoders are frozen (eval, requires_grad False, run under no_grad): only UNet LoRA is
  trained, as in Diffusion-DPO / Diff-SNPO. Prompt embeddings can therefore be cached.
- SD1.x conditioning: last hidden state of the CLIP text encoder. SDXL: penultimate hidden states
  of both encoders concatenated, pooled `text_embeds` of encoder 2, `time_ids` from the size
  conditioning (original size, crop top-left, target size), as the SDXL pipeline builds them.
- The null conditioning ∅ is what the model saw under CFG dropout: SD1.x the encoded empty
  prompt; SDXL zeros when the model's pipeline config says `force_zeros_for_empty_prompt`
  (the SDXL default), else the encoded empty prompt (`BackendOptions.sdxl_null`).
- Images are encoded with the VAE posterior mean (deterministic, so latent caches are exact);
  `vae=None` means pixel space (the digits world): encode/decode are the identity.
- Flow transformers (SD3, Flux): the family's own pipeline encoding (`encode_text`) gives the text
  sequence and the pooled projection (`Cond.added["pooled_projections"]`); ∅ is the encoded empty
  prompt, as the pipelines' negative prompt; the network is called through the family's
  `pack` / `velocity` / `unpack` (Flux packs 2x2 latent patches into tokens) at timestep t·1000;
  SANA: Gemma2's hidden states with the text mask as `Cond.added["encoder_attention_mask"]` (cached and
  concatenated like the pooled projection), prompts with the pipeline's instruction prefix, ∅ the encoded ""
  without it (the pipeline's negative), DC-AE latents (deterministic encoder, no posterior);
  Flux-dev's embedded guidance is `BackendOptions.flux_guidance` (1.0 while training: our default,
  not taken from a measured comparison; not a TrainConfig field yet). After the cache is filled the text encoders can be released
  (`release_text_encoders`): a T5-XXL is 4.7 B parameters the training step never uses.
- Resting state: the "policy" adapter is active between calls; gradient checkpointing recomputes
  forwards during backward in that state, so every adapter switch is undone in a `finally`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from ...core.conditioning import vae_decode
from ...core.flow import FLOW, to_model_timestep
from ...core.schedule import abar_from_scheduler, gather, to_eps
from ...core.cond import Cond
from ...families import Family, family_with_text_encoders, get_family

POLICY = "policy"

@dataclass
class LoraOptions:
    rank: int = 8
    alpha: float = 8.0
    targets: str | list[str] = "attn"
    init_path: str | None = None  # continue training from this LoRA file (kohya/PEFT, via core.offsets)
    seed: int = 0  # seeds the policy's random down-projection init (up-projections start at zero)


@dataclass
class BackendOptions:
    lora: LoraOptions = field(default_factory=LoraOptions)
    gradient_checkpointing: bool = False
    weight_dtype: torch.dtype = torch.float32  # frozen base weights; LoRA weights stay float32
    resolution: int = 512  # SDXL default size conditioning (pixels)
    sdxl_null: str = "zeros"  # "zeros" (pipeline default) or "empty" (encoded "")
    flux_guidance: float = 1.0  # Flux-dev's embedded guidance while training (guidance_embeds models only)


class DiffusersBackend:
    """Backend protocol on a diffusers UNet (+ CLIP text encoder(s), + optional VAE)."""

    def __init__(self, unet, text_encoders, tokenizers, scheduler, vae=None, *, family: str | None = None,
                 prediction_type: str | None = None, device: str | torch.device = "cpu",
                 options: BackendOptions | None = None):
        self.options = opts = options or BackendOptions()
        self.device = torch.device(device)
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.family = family or family_with_text_encoders(len(self.text_encoders)).name
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        # a flow model (rectified flow, core/flow.py) has no alphas_cumprod: its methods read continuous t
        self.abar = None if self.prediction_type == FLOW else abar_from_scheduler(scheduler)
        for m in [*self.text_encoders, *([vae] if vae is not None else []), unet]:
            m.requires_grad_(False).to(self.device)
            if m.dtype != opts.weight_dtype:
                m.to(dtype=opts.weight_dtype)
        for m in [*self.text_encoders, *([vae] if vae is not None else [])]:
            m.eval()
        if opts.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self._lora_config = self._make_lora_config(opts.lora)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.lora.seed)
            unet.add_adapter(self._lora_config, adapter_name=POLICY)
        self.adapters: list[str] = [POLICY]
        self._layers = self._tuner_layers()
        self._params: dict[str, list[torch.nn.Parameter]] = {}
        self._index_params(POLICY)
        for p in self._params[POLICY]:
            p.data = p.data.float()  # LoRA in float32 under mixed precision (diffusers `cast_training_params`)
        if opts.lora.init_path:
            self.load_lora_file(opts.lora.init_path)
        self._activate(POLICY)
        self._null: Cond | None = None

    @property
    def is_transformer(self) -> bool:
        """A flow-matching transformer family (SD3, Flux): called through the family's velocity()."""
        return self.spec.is_flow_transformer

    @property
    def spec(self) -> Family:
        """The model family (`families.get_family(self.family)`): text encoding, null conditioning, LoRA targets."""
        return get_family(self.family)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "DiffusersBackend":
        zeros = getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", None)
        if zeros is not None:
            kwargs["options"] = _with_null(kwargs.get("options"), zeros)
        tes = [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]
        toks = [tk for tk in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if tk is not None]
        return cls(pipe.unet, tes, toks, pipe.scheduler, getattr(pipe, "vae", None), **kwargs)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> "DiffusersBackend":
        """From `families.loading.ModelBundle` (its `force_zeros_for_empty_prompt` picks the SDXL ∅)."""
        if get_family(bundle.family).force_zeros_for_empty_prompt:
            kwargs["options"] = _with_null(kwargs.get("options"), getattr(bundle, "force_zeros_for_empty_prompt", True))
        return cls(bundle.unet, bundle.text_encoders, bundle.tokenizers, bundle.scheduler, bundle.vae,
                   family=bundle.family, prediction_type=bundle.prediction_type, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer=None, vae=None, prediction_type: str | None = None,
                        **kwargs) -> "DiffusersBackend":
        """A diffusers folder or a single-file checkpoint, through `families.loading.load_model` (tokenizer,
        vae, prediction_type: its overrides)."""
        from ...families.loading import load_model

        return cls.from_bundle(load_model(path, tokenizer=tokenizer, vae=vae, prediction_type=prediction_type), **kwargs)

    def _make_lora_config(self, lora: LoraOptions):
        from peft import LoraConfig

        if lora.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {lora.rank}")
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=self.spec.lora_target_modules(lora.targets),
                          init_lora_weights="gaussian")

    def _tuner_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        layers = [(n, m) for n, m in self.unet.named_modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise ValueError(f"lora targets {self._lora_config.target_modules} matched no module of the UNet")
        return layers

    def _index_params(self, name: str) -> None:
        self._params[name] = [p for _, m in self._layers for d in (m.lora_A, m.lora_B) for p in d[name].parameters()]

    # ----------------------------------------------------------------- adapters
    def _activate(self, name: str | None) -> None:
        """Only `name` active (None: all off); requires_grad: policy True, every other adapter False."""
        for _, m in self._layers:
            if name is None:
                m.enable_adapters(False)
            else:
                m.set_adapter(name)
                m._disable_adapters = False  # enable without enable_adapters' second set_adapter pass
        for a, ps in self._params.items():
            for p in ps:
                p.requires_grad_(a == POLICY)

    @contextlib.contextmanager
    def use_adapter(self, name: str | None):
        """Run the network with only `name` active (None = base), restoring the policy afterwards."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; existing: {self.adapters}")
        if name == POLICY:
            yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(POLICY)

    def add_adapter(self, name: str, init_from: str | None = POLICY) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        with warnings.catch_warnings():  # peft warns about a second adapter: that is the design here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            self.unet.add_adapter(self._lora_config, adapter_name=name)
        self.adapters.append(name)
        self._index_params(name)
        for p in self._params[name]:
            p.data = p.data.float()
        if init_from is None:
            self.reset_adapter(name)
        else:
            self.copy_adapter(init_from, name)
        self._activate(POLICY)

    @torch.no_grad()
    def copy_adapter(self, src: str, dst: str) -> None:
        for d, s in zip(self._params[dst], self._params[src]):
            d.copy_(s)

    @torch.no_grad()
    def ema_update(self, dst: str, src: str, decay: float) -> None:
        for d, s in zip(self._params[dst], self._params[src]):
            d.mul_(decay).add_(s.detach(), alpha=1 - decay)

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        for _, m in self._layers:
            m.lora_B[name].weight.zero_()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params[POLICY])

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """{"<module path>.lora_A": down, "<module path>.lora_B": up} of adapter `name` (cloned, float32)."""
        out = {}
        for path, m in self._layers:
            out[f"{path}.lora_A"] = m.lora_A[name].weight.detach().float().cpu().clone()
            out[f"{path}.lora_B"] = m.lora_B[name].weight.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{p}.lora_{ab}" for p, _ in self._layers for ab in "AB"}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"adapter state for {name!r} does not match this LoRA layout (missing {missing}, unexpected {extra})")
        for path, m in self._layers:
            m.lora_A[name].weight.copy_(state[f"{path}.lora_A"])
            m.lora_B[name].weight.copy_(state[f"{path}.lora_B"])

    def load_lora_file(self, path: str, name: str = POLICY) -> None:
        """Initialise adapter `name` from a LoRA file (continue training), via core.offsets.load_offset.

        The file's own scale (alpha/r) is folded into the up-projection so that the adapter's
        effect equals the file's: up' = up * file_scale / our_scale. Ranks must match.
        """
        from ...core.offsets import load_offset

        offset = load_offset(path, base=self.unet)
        ours = {p: m for p, m in self._layers}
        scale = self.options.lora.alpha / self.options.lora.rank
        missing = [k for k in offset.unet if k not in ours]
        if missing:
            raise ValueError(f"{path}: {len(missing)} LoRA modules are not targets of this run "
                             f"(e.g. {missing[:3]}); choose lora targets that include them")
        if offset.text_encoders:
            raise ValueError(f"{path}: has text-encoder LoRA weights; the trainer trains the UNet only")
        pending = {}
        for key, delta in offset.unet.items():
            m = ours[key]
            down, up = getattr(delta, "down", None), getattr(delta, "up", None)
            if down is None or getattr(delta, "mid", None) is not None:
                raise ValueError(f"{path}: module {key} is not a plain low-rank delta; cannot continue training from it")
            a, b = m.lora_A[name].weight, m.lora_B[name].weight
            if down.numel() != a.numel() or up.numel() != b.numel():
                raise ValueError(f"{path}: module {key} has rank {delta.rank}, this run uses lora rank "
                                 f"{self.options.lora.rank}; set lora_rank={delta.rank}")
            pending[key] = (down.reshape(a.shape), up.reshape(b.shape) * (delta.scale / scale))
        with torch.no_grad():
            for key, (down, up) in pending.items():  # all checks passed: nothing half-applied
                ours[key].lora_A[name].weight.copy_(down)
                ours[key].lora_B[name].weight.copy_(up)

    # ----------------------------------------------------------------- protocol
    @property
    def num_train_timesteps(self) -> int:
        if self.abar is None:  # flow: the network's timestep is t·N
            return int(self.scheduler.config.num_train_timesteps)
        return int(self.abar.shape[0])

    def time_ids(self, batch_size: int, original_size=None, crop_top_left=(0, 0), target_size=None) -> torch.Tensor:
        """SDXL size conditioning [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        res = (self.options.resolution, self.options.resolution)
        row = [*(original_size or res), *crop_top_left, *(target_size or res)]
        return torch.tensor([row] * batch_size, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, negative: bool = False) -> Cond:
        """Conditioning of `prompts`; negative: as the family's pipeline encodes a negative / null prompt (SANA:
        without its instruction prefix; the same encoding for every other family)."""
        prompts = list(prompts)
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released after caching (release_text_encoders); this "
                               "run encodes every prompt before training")
        if self.is_transformer:  # [B, L, D], pooled [B, P] (SD3, Flux) or the text mask [B, L] (SANA)
            hidden, second = self.spec.encode_text(self.tokenizers, self.text_encoders, prompts, self.device,
                                                   negative=negative)
            return Cond(hidden.float(), {self.spec.text_added_key: second.float()})
        hidden, pooled = self.spec.encode_text(self.tokenizers, self.text_encoders, prompts, self.device)
        if pooled is None:
            return Cond(hidden.float())  # [B, L, D]
        return Cond(hidden.float(),  # [B, L, D1 + D2]
                    {"text_embeds": pooled.float(), "time_ids": self.time_ids(len(prompts))})

    def release_text_encoders(self) -> int:
        """Drop the text encoders (after the cache holds every prompt's encoding and ∅ is cached); returns
        the parameters freed. Later `encode_prompts` calls fail with a clear error."""
        self.null_cond(1)
        n = sum(p.numel() for te in self.text_encoders for p in te.parameters())
        self.text_encoders = []
        return n

    def set_null_cond(self, cond: Cond) -> None:
        """∅ given, not encoded: a backend without text encoders whose host encodes text itself (the memory
        estimate's host-encoded trace, `memory_estimate.HostEncoded`). cond: one row [1, L, D]."""
        if cond.hidden.shape[0] != 1:
            raise ValueError(f"set_null_cond: one row expected, got a batch of {cond.hidden.shape[0]}")
        self._null = cond

    def null_cond(self, batch_size: int) -> Cond:
        if self._null is None:
            c = self.encode_prompts([""], negative=True)
            if self.spec.force_zeros_for_empty_prompt and self.options.sdxl_null == "zeros":
                c = Cond(torch.zeros_like(c.hidden), {"text_embeds": torch.zeros_like(c.added["text_embeds"]),
                                                      "time_ids": c.added["time_ids"]})
            self._null = c
        return self._null.repeat(batch_size)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel space: the "latents" are the pixels
            x = pixels.to(self.device, torch.float32)  # [B, 3, H, W]
            c = self.unet.config.in_channels
            if x.shape[1] == c:
                return x
            if c == 1:  # grey model (the digits world): data transforms give RGB, exact for grey images
                return x.mean(1, keepdim=True)  # [B, 1, H, W]
            raise ValueError(f"pixel-space model takes {c} channels, got images with {x.shape[1]}")
        px = pixels.to(self.device, self.vae.dtype)  # [B, 3, H, W] in [-1, 1]
        enc = self.vae.encode(px)
        # [B, C, H/8, W/8]; SANA's DC-AE (AutoencoderDC) is deterministic: its `latent` ([B, 32, H/32, W/32])
        latents = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        x = vae_decode(self.vae, latents.to(self.device))  # [B, C, H, W]
        return x if self.vae is None else x.clamp(-1, 1)

    def _forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond, adapter: str | None) -> torch.Tensor:
        """The network's raw output [B, C, h, w] (float32) with only `adapter` active; grad for the policy only."""
        grad = adapter == POLICY and torch.is_grad_enabled()
        cond = cond.to(self.device)
        added = {k: v.to(self.unet.dtype) for k, v in cond.added.items()} or None
        with self.use_adapter(adapter), torch.set_grad_enabled(grad):
            if self.is_transformer:
                spec, (h, w) = self.spec, x_t.shape[-2:]
                x = spec.pack(x_t.to(self.device, self.unet.dtype))  # the transformer's token layout
                out = spec.velocity(self.unet, x, timestep.to(self.device, torch.float32), cond.hidden.to(self.unet.dtype),
                                    added or {}, h=h, w=w, guidance=self.options.flux_guidance)
                return spec.unpack(out, h, w).float()  # [B, C, h, w]
            pred = self.unet(x_t.to(self.unet.dtype), timestep.to(self.device), encoder_hidden_states=cond.hidden.to(self.unet.dtype),
                             added_cond_kwargs=added).sample  # [B, C, h, w]
        return pred.float()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None = POLICY) -> torch.Tensor:
        if self.prediction_type == FLOW:
            raise ValueError("predict_eps: this is a flow model (velocity prediction, continuous t); use predict_v")
        pred = self._forward(x_t, t, cond, adapter)
        return to_eps(pred, x_t.float(), gather(self.abar, t, pred), self.prediction_type)

    def predict_v(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None = POLICY) -> torch.Tensor:
        """Flow models: the velocity v = ε − x0 at noise level t [B] in [0, 1] (the network sees t·N)."""
        if self.prediction_type != FLOW:
            raise ValueError(f"predict_v: this model predicts {self.prediction_type!r}, not a flow velocity")
        return self._forward(x_t, to_model_timestep(t.float(), self.num_train_timesteps), cond, adapter)

    def lora_metadata(self) -> dict[str, str]:
        o = self.options.lora
        return {"lora_rank": str(o.rank), "lora_alpha": str(o.alpha),
                "lora_targets": ",".join(self.spec.lora_target_modules(o.targets)), "family": self.family}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._params[POLICY])
        return (f"DiffusersBackend({self.family}, {self.prediction_type}, adapters={self.adapters}, "
                f"policy params={n:,}, rank={self.options.lora.rank}, device={self.device})")



def _with_null(options: BackendOptions | None, force_zeros: bool) -> BackendOptions:
    """A copy of `options` whose SDXL null conditioning follows the model's own pipeline setting."""
    from dataclasses import replace

    return replace(options or BackendOptions(), sdxl_null="zeros" if force_zeros else "empty")
