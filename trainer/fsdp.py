"""`fsdp: true`: a flow transformer's frozen weights sharded over the run's processes (FSDP2 `fully_shard`).

A 12B transformer (Flux.1-dev: 22.2 GiB in bf16) does not fit beside its activations on a 24 GB card; with
N processes each holds 1/N of it. What is sharded and what is not:

- every block the model names in `_no_split_modules` (SD3: JointTransformerBlock; Flux: the double and the
  single blocks; SANA: SanaTransformerBlock and PatchEmbed; a named module without frozen weights, SANA's
  SanaModulatedNorm, is no unit) is one `fully_shard` unit, the transformer itself the root unit (its embedders
  and output layers). Each unit's frozen weights are split along dim 0 (torch.chunk) over the processes and
  gathered (all-gather) for its forward, freed after it and gathered again for its backward
  (`reshard_after_forward`; that second gather is a hook on the unit's output tensors, registered after its
  forward). torch warns when a unit returns a view (Flux's single blocks: two slices; the Flux and SANA roots:
  a Linear on [B, L, D]): an in-place op on it would drop that hook. None is done (diffusers' forwards and
  `DiffusersBackend._forward` use the outputs out of place), so the warning is harmless here; tests/test_fsdp.py
  runs Flux and SANA without checkpointing, where such an op would fail the backward (freed weights);
- the LoRA adapters (policy and the frozen ref / ema copies) are `ignored_params`: whole on every process, as
  under DDP; their gradients are averaged by the loop's one all-reduce (`loop.all_reduce_grads`), the
  optimizer, clipping, checkpoints and the saved LoRA are those of the DDP path. A LoRA is a few MB to a few
  hundred MB: sharding it would save little and cost a reduce-scatter per backward plus a gather per save;
- buffers (SD3's position table) are not sharded: `fully_shard` moves them whole to every device;
- the text encoders and the VAE stay whole on every process. Order (`loop.train`): the backend is built on
  the CPU; `prepare` moves the encoders and the VAE to the device; the cache fills; the encoders are released
  (cache_dir set); then `shard_backend` shards the transformer onto the device. So no card holds the
  transformer and T5-XXL at once (Flux.1-dev in bf16: 22.2 + 8.9 GiB) and none ever holds the whole
  transformer: `fully_shard` moves each unit to the device as it shards it (one block whole at a time).

Why torch's `fully_shard` and not accelerate's FSDP plugin: accelerate (1.16) turns its plugin on only for GPU
(and other accelerator) distributed types, so on CPU (gloo) it is ignored and no test here could run it
(`Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))` under torchrun reports
`DistributedType.MULTI_CPU`, `is_fsdp2` False); its FSDP2 preparation also needs the model and the optimizer
prepared together and re-creates the trainable parameters, which the backend indexes. `fully_shard` on the
accelerator's own process group is the same FSDP2 the plugin calls, on gloo and NCCL alike.

Not supported with fsdp (refused with the reason): validation grids (sampled on the main process only, while a
sharded forward needs every process: refused by TrainConfig, before any model is loaded), UNet models (they fit one GPU: DDP), a prebuilt backend (a host's model).
The memory estimate traces one process of a sharded run (`train --dry-run --processes N`): the same
`shard_transformer` on a fake process group (memory_estimate.trace_run).
"""
from __future__ import annotations

import sys

import torch


SHARD_MARK = "npo_suite::fsdp.shard_backend"  # the profiler range `shard_backend` runs in


def active(cfg, acc) -> bool:
    return bool(cfg.fsdp) and acc.num_processes > 1


def load_device(cfg, acc) -> torch.device:
    """Where the backend is built: the CPU when the transformer is to be sharded (it moves, shard by shard, to
    the accelerator's device), else the accelerator's device."""
    return torch.device("cpu") if active(cfg, acc) else acc.device


