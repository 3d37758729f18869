"""The device peak of a training run, known before the run: one real step traced on fake tensors.

`estimate_run(cfg, model)` builds the model's denoiser (a UNet, or a flow transformer: SD3/SD3.5, Flux),
text encoder(s) and VAE from their configs under PyTorch's `FakeTensorMode` (no weights are read, no memory
is used), wraps them in the real `DiffusersBackend` with the run's settings, and then runs what the run runs,
in its order:

  weights     the components in the run's weight dtype, the policy LoRA and the method's extra
              adapters (ref / ema), all resident on the device from here on
  cache_fill  one batch of `LatentCache.fill` (FILL_BATCH records) through the real
              `LatentCache.encode_records`: the batch's pixels on the host, at most
              `cfg.cache_batch_size` images per VAE call on the device (float32, then the VAE's
              dtype), each call's latents moved off at once, the text encoder(s) on its prompts
  train_step  one micro-batch of a steady-state step: the optimizer state allocated (one step on
              zero gradients) and, with grad_accum > 1, the previous micro-batch's gradients held;
              then the method's own `compute` (policy forward on winner + loser, the no-grad
              reference / teacher forwards with the adapter switched), the backward, gradient
              clipping and the optimizer step. (The first step and micro-batch hold less: tracing
              them changed no peak at tiny or full size, and tripled the trace's time.)
              Without a `cache_dir` nothing is filled ahead: each record is encoded when first read,
              mid-training, with the optimizer state resident (traced there).
              A flow transformer's text encoders (T5-XXL: 4.8 B values) are then released when the trainer
              releases them (`loop.release_text_encoders`, the same function: cache_dir set, no validation,
              a method that encodes no text while training), so the step holds what the real step holds.

FSDP (`fsdp: true`, `processes` N > 1: `train --dry-run --processes N`): one process's peak. The run's order
(trainer/fsdp.py): the transformer is built on the host, the text encoders and the VAE fill the cache on the
device, then the run's own `fsdp.shard_transformer` shards it, here on a fake process group (torch's "fake"
backend: this process is rank 0 of N, collectives move nothing; FSDP2 pads every shard to the same size, so
every rank holds the same). The step then runs through FSDP2's own hooks: each unit's all-gather buffer and
gathered parameters are allocated and freed (`UntypedStorage.resize_`, counted by `LiveBytes.storage_resizes`)
when FSDP2 does it (forward: the running unit's parameters and its all-gather buffer, held until the next
unit's gather; backward: the running unit and the next one prefetched; the root unit from its forward to the
end of the backward); the LoRA's gradients go through the loop's all-reduce (`loop.all_reduce_grads`). On a
GPU the whole transformer sits in host memory until sharded (not counted). Checked against two real gloo
processes' CPU allocator (tests/test_fsdp.py).

Flow transformers: any diffusers folder whose `transformer/config.json` names a class of
`TRANSFORMER_FAMILIES` (the extension point: a family's transformer class there, its family registered, its
folder shipped), every component built from the class its config names; shipped `sd35m`, `flux1dev`, `sana1600m`.
A host that encodes text and images with its own models (ComfyUI's CLIP and VAE) traces the transformer
config alone with `HostEncoded` shapes: no text encoder, VAE or cache fill (nodes/comfy/memory.py).
Attention is traced as the fused SDPA kernel PyTorch picks (`_scaled_dot_product_flash_attention_for_cpu`
on the fake CPU tensors: no sequence x sequence matrix, as flash / memory-efficient attention on a GPU).

`LiveBytes` (a TorchDispatchMode) counts every tensor storage alive at each dispatched op (each
storage once, rounded up to the CUDA caching allocator's 512-byte blocks) and its peak per phase:
on real tensors this is what `torch.cuda.max_memory_allocated` counts, so the same code measures
a real step (`measure_run`, on CPU) and estimates it on fake tensors.

What it does not count (stated in `Estimate.notes`): the CUDA context and the allocator's
reserved-but-free blocks (`card_fits` adds `CONTEXT_GIB` and `ALLOCATOR_SLACK`), cuDNN / cuBLAS
workspaces, the validation sampler (no-grad forwards, smaller than a training step; not traced),
and the fp16 GradScaler's few scalars. On a GPU the run keeps the weights in the preset's dtype
(`loop.build_backend`); the trace does the same and runs autocast with the preset's dtype on
CPU-shaped fake tensors (no GPU is needed). adamw8bit (bitsandbytes) is counted analytically.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, is_traceable_wrapper_subclass

GIB = 2 ** 30
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes
CONTEXT_GIB = 1.0  # CUDA context + cuBLAS/cuDNN handles and workspaces, outside PyTorch's allocator
ALLOCATOR_SLACK = 1.10  # reserved / allocated of the caching allocator at a training peak (fragmentation)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = {"sd15": "sd15", "sd1": "sd15", "sdxl": "sdxl", "sd35m": "sd35m", "flux1dev": "flux1dev", "sana1600m": "sana1600m"}
SMALL = 1 << 16  # ops on real tensors this small run for real (timesteps, masks), so Python can read them


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK if nbytes else 0


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive, and their peak, at every dispatched op; `phase(name)` records
    the peak inside a named phase. `run_real_small`: inside FakeTensorMode, ops whose tensor inputs
    are all real (not fake) and small, and factories of small tensors, run for real, so code that
    reads a timestep (`bool((s < t).any())`, the optimizer's step count) works on a fake trace;
    whatever meets a fake tensor becomes fake. Off while modules are built (their parameters stay
    fake). Real or fake, every storage is counted the same way."""

    def __init__(self, run_real_small: bool = False):
        super().__init__()
        self.live = self.peak = 0
        self.run_real_small = run_real_small
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes counted now (0: host memory)
        self._on_host: set[int] = set()
        self.phases: dict[str, dict[str, float]] = {}
        self._open: list[list] = []  # [name, start, peak]
        self._host = False  # inside `host()`: storages made are host memory, not the device's

    @contextlib.contextmanager
    def host(self, on: bool = True):
        """Storages created inside are host (CPU) memory of a GPU run: registered, never counted."""
        prev, self._host = self._host, on
        try:
            yield
        finally:
            self._host = prev

    # ------------------------------------------------------------------ accounting
    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" and not _is_fake(t):
            return
        if is_traceable_wrapper_subclass(t):  # a DTensor (fsdp's shards): its storage is its local tensor's,
            return  # tracked as such; the wrapper's own reports the global size
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key in self._bytes:
            return
        n = 0 if self._host else _rounded(st.nbytes())
        self._bytes[key] = n
        if self._host:
            self._on_host.add(key)
        self.live += n
        weakref.finalize(st, self._free, key)
        self._bump()

    def to_device(self, t: torch.Tensor) -> None:
        """A storage registered as host memory (`host()`) now counted on the device (fsdp: the adapters and
        buffers of a transformer built on the host, moved to the device when it is sharded)."""
        key = id(t.untyped_storage())
        if key in self._on_host:
            self._on_host.discard(key)
            self._resized(t.untyped_storage())

    def _resized(self, st) -> None:
        key = id(st)
        if key in self._bytes and key not in self._on_host:
            n = _rounded(st.nbytes())
            self.live += n - self._bytes[key]
            self._bytes[key] = n
            self._bump()

    @contextlib.contextmanager
    def storage_resizes(self):
        """Count `UntypedStorage.resize_`, which no op dispatch shows: FSDP2 frees a gathered unit by resizing
        its storages to 0 and gathers the next time into the same storages (`_fsdp_param.free_storage`,
        `alloc_storage`)."""
        cls = torch.UntypedStorage
        own = "resize_" in cls.__dict__
        orig = cls.resize_

        def resize_(st, size):
            out = orig(st, size)
            self._resized(st)
            return out
        cls.resize_ = resize_
        try:
            yield
        finally:
            if own:
                cls.resize_ = orig
            else:
                del cls.resize_

    def track_module(self, *modules) -> None:
        for m in modules:
            if m is not None:
                for t in [*m.parameters(), *m.buffers()]:
                    self.track(t)

    def _free(self, key: int) -> None:
        self._on_host.discard(key)
        self.live -= self._bytes.pop(key, 0)

    def _bump(self) -> None:
        self.peak = max(self.peak, self.live)
        for ph in self._open:
            ph[2] = max(ph[2], self.live)

    @contextlib.contextmanager
    def phase(self, name: str):
        ph = [name, self.live, self.live]
        self._open.append(ph)
        try:
            yield
        finally:
            self._open.remove(ph)
            self.phases[name] = {"start": ph[1], "peak": ph[2], "end": self.live}

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.run_real_small and self._real_ok(func, args, kwargs):
            with _disable_current_modes():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in _tensors(out):
            self.track(t)
        return out

    @staticmethod
    def _real_ok(func, args, kwargs) -> bool:
        fake = _fake_type()
        seen = False
        for t in _tensors((args, tuple(kwargs.values()))):
            if isinstance(t, fake) or t.numel() > SMALL:
                return False
            seen = True
        return seen or _requested_numel(args) <= SMALL


