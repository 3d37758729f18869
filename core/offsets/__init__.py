"""Weight offsets (eta, delta of METHODS.md): load, save, merge, extract.

The merged negative model of NPO guidance is `theta + alpha*eta + beta*delta` (seed 001 §3.2,
METHODS.md "NPO guidance"); offsets are additive in weight space, so every file format reduces
to per-module weight deltas (`core.offsets.types`).

A small package: `read` (load any format), `write` (save, metadata, hashes), `merge` (into a
module's weights), `extract` (SVD), with `keys` (module names per model family), `types` (the
deltas) and `schema` (formats, roles, metadata keys). Public API (stable; other modules call these):
  load_offset(path, base=None, *, family=None, allow_pickle=False, strict=True) -> Offset
  offset_from_state_dict(sd, base=None, *, name="<memory>", family=None, strict=True, metadata=None) -> Offset
  scan_offset(path, *, allow_pickle=False) -> Offset   (what a file holds; checked against no model)
  read_tensors(path, *, allow_pickle=False) -> (tensors, metadata)   (a file's tensors, no key interpreted)
  save_offset(offset, path, *, format="kohya", metadata=None, base=None, family=None) -> Path
  offset_to_state_dict(offset, *, format="kohya", base=None, family=None) -> dict[str, Tensor]
  offset_from_peft(model, adapter_name="policy", component="unet") -> dict[str, LowRankDelta]
  model_hash(module_or_state_dict) -> str
  merged_state_dict(module, terms, component="unet") -> dict[str, Tensor]
  applied(module, terms, component="unet")   (context manager, in place, exact restore)
  materialize(module, terms, component="unet") -> nn.Module (deep copy)
  extract_lora(offset_or_dense, rank, *, conv_rank=None, keep_dense=False) -> (Offset, report)
  diff_between(tuned, base, *, component="unet") -> Offset
  module_for_path(root, path) -> nn.Module   (the module an offset key patches)

`terms` is a list of `(Offset, scale)`: W' = W + sum_i scale_i * delta_i.  Formats and key
conventions are documented in docs/offsets.md.
"""
from .extract import extract_lora
from .keys import normalize_unet_state_dict
from .merge import applied, component_module, materialize, merged_state_dict, module_for_path
from .read import (
    diff_between,
    load_offset,
    load_offset_file_keys,
    load_unet_state_dict,
    offset_file_keys_from_state_dict,
    offset_from_state_dict,
    read_tensors,
    scan_offset,
)
from .schema import FORMATS, ROLES, Term
from .types import DenseDelta, Delta, LoadReport, LowRankDelta, Offset
from .write import model_hash, offset_from_peft, offset_to_state_dict, save_offset, save_transformer_lora

__all__ = [
    "FORMATS", "ROLES", "Term", "DenseDelta", "Delta", "LoadReport", "LowRankDelta", "Offset", "applied", "component_module", "diff_between", "extract_lora", "load_offset", "load_offset_file_keys", "load_unet_state_dict", "offset_file_keys_from_state_dict",
    "materialize", "merged_state_dict", "model_hash", "module_for_path", "normalize_unet_state_dict",
    "offset_from_peft", "offset_from_state_dict", "offset_to_state_dict", "save_offset", "save_transformer_lora", "scan_offset",
]