def prepare(cfg, acc, backend, *, prebuilt: bool = False) -> bool:
    """Before the cache fill: check that this run can be sharded (ValueError with every reason otherwise) and
    put the text encoders and the VAE on the device; the transformer stays on the CPU until `shard_backend`,
    so while the prompts are encoded a card holds the encoders, not the transformer. True when sharding."""
    if not cfg.fsdp:
        return False
    if acc.num_processes == 1:
        if acc.is_main_process:
            print("fsdp: one process, nothing to shard (launch several: torchrun --nproc_per_node N)", file=sys.stderr)
        return False
    problems = []
    if prebuilt:
        problems.append("the backend was built by the host (a host's model is not sharded)")
    if not getattr(backend, "is_transformer", False):
        problems.append(f"family {getattr(backend, 'family', '?')!r} is not a flow transformer (a UNet fits one GPU: "
                        "leave fsdp off, the processes then run DDP)")
    if not problems and not getattr(backend.unet, "_no_split_modules", None):
        problems.append(f"{type(backend.unet).__name__} names no blocks (_no_split_modules) to shard")
    if problems:
        raise ValueError("fsdp: " + "; ".join(problems))
    for m in [*backend.text_encoders, *([backend.vae] if backend.vae is not None else [])]:
        m.to(acc.device)
    backend.device = acc.device
    return True


def shard_backend(cfg, acc, backend) -> dict | None:
    """After the cache fill (and the text encoders' release): shard `backend.unet` over the processes, moving
    each unit's shard and the LoRA to the device. Returns {"rank", "processes", "frozen_total", "frozen_local",
    "lora", "units"} (also printed, by every process); None when `prepare` said no sharding."""
    if not (cfg.fsdp and acc.num_processes > 1):
        return None
    from torch.distributed.device_mesh import init_device_mesh

    from torch.profiler import record_function

    with record_function(SHARD_MARK):  # a profile's phase boundary (memory_estimate.measure_train)
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        report = {"rank": acc.process_index, "processes": acc.num_processes, **shard_transformer(backend.unet, mesh)}
        for p in adapter_parameters(backend.unet):  # ignored by FSDP, so not moved by it (identity kept: `.data`)
            p.data = p.data.to(acc.device)
    local, total = report["frozen_local"], report["frozen_total"]
    print(f"fsdp: process {acc.process_index}/{acc.num_processes} holds {local:,} of the transformer's "
          f"{total:,} frozen values ({100 * local / max(total, 1):.1f}%, {report['units']} shard units); "
          f"the LoRA adapters' {report['lora']:,} values whole on every process", file=sys.stderr)
    return report


def adapter_parameters(net) -> list:
    """Every LoRA adapter's parameters (policy, ref, ema): kept whole on every process."""
    return [p for n, p in net.named_parameters() if ".lora_" in n]


def shard_transformer(net, mesh) -> dict:
    """`fully_shard` every block `net` names in `_no_split_modules`, then `net` itself (what is left: embedders,
    output layers), over `mesh`, the adapters ignored (whole). The one sharding both the run (`shard_backend`)
    and the memory estimate (`memory_estimate.trace_run`, on a fake process group) call. Returns
    {"frozen_total", "frozen_local", "lora", "units"} (values; units: fully_shard calls)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    blocks = set(net._no_split_modules)
    lora = adapter_parameters(net)
    lora_ids = {id(p) for p in lora}
    frozen_total = sum(p.numel() for p in net.parameters() if id(p) not in lora_ids)
    units = [m for m in net.modules() if type(m).__name__ in blocks  # with frozen weights (SANA names its
             and any(id(p) not in lora_ids for p in m.parameters())]  # norm_out, which has none: no unit)
    for m in net.modules():  # buffers copied out of the loaded file: safetensors reads a file into one block
        for k, b in m._buffers.items():  # that each of its tensors keeps alive, so on the CPU one buffer left in
            if b is not None:  # it (SD3's position table) would keep the whole transformer beside its shards
                m._buffers[k] = b.clone()
    for m in units:  # bottom-up: the blocks, then the root
        fully_shard(m, mesh=mesh, ignored_params=set(lora))
    fully_shard(net, mesh=mesh, ignored_params=set(lora))
    local = sum(p.to_local().numel() for p in net.parameters() if isinstance(p, DTensor))
    unsharded = [n for n, p in net.named_parameters() if id(p) not in lora_ids and not isinstance(p, DTensor)]
    if unsharded:
        raise RuntimeError(f"fsdp: {len(unsharded)} frozen parameters were not sharded (e.g. {unsharded[:3]})")
    return {"frozen_total": frozen_total, "frozen_local": local, "lora": sum(p.numel() for p in lora),
            "units": len(units) + 1}
