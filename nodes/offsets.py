"""Weight-offset nodes: Load Weight Offset and Extract Offset (thin shells over core/offsets.py)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..core.offsets.schema import metadata_lines
from ..core.paths import safe_relative_name
from ..families import FAMILIES
from .sampling import NPOOffset

NPO_FOLDER = "npo"  # models/npo, registered by the extension on load
OFFSET_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".bin", ".pth"}


MODEL_KEYS = "model"  # keys as the file names them, resolved by the model's own key map (any ComfyUI family)


def family_options() -> list[str]:
    """The family dropdown: "auto" (detected from the file), "model" (the file's own key names,
    resolved against the model when applied: SD3, Flux, Wan, ... and any SD file) and every family
    with offset files."""
    return ["auto", MODEL_KEYS, *(name for name, f in FAMILIES.items() if f.offsets is not None)]


def read_offset(path: str, family: str = "auto", allow_pickle: bool = False):
    """The Offset of a file for the sampling nodes.

    "auto": an SD1.x / SDXL file (every key resolves to a module of the standard architecture) is
    read as such (unchanged behaviour); any other file keeps its own key names (`Offset.file_keys`),
    resolved when applied by ComfyUI's key map of the model at hand (nodes/comfy/keymap.py), which
    knows the naming conventions of every family ComfyUI runs. MODEL_KEYS forces the latter.
    """
    from ..core.offsets import load_offset, load_offset_file_keys

    if family == MODEL_KEYS:
        return load_offset_file_keys(path, allow_pickle=allow_pickle)
    if family != "auto":
        return load_offset(path, allow_pickle=allow_pickle, family=family)
    try:
        return load_offset(path, allow_pickle=allow_pickle)
    except ValueError as sd_error:
        try:
            off = load_offset_file_keys(path, allow_pickle=allow_pickle)
        except ValueError:
            raise sd_error from None
        off.report.notes.insert(0, f"not an SD1.x / SDXL offset ({str(sd_error).split(': ', 1)[-1][:160]})")
        return off


def register_folder() -> None:
    """Add `models/npo` to ComfyUI's folder registry (idempotent)."""
    if NPO_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[NPO_FOLDER] = (
            [os.path.join(folder_paths.models_dir, NPO_FOLDER)], OFFSET_EXTENSIONS)


def offset_files() -> list[str]:
    """Dropdown options: `loras/<name>` and `npo/<name>` (the folder registry is the source)."""
    register_folder()
    out = []
    for folder in ("loras", NPO_FOLDER):
        out += [f"{folder}/{n}" for n in folder_paths.get_filename_list(folder)]
    return out


def resolve_offset_file(choice: str) -> str:
    """`loras/x.safetensors` -> full path inside ComfyUI's folders; never outside them."""
    folder, _, name = safe_relative_name(choice).partition("/")
    if folder not in ("loras", NPO_FOLDER) or not name:
        raise ValueError(f"{choice!r}: expected 'loras/<file>' or '{NPO_FOLDER}/<file>'")
    register_folder()
    path = folder_paths.get_full_path(folder, safe_relative_name(name))
    if path is None:
        raise FileNotFoundError(f"{choice!r}: no such file in the ComfyUI '{folder}' folder(s) "
                                f"{folder_paths.get_folder_paths(folder)}")
    return path


class LoadWeightOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_LoadWeightOffset", display_name="Load Weight Offset", category="sampling/npo",
            description="Load an NPO / preference offset (kohya, PEFT/diffusers, ComfyUI keys, LoCon, full-weight diff) from models/loras or models/npo.",
            inputs=[io.Combo.Input("offset_name", options=offset_files()),
                    io.Combo.Input("family", options=family_options(), default="auto"),
                    io.Boolean.Input("allow_pickle", default=False,
                                     tooltip="allow .ckpt/.pt/.bin (loaded with weights_only=True)")],
            outputs=[NPOOffset.Output(display_name="offset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, offset_name, family="auto", allow_pickle=False) -> io.NodeOutput:
        offset = read_offset(resolve_offset_file(offset_name), family, allow_pickle)
        return io.NodeOutput(offset, offset_report(offset, offset_name))


def offset_report(offset, name: str) -> str:
    """What was recognised and the file's NPO metadata (core/offsets/schema.py), for the node's STRING output."""
    lines = [offset.report.summary() if offset.report is not None else f"{name}: {len(offset.unet)} UNet modules"]
    lines[0] = lines[0].replace(str(getattr(offset.report, "path", "")), name) if offset.report else lines[0]
    te = {k: len(v) for k, v in offset.text_encoders.items() if v}
    what = "diffusion-model keys (resolved against the model when applied)" if offset.file_keys else "unet modules"
    lines.append(f"{what}: {len(offset.unet)}" + (f", text encoders: {te}" if te else ""))
    if offset.report is not None:
        lines += offset.report.notes
        if offset.report.unmatched_keys:
            lines.append("unmatched keys (first 5): " + ", ".join(offset.report.unmatched_keys[:5]))
    return "\n".join(lines + metadata_lines(offset.metadata))



def unet_weights(model_patcher, keys: set[str] | None = None) -> dict:
    """The UNet weights of a MODEL as ComfyUI runs them (weight patches applied), copied to CPU.

    keys: LDM parameter names to copy (None: all floating-point weights).
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    sd = model_patcher.model.diffusion_model.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()
            if v.is_floating_point() and (keys is None or k in keys)}


def differing_keys(tuned, base) -> set[str] | None:
    """For two clones of one network only the patched weights can differ: their LDM names
    (keeps RAM at the size of the patches instead of two UNet copies). None: compare all."""
    if not tuned.is_clone(base):
        return None
    pre = "diffusion_model."
    return {k[len(pre):] for k in (*tuned.patches, *base.patches) if k.startswith(pre)}


def weight_diff(tuned: dict, base: dict, model_patcher) -> dict:
    """{diffusers module path: DenseDelta(tuned − base)} for every changed weight (ComfyUI's own
    LDM -> diffusers map, so any UNet layout ComfyUI loads works, and partial dicts are fine)."""
    from ..core.offsets.types import DenseDelta
    from .comfy.branch import diffusers_to_ldm_modules
    from .comfy.keymap import comfy_family

    if comfy_family(model_patcher).unet:
        to_diffusers = {v: k for k, v in diffusers_to_ldm_modules(model_patcher).items()}
    else:  # a DiT: ComfyUI's generic key names (`diffusion_model.<module>`), read back with family 'model'
        to_diffusers = _GenericKeys()
    out = {}
    for key, w in tuned.items():
        mod, _, pname = key.rpartition(".")
        if pname != "weight" or key not in base or base[key].shape != w.shape:
            continue
        d = w.float() - base[key].float()
        if d.any():
            b = f"{mod}.bias"
            bias = (tuned[b].float() - base[b].float()) if b in tuned and b in base else None
            out[to_diffusers.get(mod, mod)] = DenseDelta(d, bias if bias is not None and bias.any() else None)
    return out


class _GenericKeys(dict):
    def get(self, mod, default=None):
        return f"diffusion_model.{mod}"


class ExtractOffset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_ExtractOffset", display_name="Extract Offset", category="sampling/npo",
            description="Offset = tuned − base as a rank-r LoRA (truncated SVD per module); optionally saved to models/npo.",
            inputs=[io.Model.Input("tuned_model"), io.Model.Input("base_model"),
                    io.Int.Input("rank", default=16, min=1, max=1024),
                    io.String.Input("save_as", default="", tooltip="file name in models/npo (empty: do not save)")],
            outputs=[NPOOffset.Output(display_name="offset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, tuned_model, base_model, rank, save_as="") -> io.NodeOutput:
        from ..core.offsets import extract_lora, save_offset

        target = None
        if save_as.strip():
            name = safe_relative_name(save_as.strip())
            name = name if name.endswith(".safetensors") else name + ".safetensors"
            register_folder()
            target = os.path.join(folder_paths.get_folder_paths(NPO_FOLDER)[0], name)
        keys = differing_keys(tuned_model, base_model)
        if keys is not None and not keys:
            raise ValueError("tuned_model and base_model are the same network with the same weights: nothing to extract")
        from .comfy.keymap import comfy_family

        fam = comfy_family(tuned_model)
        offset, rep = extract_lora(weight_diff(unet_weights(tuned_model, keys), unet_weights(base_model, keys),
                                               tuned_model), rank)
        offset.file_keys = not fam.unet  # DiT offsets keep ComfyUI's generic names (diffusion_model.<module>)
        lines = [f"{len(offset.unet)} modules differ; rank {rank}: relative Frobenius error {rep['overall']:.4f}"]
        if rep["dropped_bias"]:
            lines.append(f"{len(rep['dropped_bias'])} bias deltas dropped (a LoRA cannot hold them)")
        if target is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            save_offset(offset, target, format="kohya", family=None if fam.unet else fam.cls.lower())
            lines.append(f"saved {NPO_FOLDER}/{os.path.basename(target)}")
        return io.NodeOutput(offset, "\n".join(lines))


NODES = [LoadWeightOffset, ExtractOffset]