def _tensors(x):
    """The tensors in an op's arguments or result: aten's schemas nest only tuples and lists (what
    `tree_flatten` finds there, at a fraction of its cost: this runs on every op of a trace)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (tuple, list, dict)):
                yield from _tensors(v)
    elif isinstance(x, dict):
        yield from _tensors(tuple(x.values()))


_FAKE = None


def _fake_type():
    global _FAKE
    if _FAKE is None:
        from torch._subclasses.fake_tensor import FakeTensor

        _FAKE = FakeTensor
    return _FAKE


def _is_fake(t) -> bool:
    return isinstance(t, _fake_type())


def _requested_numel(args) -> int:
    size = args[0] if args else ()
    if isinstance(size, (float, bool)) or isinstance(size, tuple) and not size:  # scalar_tensor, torch.tensor(0.0)
        return 1
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
        return math.prod(size)
    return SMALL + 1


# ---------------------------------------------------------------------------- the model from configs
@dataclass
class ModelConfigs:
    family: str  # "sd1" | "sdxl" | a flow transformer family ("sd3", "flux", ...: TRANSFORMER_FAMILIES)
    folder: Path
    unet: dict  # the denoiser's config: `unet/config.json`, or `transformer/config.json` of a transformer model
    text_encoders: list[dict]
    vae: dict | None
    scheduler: dict
    source: str

    @property
    def is_transformer(self) -> bool:
        return self.unet.get("_class_name") in TRANSFORMER_FAMILIES


@dataclass(frozen=True)
class HostEncoded:
    """The shapes a host that encodes text and images itself (ComfyUI's CLIP and VAE, before the first step)
    hands the training step, per sample. Traced with one (`trace_run(host=...)`), the model is the denoiser
    alone: no text encoder, no VAE and no cache fill are built or counted (they are the host's models), and
    the step's batch has these shapes."""

    hidden: tuple[int, int]  # [L, D]: text tokens x width of the conditioning
    added: dict  # Cond.added key -> its per-sample shape, e.g. {"pooled_projections": (P,)}
    latent: tuple[int, int, int]  # [C, h, w]: the latents the host's VAE gives at the run's resolution


# A transformer folder's family, from its `transformer/config.json` `_class_name`. The extension point of the
# trace: a family whose components diffusers / transformers build from their configs (every class named by
# `_class_name` / `architectures`), registered in `families.FAMILIES` with its `encode_text` / `velocity`, is
# traced by adding its transformer class here and shipping its folder under configs/ (SHIPPED).
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana"}


def resolve_model(model: str) -> ModelConfigs:
    """A shipped config name (`sd15`, `sdxl`, `sd35m`, `flux1dev`), a diffusers folder, or a single-file
    checkpoint (its family from the tensor names in the header; the shipped configs for that family)."""
    if model in SHIPPED:
        folder = CONFIG_DIR / SHIPPED[model]
    elif Path(model).is_file():
        folder = CONFIG_DIR / ("sdxl" if _single_file_family(Path(model)) == "sdxl" else "sd15")
    elif Path(model).is_dir():
        folder = Path(model)
    else:
        raise FileNotFoundError(f"model {model!r}: not a shipped config ({', '.join(SHIPPED)}), a diffusers "
                                f"folder or a checkpoint file")

    def read(sub: str, name: str = "config.json") -> dict | None:
        p = folder / sub / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    sched = read("scheduler", "scheduler_config.json") or {}
    transformer = read("transformer")
    if transformer is not None:
        cls = transformer.get("_class_name")
        if cls not in TRANSFORMER_FAMILIES:
            raise ValueError(f"{folder}: transformer {cls!r}: the memory estimate traces "
                             f"{', '.join(TRANSFORMER_FAMILIES)} (and UNet models); add its family to "
                             "memory_estimate.TRANSFORMER_FAMILIES")
        tes = [c for c in (read("text_encoder"), read("text_encoder_2"), read("text_encoder_3")) if c is not None]
        return ModelConfigs(TRANSFORMER_FAMILIES[cls], folder, transformer, tes, read("vae"), sched, model)
    unet = read("unet")
    if unet is None:
        raise FileNotFoundError(f"{folder}: no unet/config.json or transformer/config.json")
    tes = [c for c in (read("text_encoder"), read("text_encoder_2")) if c is not None]
    return ModelConfigs("sdxl" if len(tes) == 2 else "sd1", folder, unet, tes, read("vae"), sched, model)


def _single_file_family(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in keys):
        return "sd1"
    raise ValueError(f"{path}: not an SD1.x/SDXL single-file checkpoint")


def _text_encoder(config: dict, index: int, in_default_dtype: bool = False):
    """A text encoder from its config: the class its `architectures` names (CLIP with or without projection,
    T5EncoderModel, ...), the config class of its `model_type`; an SDXL second encoder without
    `architectures` is CLIP with projection. in_default_dtype: built in the default dtype (the run's weight
    dtype, as `from_pretrained(torch_dtype=...)` loads it), not the config's `torch_dtype`."""
    import transformers

    arch = (config.get("architectures") or [""])[0]
    if not arch or not in_default_dtype and index == 1:  # UNet models: SDXL's second encoder has the projection
        arch = "CLIPTextModelWithProjection" if index == 1 or "WithProjection" in arch else "CLIPTextModel"
    drop = {"architectures", "model_type", "transformers_version"} | ({"torch_dtype", "dtype"} if in_default_dtype else set())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in drop}
    cfg = transformers.AutoConfig.for_model(config.get("model_type", "clip_text_model"), **kwargs)
    return getattr(transformers, arch)(cfg).eval()


def build_components(mc: ModelConfigs):
    """(denoiser, text_encoders, vae, scheduler) from the configs, random init, in the current mode and
    default dtype: a UNet2DConditionModel, or the diffusers class a transformer config names."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if mc.is_transformer:
        net = getattr(diffusers, mc.unet["_class_name"]).from_config(mc.unet)
        # buffers built in float32 (SD3's 384x384 sin-cos `pos_embed`, 0.23 B values) are in the checkpoint, which
        # `from_pretrained(torch_dtype=...)` loads in the run's dtype
        for m in net.modules():
            for k, b in m._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != torch.get_default_dtype():
                    m._buffers[k] = b.to(torch.get_default_dtype())
    else:
        net = UNet2DConditionModel.from_config(mc.unet)
    tes = [_text_encoder(c, i, in_default_dtype=mc.is_transformer) for i, c in enumerate(mc.text_encoders)]
    vae = None
    if mc.vae is not None:
        vae = getattr(diffusers, mc.vae.get("_class_name", "AutoencoderKL"), AutoencoderKL).from_config(mc.vae).eval()
    sched_cls = getattr(diffusers, mc.scheduler.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    if not mc.is_transformer:
        return net, tes, vae, sched_cls.from_config(mc.scheduler)
    with _disable_current_modes():  # a flow scheduler reads its sigmas (`.item()`): real, float32, a few KB
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return net, tes, vae, sched_cls.from_config(mc.scheduler)
        finally:
            torch.set_default_dtype(default)


def tokens(text_encoder_config: dict) -> "_Tokens":
    """The tokenizer stand-in for a text encoder config: its full context of token ids (a T5 encoder has
    relative positions and no context of its own: the family asks for its `t5_max_length`)."""
    return _Tokens(int(text_encoder_config.get("max_position_embeddings", 512)))


class _Tokens:
    """A tokenizer stand-in: every prompt is `max_length` token ids when the caller asks for a length (the
    pipelines' padding to max_length), else `length` (the encoder's full context), with an all-ones attention
    mask. `encode(text)` (SANA counts its instruction prefix's tokens) gives one token per UTF-8 byte: the
    most a byte-fallback tokenizer can give, so the traced text length is an upper bound."""

    padding_side = "right"

    def __init__(self, length: int):
        self.model_max_length = length

    def encode(self, text: str, **_kwargs) -> list[int]:
        return [0] * len(text.encode("utf-8"))

    def __call__(self, prompts, max_length=None, **_kwargs):
        n = self.model_max_length if max_length is None else int(max_length)

        class Out:
            input_ids = torch.zeros(len(prompts), n, dtype=torch.long)
            attention_mask = torch.ones(len(prompts), n, dtype=torch.long)
        return Out()


# ---------------------------------------------------------------------------- the trace
@dataclass
class Estimate:
    peak_gib: float
    phases: dict[str, dict[str, float]]  # GiB: start / peak / end of each phase
    settings: dict
    fake: bool = True
    notes: list[str] = field(default_factory=list)
    base_weights_gib: float = 0.0  # the frozen components (UNet, text encoder(s), VAE) in the weight dtype
    beyond_base_bytes: int | None = None  # the same difference in bytes, unrounded (the phases are rounded to 1e-4 GiB)

    def training_beyond_base_gib(self) -> float:
        """The training step's peak beyond the base weights (LoRA, adapters, optimizer state, grads,
        activations): what a host that already holds the model (ComfyUI) must find free."""
        if self.beyond_base_bytes is not None:
            return self.beyond_base_bytes / GIB
        return max(ph["peak"] for ph in self.phases["train_step"].values()) - self.base_weights_gib

    def card_gib(self, context_gib: float = CONTEXT_GIB, slack: float = ALLOCATOR_SLACK) -> float:
        """What a GPU must have for this run: the allocator's peak with its slack, plus the CUDA context."""
        return self.peak_gib * slack + context_gib

    def fits(self, card_gib: float, **kwargs) -> bool:
        return self.card_gib(**kwargs) <= card_gib

    def to_json(self) -> str:
        d = asdict(self)
        if self.settings.get("device") == "cuda":
            d["card_gib"] = round(self.card_gib(), 3)
            d["allowance"] = {"cuda_context_gib": CONTEXT_GIB, "allocator_slack": ALLOCATOR_SLACK}
        return json.dumps(d)


def _weight_dtype(cfg, device: str) -> torch.dtype:
    if device != "cuda":
        return torch.float32  # loop.build_backend: CPU runs keep float32 weights
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def _autocast(cfg, device: str):
    """The run's autocast (accelerate's), on CPU-shaped tensors: fp16/bf16 as on the GPU."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    if dtype is None or device != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def images_per_record(kind: str, cfg) -> int:
    """Images the cache fill VAE-encodes per record: pairs 2; prompt records with an image 1 (+1 for a
    loser image); a `ddspo-prepare` folder holds latents already (0)."""
    if kind == "pairs":
        return 2
    if kind == "prompts_with_winners":
        return 0 if cfg.ddspo_loser == "generated" else 1
    return 1


def fake_batch(backend, mc: ModelConfigs, kind: str, B: int, resolution: int, device, random: bool = False,
               host: HostEncoded | None = None):
    """A micro-batch of the run's kind and shapes (zeros; random=True: standard normal latents and text
    states, for a real step); host: the shapes a host's own encoders give (`HostEncoded`)."""
    from .batches import Cond, PairBatch, PromptBatch

    zeros = torch.zeros
    if random:
        def zeros(*shape, device=None):  # noqa: E306
            return torch.randn(*shape, device=device)
    # the VAE's down-sampling: AutoencoderKL 2^(levels - 1), AutoencoderDC (SANA) 2^(encoder levels - 1)
    blocks = None if mc.vae is None else (mc.vae.get("block_out_channels") or mc.vae["encoder_block_out_channels"])
    down = 2 ** (len(blocks) - 1) if blocks else 1
    C, h = mc.unet.get("in_channels", 4), resolution // down
    if host is not None:
        (C, h, w), (L, D) = host.latent, host.hidden
        if h != w:
            raise ValueError(f"memory estimate: square latents only (the run's resolution), got {h} x {w}")
        added = {k: torch.zeros(B, *shape, device=device) for k, shape in host.added.items()}
    elif mc.is_transformer:  # the conditioning's layout is the family's own: that of the cached ∅ (`null_cond`)
        C = backend.spec.latent_channels(backend.unet)
        null = backend.null_cond(1)
        L, D = null.hidden.shape[1:]
        added = {k: torch.zeros(B, *v.shape[1:], device=device) for k, v in null.added.items()}
        del null
    else:
        L = backend.tokenizers[0].model_max_length
        D = mc.unet["cross_attention_dim"]
        added = {}
    if backend.family == "sdxl":
        added = {"text_embeds": torch.zeros(B, mc.text_encoders[-1].get("projection_dim", 1280), device=device),
                 "time_ids": torch.zeros(B, 6, device=device)}
    cond = Cond(zeros(B, L, D, device=device), added)
    lat = lambda: zeros(B, C, h, h, device=device)  # noqa: E731
    if kind == "pairs":
        return PairBatch(lat(), lat(), cond, ["x"] * B)
    if kind == "prompts_with_winners":
        neg = Cond(zeros(B, L, D, device=device), {k: torch.zeros_like(v) for k, v in added.items()})
        return PromptBatch(["x"] * B, cond, lat(), lat(), neg_cond=neg)
    return PromptBatch(["x"] * B, cond, lat(), latent_shape=(C, h, h))


def _optimizer(cfg, params, device: str):
    """The run's optimizer for traced runs; adamw8bit is counted analytically (`_adamw8bit_bytes`)."""
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "adamw8bit":
        return None
    return torch.optim.AdamW(params, lr=cfg.lr, foreach=device == "cuda")


def _adamw8bit_bytes(params) -> int:
    """bitsandbytes AdamW8bit state: two uint8 moments + one float32 absmax per 256-value block each,
    float32 moments for tensors under 4096 values (`min_8bit_size`)."""
    total = 0
    for p in params:
        n = p.numel()
        total += _rounded(n) * 2 + _rounded(4 * -(-n // 256)) * 2 if n >= 4096 else _rounded(4 * n) * 2
    return total


def fill_records(cfg, n_records: int | None = None) -> int:
    """Records one fill batch encodes together: `LatentCache.fill`'s batch (FILL_BATCH), fewer when the
    data has fewer; without a `cache_dir` nothing is filled ahead and each record is encoded alone when
    first read (`LatentCache._get`)."""
    from .data.cache import FILL_BATCH

    n = FILL_BATCH if cfg.cache_dir else 1
    return max(1, min(n, n_records)) if n_records else n


def fill_batch(cfg, kind: str, n_records: int, pixels) -> tuple[list, list[dict]]:
    """One fill batch as `LatentCache.fill` hands it to `encode_records`: n records of the run's data kind
    and their decoded images (`pixels()` -> [3, R, R] each; `images_per_record` of them per record)."""
    from ..core.prompts import PromptRecord
    from .data.records import PairRecord
    from .data.transforms import SizeCond

    per = images_per_record(kind, cfg)
    R = cfg.resolution
    size = SizeCond((R, R), (0, 0), (R, R))
    records, preps = [], []
    for i in range(n_records):
        if kind == "pairs":
            records.append(PairRecord(f"r{i}", "x", "w.png", "l.png"))
            preps.append({"px_w": pixels(), "size_w": size, "px_l": pixels(), "size_l": size})
        else:
            records.append(PromptRecord(f"r{i}", "x", "w.png" if per else None,
                                        "y" if kind == "prompts_with_winners" else None,
                                        "l.png" if per > 1 else None))
            preps.append({} if not per else {"px_w": pixels(), "size_w": size} if per == 1 else
                         {"px_w": pixels(), "size_w": size, "px_l": pixels(), "size_l": size})
    return records, preps


def _trace_fill(tracker: LiveBytes, backend, cfg, kind: str, n_records: int, on_gpu: bool) -> dict:
    """One batch of the real `LatentCache.fill` on fake records: the batch's decoded pixels on the host
    (float32 [3, R, R] each), `LatentCache.encode_records` sending at most `cfg.cache_batch_size` of
    them per VAE call to the device and taking each call's latents off at once, then the text
    encoder(s) on the batch's prompts. on_gpu: host and device are apart (a CPU run has one memory)."""
    from .data.cache import LatentCache

    per = images_per_record(kind, cfg)
    R = cfg.resolution

    def pixels():
        with tracker.host(on_gpu):
            return torch.zeros(3, R, R)

    def to_device_and_back(x):  # `x.to(device)`, encode, `.to("cpu")` as LatentCache._encode_images does
        d = x.clone() if on_gpu else x
        lat = backend.encode_images(d)
        del d
        if not on_gpu:
            return lat
        with tracker.host():
            return lat.clone()

    records, preps = fill_batch(cfg, kind, n_records, pixels)
    cache = LatentCache(None, "estimate", to_device_and_back, backend.encode_prompts, encode_batch=cfg.cache_batch_size)
    out = cache.encode_records(records, preps)
    del out, preps
    return {"fill_records": n_records, "fill_images": per * n_records,
            "images_per_vae_call": min(cfg.cache_batch_size, per * n_records) if per else 0}


def trace_run(cfg, model: str | ModelConfigs, *, device: str = "cuda", fake: bool = True,
              n_records: int | None = None, seed: int = 0, host: HostEncoded | None = None,
              processes: int | None = None) -> Estimate:
    """Trace the run's memory (module docstring). device: "cuda" (the run on a GPU: weights in the
    preset's dtype, autocast) or "cpu" (as `train` runs on CPU: float32 weights, no autocast).
    fake=False runs the same on real tensors of random-init components (the measurement).
    n_records: records in the data, when known (a smaller set fills in one smaller batch).
    host: the host encodes text and images itself, before training (`HostEncoded`): `model` is then a
    denoiser config alone (no text encoders, no VAE), nothing is filled, the step's batch has host's shapes.
    processes: the processes the run is launched with (torchrun --nproc_per_node); needed with `fsdp`,
    whose estimate is one process's (module docstring, "FSDP")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..core.cond import Cond
    from ..core.flow import FLOW
    from .backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions
    from .loop import all_reduce_grads, release_text_encoders
    from .methods import METHODS

    mc = model if isinstance(model, ModelConfigs) else resolve_model(model)
    if host is not None and (mc.text_encoders or mc.vae is not None):
        raise ValueError(f"memory estimate: {mc.source}: a host-encoded trace takes the denoiser's config alone "
                         "(the host's text encoders and VAE are not traced)")
    world, sharded = _processes(cfg, mc, processes)
    method = METHODS[cfg.method]
    kind = method.data_kind
    records = fill_records(cfg, n_records)
    wdtype = _weight_dtype(cfg, device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    tracker = LiveBytes(run_real_small=fake)
    notes = [] if world == 1 or sharded else [f"{world} processes without fsdp (DDP): each holds what one process "
                                              "holds, plus the gradients' all-reduce buffer (traced)"]
    on_gpu = device == "cuda"
    torch.manual_seed(seed)
    with _fake_process_group(world) as mesh, fake_mode, _swap_same_is_noop():
        default = torch.get_default_dtype()
        torch.set_default_dtype(wdtype)  # built in the run's weight dtype (a fake module cannot be cast)
        try:
            unet, tes, vae, sched = build_components(mc)
        finally:
            torch.set_default_dtype(default)
        toks = [tokens(c) for c in mc.text_encoders]
        with tracker, tracker.storage_resizes():
            tracker.run_real_small = False
            with tracker.phase("weights"), tracker.host(sharded and on_gpu):
                # fsdp: the transformer and its adapters are built on the host and sharded onto the device later
                tracker.track_module(unet)
                with tracker.host(False):
                    tracker.track_module(vae, *tes)
                base = tracker.live
                backend = DiffusersBackend(unet, tes, toks, sched, vae, family=mc.family, device="cpu",
                                           prediction_type=FLOW if mc.is_transformer else None,
                                           options=BackendOptions(
                                               lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                                                None, cfg.seed),
                                               gradient_checkpointing=cfg.gradient_checkpointing,
                                               resolution=cfg.resolution, weight_dtype=wdtype))
                for name in method.extra_adapters(cfg):  # Method.setup without DDSPO's rewriter model
                    backend.add_adapter(name, init_from="policy")
                if host is not None:  # ∅ in the host's shapes (SNPO, TDFT and validation read it)
                    backend.set_null_cond(Cond(torch.zeros(1, *host.hidden),
                                               {k: torch.zeros(1, *shape) for k, shape in host.added.items()}))
            tracker.run_real_small = fake
            def cache_fill():
                with tracker.phase("cache_fill"), torch.no_grad():
                    return _trace_fill(tracker, backend, cfg, kind, records, on_gpu=on_gpu)

            ahead = bool(cfg.cache_dir) or host is not None  # encoded before training starts
            if host is not None:  # the host encoded every record before training, with its own models
                with tracker.phase("cache_fill"):
                    fill = {"fill_records": 0, "fill_images": 0, "images_per_vae_call": 0}
                notes.append("host-encoded: the text encoders, the VAE and the encoding of the data are the host's "
                             "(not traced); the step's batch has the host's shapes")
            elif cfg.cache_dir:  # filled before training starts
                fill = cache_fill()
            released = 0
            t5 = [c for c in mc.text_encoders if c.get("model_type") == "t5"]
            if mc.is_transformer and wdtype == torch.float16 and t5:
                wo = sum(c["num_layers"] * c["d_ff"] * c["d_model"] for c in t5) * 2 / GIB
                notes.append(f"fp16: transformers loads T5's `wo` projections in float32 (`_keep_in_fp32_modules`); "
                             f"traced in fp16, {wo:.2f} GiB less than the run holds while the text encoders are loaded")
            if mc.is_transformer and host is None:  # what `loop.train` does next: the text encoders freed when nothing encodes later
                said = io.StringIO()
                with contextlib.redirect_stderr(said):  # its own words: why they are kept, or how many are freed
                    released = release_text_encoders(cfg, backend, method, verbose=True)
                del tes
                gc.collect()  # the freed encoders' storages leave the count (their finalizers run)
                notes.append(f"{said.getvalue().strip()} (loop.release_text_encoders, after the cache fill): "
                             + ("the training step holds the transformer and the VAE, not the text encoders"
                                if released else "the training step holds them too"))
            shard = _trace_shard(tracker, backend, mesh, notes, on_gpu) if sharded else None
            params = backend.trainable_parameters()
            opt = _optimizer(cfg, params, device)
            opt_extra = _adamw8bit_bytes(params) if opt is None else 0
            if opt is None:
                notes.append(f"adamw8bit state counted analytically: {opt_extra / 2**20:.1f} MiB")
            # the steady state after the first optimizer step: its state allocated (AdamW makes its
            # moments on the first step), and, with grad_accum > 1, the gradients of the previous
            # micro-batch held while the next one runs (what the first step and micro-batch leave)
            for p in params:
                p.grad = torch.zeros_like(p)
            if opt is not None:
                opt.step()
            if cfg.grad_accum < 2 or not ahead:
                for p in params:
                    p.grad = None
            if not ahead:  # each record encoded when the batch stream first reads it, mid-training
                fill = cache_fill()
                if cfg.grad_accum >= 2:
                    for p in params:
                        p.grad = torch.zeros_like(p)
            gen = torch.Generator("cpu").manual_seed(seed)
            batch = fake_batch(backend, mc, kind, cfg.batch_size, cfg.resolution, "cpu", host=host)
            with tracker.phase("step.forward"), _autocast(cfg, device):
                out = method.compute(backend, batch, cfg, gen)
            with tracker.phase("step.backward"):
                (out.loss / cfg.grad_accum).backward()
            del out, batch
            with tracker.phase("step.optimizer"):
                all_reduce_grads(SimpleNamespace(num_processes=world), params)  # the loop's (a no-op on one)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e9,
                                               foreach=device == "cuda")
                if opt is not None:
                    opt.step()
                opt.zero_grad(set_to_none=True) if opt is not None else [setattr(p, "grad", None) for p in params]
            del opt
    extra = {"weights": 0, "shard": 0, "cache_fill": 0 if ahead else opt_extra}
    beyond = max(ph["peak"] for name, ph in tracker.phases.items() if name.startswith("step.")) + opt_extra - base
    phases = {name: {k: (v + extra.get(name, opt_extra)) / GIB for k, v in ph.items()}
              for name, ph in tracker.phases.items()}
    phases = {"weights": phases["weights"], "cache_fill": phases["cache_fill"],
              **({"shard": phases["shard"]} if sharded else {}),
              "train_step": {k.split(".", 1)[1]: v for k, v in phases.items() if k.startswith("step.")}}
    peak = max(phases["cache_fill"]["peak"], phases.get("shard", {}).get("peak", 0),
               *(ph["peak"] for ph in phases["train_step"].values()))
    settings = {"model": mc.source, "family": mc.family, "device": device, "method": cfg.method,
                "weight_dtype": str(wdtype).replace("torch.", ""), "mixed_precision": cfg.mixed_precision,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "resolution": cfg.resolution,
                "gradient_checkpointing": cfg.gradient_checkpointing, "lora_rank": cfg.lora_rank,
                "lora_targets": cfg.lora_targets, "optimizer": cfg.optimizer,
                "extra_adapters": list(method.extra_adapters(cfg)), "cache_dir": bool(cfg.cache_dir),
                "cache_batch_size": cfg.cache_batch_size, **fill, **({"host_encoded": True} if host else {}),
                "trainable_params": sum(p.numel() for p in params), "processes": world,
                **({"fsdp": shard} if sharded else {}),
                **({"text_encoders_released": bool(released)} if mc.is_transformer and host is None else {})}
    return Estimate(round(peak, 4), _round(phases), settings, fake, notes, round(base / GIB, 4), int(beyond))


def _processes(cfg, mc: ModelConfigs, processes: int | None) -> tuple[int, bool]:
    """(processes, sharded) of the run: fsdp needs their number (the estimate is one process's) and a flow
    transformer (what `fsdp.prepare` refuses, refused here with its reason); with one process fsdp shards
    nothing (as the run)."""
    if processes is not None and processes < 1:
        raise ValueError(f"processes {processes}: give 1 or more")
    if cfg.fsdp and processes is None:
        raise ValueError("fsdp: the estimate is one process's and depends on how many processes share the "
                         "transformer: give their number (`train --dry-run --processes N`, the N of `torchrun "
                         "--nproc_per_node N`)")
    if cfg.fsdp and not mc.is_transformer:
        raise ValueError(f"fsdp: family {mc.family!r} is not a flow transformer (the run refuses it, trainer/fsdp.py: "
                         "a UNet fits one GPU; leave fsdp off, the processes then run DDP)")
    return processes or 1, bool(cfg.fsdp) and (processes or 1) > 1


@contextlib.contextmanager
def _fake_process_group(world: int):
    """For a traced run of `world` > 1 processes: a fake process group (torch's "fake" backend: this process is
    rank 0 of `world`, collectives do nothing) and a 1-D CPU mesh over it, made outside FakeTensorMode; yields
    the mesh (None for one process). FSDP2 pads every shard to the same size, so rank 0 holds what each holds."""
    if world == 1:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed import fake_pg  # registers the "fake" backend

    if dist.is_initialized():
        raise ValueError("the estimate of a several-process run makes its own (fake) process group: run it outside a "
                         "distributed launch (`train --dry-run --processes N` in one process)")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _trace_shard(tracker: LiveBytes, backend, mesh, notes: list[str], on_gpu: bool) -> dict:
    """`fsdp.shard_transformer`, the run's own, on the fake process group: every unit's 1/N shard is made on
    the device; the adapters (whole) and the buffers (whole) move there (on a GPU: from the host, where the
    transformer was built and filled the cache beside the encoders)."""
    from . import fsdp

    with tracker.phase("shard"):
        report = fsdp.shard_transformer(backend.unet, mesh)
        for t in [*fsdp.adapter_parameters(backend.unet), *backend.unet.buffers()]:
            tracker.to_device(t)
        gc.collect()  # the whole parameters the shards replace leave the count
    n = mesh.size()
    notes.append(f"fsdp: one of {n} processes traced (rank 0; FSDP2 pads every shard to the same size): "
                 f"{report['frozen_local']:,} of the transformer's {report['frozen_total']:,} frozen values in "
                 f"{report['units']} shard units, the adapters and buffers whole; the step holds the units FSDP2 "
                 "gathers (forward: the running unit and its all-gather buffer until the next unit's gather; "
                 "backward: the running unit and the next one prefetched; the root unit from its forward to the "
                 "end of the backward)")
    if on_gpu:
        notes.append("fsdp: the whole transformer is loaded in host memory on every process until it is sharded "
                     "(after the cache fill): not counted on the card, needed in RAM")
    return report


@contextlib.contextmanager
def _swap_same_is_noop():
    """`Module.to` swaps each fake parameter with its converted copy, which FakeTensorMode's weak
    references forbid: a copy of the same dtype, device and shape changes nothing (skipped), another
    one is set as the parameter's data (what `Module._apply` does for plain tensors)."""
    import torch.utils as tu

    orig = tu.swap_tensors

    def swap(t1, t2):
        if (t1.dtype, t1.device, t1.shape) == (t2.dtype, t2.device, t2.shape):
            return
        try:
            orig(t1, t2)
        except RuntimeError:
            t1.data = t2  # the parameter keeps its identity and takes the converted data
    tu.swap_tensors = swap
    try:
        yield
    finally:
        tu.swap_tensors = orig


def _round(d):
    return {k: _round(v) for k, v in d.items()} if isinstance(d, dict) else round(d, 4)


def estimate_run(cfg, model: str, **kwargs) -> Estimate:
    return trace_run(cfg, model, fake=True, **kwargs)


_NOT_MEMORY = {"output_dir", "output_name", "data_path", "steps", "lr", "seed", "resume", "log_every",
               "checkpoint_every", "keep_last", "validate_every", "validation_prompts", "validation_seeds"}


def training_estimate(cfg, model: str | ModelConfigs, device: str, host: HostEncoded | None = None,
                      processes: int | None = None) -> Estimate:
    """`estimate_run` remembered per (model, device, host shapes, processes, the settings that change memory):
    a host that trains again with the same settings (ComfyUI) does not trace again."""
    import dataclasses

    name = model if isinstance(model, str) else json.dumps(
        [model.family, model.unet, model.text_encoders, model.vae, model.scheduler], sort_keys=True)
    key = (name, device, repr(host), processes,
           repr(sorted((k, v) for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_MEMORY)))
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate_run(cfg, model, device=device, host=host, processes=processes)
    return _ESTIMATES[key]


_ESTIMATES: dict[tuple, Estimate] = {}


# ---------------------------------------------------------------------------- measurement and presets
def allocator_peak(fn, *args, **kwargs):
    """(fn's result, peak bytes held by PyTorch's CPU allocator while fn ran) from the profiler's memory
    events: every allocation and free of the c10 CPU allocator, kernels' own buffers included (an
    independent count from `LiveBytes`, which sees only the tensors ops return)."""
    result, peak, _ = allocator_peaks(fn, *args, **kwargs)
    return result, peak


def allocator_peaks(fn, *args, after: str | None = None, **kwargs):
    """`allocator_peak`, and the peak from the end of the last `record_function(after)` range fn ran on (a
    later phase of a real run: the training steps after `fsdp.shard_backend`'s SHARD_MARK); None when no such
    range ran. Bytes are counted from fn's start: (result, peak, peak_after)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = list(prof.profiler.kineto_results.events())
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    ends = [e.start_ns() + e.duration_ns() for e in events if after is not None and e.name() == after]
    t0 = max(ends) if ends else None
    live = peak = 0
    peak_after = None
    for t, n in mem:
        if t0 is not None and t >= t0 and peak_after is None:
            peak_after = live  # held when the phase starts
        live += n
        peak = max(peak, live)
        if peak_after is not None:
            peak_after = max(peak_after, live)
    return result, peak, peak_after


def measure_train(cfg) -> dict:
    """The real `loop.train(cfg)` in this process (one of a torchrun launch), measured by PyTorch's CPU
    allocator: its peak over the whole run and, with fsdp, from the end of the sharding on (the training
    steps; None unsharded). GiB, from train's start. The per-process check of the fsdp estimate
    (tests/test_fsdp.py) runs it in each of two processes."""
    from . import fsdp
    from .loop import train

    _, peak, after = allocator_peaks(train, cfg, after=fsdp.SHARD_MARK)
    return {"allocator_peak_gib": round(peak / GIB, 6),
            "after_shard_peak_gib": None if after is None else round(after / GIB, 6)}


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_run(cfg, model: str | ModelConfigs, *, device: str = "cpu", **kwargs) -> dict:
    """Run `trace_run` on real tensors of random-init components (on CPU) and measure its peak three
    ways: `LiveBytes` (tensor storages), the CPU allocator (profiler memory events), and the
    process's peak RSS growth (VmHWM after a reset, Linux). GiB."""
    import gc

    gc.collect()
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        reset = False
    rss0 = _rss_kib("VmRSS")
    est, alloc = allocator_peak(trace_run, cfg, model, device=device, fake=False, **kwargs)
    hwm = _rss_kib("VmHWM")
    rss = (hwm - rss0) * 1024 / GIB if reset and rss0 is not None and hwm is not None else None
    return {"tracker_peak_gib": est.peak_gib, "allocator_peak_gib": round(alloc / GIB, 4),
            "rss_peak_delta_gib": None if rss is None else round(rss, 4), "phases": est.phases}


PRESET_DIR = CONFIG_DIR


def stated_card_gib(preset: str) -> tuple[float, str]:
    """The memory a preset states in its header comment: the card ("on an 8 GB consumer GPU", "one 80
    GB datacenter GPU"), else the upper end of its "Expected peak GPU memory: ~a-b GB". (GiB, source)"""
    import re

    text = (PRESET_DIR / f"{preset}.yaml").read_text(encoding="utf-8")
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    m = re.search(r"\bon (?:an? |one )(\d+) GB\b", head, re.I)
    if m:
        return float(m.group(1)), m.group(0)
    m = re.search(r"Expected peak GPU memory: ~[\d.]+-([\d.]+) GB", head)
    if m:
        return float(m.group(1)), m.group(0)
    raise ValueError(f"preset {preset}: states no card size or expected peak")


def preset_model(cfg, preset: str | None = None) -> str:
    """The shipped config a preset is traced on: the `--model NAME` of the dry-run command its header states
    (`python -m npo_suite train --preset sd35m_24gb --model sd35m --dry-run`), else its family from its
    resolution (1024 px presets are SDXL)."""
    import re

    if preset is not None:
        text = (PRESET_DIR / f"{preset}.yaml").read_text(encoding="utf-8")
        m = re.search(r"--preset " + re.escape(preset) + r" --model (\S+) --dry-run", text)
        if m:
            if m.group(1) not in SHIPPED:
                raise ValueError(f"preset {preset}: its header traces --model {m.group(1)}, not a shipped config "
                                 f"({', '.join(SHIPPED)})")
            return m.group(1)
    return "sdxl" if cfg.resolution >= 1024 else "sd15"


def count_records(cfg, kind: str, limit: int) -> int | None:
    """Records in cfg.data_path, counted up to `limit` (None when there is no data path or it cannot be read)."""
    import itertools

    if not cfg.data_path:
        return None
    try:
        if kind == "pairs":
            from .data.pairs import open_pairs as opener
        else:
            from .data.prompts import open_prompts as opener
        n = 0
        for p in cfg.data_path:
            n += sum(1 for _ in itertools.islice(opener(p, verbose=False), limit - n))
            if n >= limit:
                break
        return n
    except Exception:  # a ddspo-prepare folder, an unreadable source: the estimate assumes a full chunk
        return None


def dry_run(cfg, *, as_json: bool = False, processes: int | None = None) -> str:
    """`train --dry-run`: the estimate for `cfg` on its device (a GPU unless `cpu: true`), as one JSON
    line or a few lines of text; with `processes` (needed with fsdp) one of that many processes'."""
    from .methods import METHODS

    if not cfg.model:
        raise ValueError("config: `model` is empty; give a model folder, a checkpoint or a shipped config "
                         f"({', '.join(SHIPPED)})")
    device = "cpu" if cfg.cpu else "cuda"
    n = count_records(cfg, METHODS[cfg.method].data_kind, fill_records(cfg))
    e = estimate_run(cfg, cfg.model, device=device, n_records=n, processes=processes)
    if as_json:
        return e.to_json()
    step = e.phases["train_step"]
    per = f", per process of {processes}" if processes and processes > 1 else ""
    lines = [f"memory estimate ({device}, {e.settings['weight_dtype']} weights, traced on fake tensors{per}): "
             f"peak {e.peak_gib:.2f} GiB",
             f"  weights + LoRA/adapters: {e.phases['weights']['end']:.2f} GiB"
             + (" (fsdp: the transformer and its adapters on the host until sharded)"
                if "shard" in e.phases and device == "cuda" else ""),
             f"  cache fill ({e.settings['fill_records']} records, {e.settings['fill_images']} images, "
             f"{e.settings['images_per_vae_call']} per VAE call: cache_batch_size): {e.phases['cache_fill']['peak']:.2f} GiB"]
    if "shard" in e.phases:
        f = e.settings["fsdp"]
        lines.append(f"  fsdp shard: {f['frozen_local']:,} of {f['frozen_total']:,} frozen values, {f['units']} units: "
                     f"{e.phases['shard']['end']:.2f} GiB held after sharding")
    lines.append("  train step: " + ", ".join(f"{k} {v['peak']:.2f}" for k, v in step.items()) + " GiB")
    if device == "cuda":
        lines.append(f"  on a card: {e.card_gib():.2f} GiB with the CUDA context ({CONTEXT_GIB} GiB) and allocator "
                     f"slack (x{ALLOCATOR_SLACK})")
    return "\n".join(lines + [f"  note: {x}" for x in e.notes])
