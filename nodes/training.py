"""Training nodes (V3): Preference Dataset, Prompt List, Train Preference LoRA.

Thin shells over the ComfyUI host room `nodes/comfy/`: the node's datasets (`datasets.py`), the run
(`session.py`), progress and outputs (`progress.py`) and the memory estimate (`memory.py`) import
nothing of ComfyUI, the network side is `backend.py`; the loop is `trainer.loop.train`, the same one
the command line runs. Every dropdown reads a registry (METHODS, TIMESTEP_SAMPLERS, ...).
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..core import paths
from .comfy import datasets, memory, progress, session
from .sampling import NPOOffset

CATEGORY = "training/npo"
DATASETS_FOLDER = "npo_datasets"  # <ComfyUI>/datasets unless extra_model_paths.yaml says otherwise
FROM_IMAGES = "(from images)"
FROM_TEXT = "(from text)"
NO_LORA = "none"
PrefData = io.Custom("NPO_PREF_DATA")
log = logging.getLogger("npo_suite")


def register_folders() -> None:
    """Register `npo_datasets` (idempotent; only inside ComfyUI's base folder by default)."""
    if DATASETS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[DATASETS_FOLDER] = (
            [os.path.join(folder_paths.base_path, "datasets")], set())


def dataset_roots() -> list[str]:
    register_folders()
    return folder_paths.get_folder_paths(DATASETS_FOLDER)


def _ui(text: str, images, cls) -> dict:
    out = {"text": (text,)}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    return out


class PreferenceDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_PreferenceDataset", display_name="Preference Dataset", category=CATEGORY,
            description="Preference pairs (chosen beats rejected) from the datasets folder (JSONL, chosen/ + rejected/ "
                        "folders, Pick-a-Pic parquet) or from two IMAGE batches and a prompt.",
            inputs=[io.Combo.Input("dataset", options=[FROM_IMAGES, *datasets.list_datasets(dataset_roots())],
                                   tooltip=f"a file or folder in ComfyUI's '{DATASETS_FOLDER}' folder, or {FROM_IMAGES}"),
                    io.Image.Input("chosen", optional=True, tooltip="preferred images (row i pairs with rejected row i)"),
                    io.Image.Input("rejected", optional=True),
                    io.String.Input("prompt", multiline=True, default="",
                                    tooltip="one prompt for every pair, or one line per pair (images only)")],
            outputs=[PrefData.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset, chosen=None, rejected=None, prompt="") -> io.NodeOutput:
        if dataset == FROM_IMAGES:
            if chosen is None or rejected is None:
                raise ValueError(f"dataset {FROM_IMAGES}: connect both `chosen` and `rejected` IMAGE inputs")
            data = datasets.dataset_from_images(chosen, rejected, prompt.splitlines() or [""])
        else:
            data = datasets.dataset_from_path(datasets.resolve_dataset(dataset_roots(), dataset), "pairs", dataset)
        return io.NodeOutput(data, data.report(), ui=_ui(data.report(), datasets.preview_images(data), cls))


class PromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [f for f in datasets.list_datasets(dataset_roots()) if f.lower().endswith((".txt", ".jsonl"))]
        return io.Schema(
            node_id="NPOSuite_PromptList", display_name="Prompt List", category=CATEGORY,
            description="Prompts for the data-free methods (Self-NPO/TDFT, DDSPO), with a preview of DDSPO's degraded prompts.",
            inputs=[io.Combo.Input("source", options=[FROM_TEXT, *files]),
                    io.String.Input("prompts", multiline=True, default="", tooltip="one prompt per line (# comments)"),
                    io.Image.Input("images", optional=True, tooltip="one image per prompt: TDFT start / DDSPO winner"),
                    io.Float.Input("ddspo_min_frac", default=0.4, min=0.0, max=1.0, step=0.05),
                    io.Float.Input("ddspo_max_frac", default=0.7, min=0.0, max=1.0, step=0.05),
                    io.Int.Input("preview_seed", default=0, min=0, max=2**31 - 1)],
            outputs=[PrefData.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, source, prompts="", images=None, ddspo_min_frac=0.4, ddspo_max_frac=0.7, preview_seed=0) -> io.NodeOutput:
        if source == FROM_TEXT:
            data = datasets.prompt_list(prompts, images)
        else:
            data = datasets.dataset_from_path(datasets.resolve_dataset(dataset_roots(), source), "prompts", source)
        text = data.report() + "\nDDSPO degraded prompts:\n" + datasets.ddspo_preview(data, preview_seed, ddspo_min_frac, ddspo_max_frac)
        return io.NodeOutput(data, text, ui=_ui(text, datasets.preview_images(data), cls))


def _lora_choices() -> list[str]:
    return [NO_LORA, *folder_paths.get_filename_list("loras")]


NODE_OPTIONAL = ("validate_every", "validation_prompts")  # appended after the others: old workflows load


def _node_only_inputs() -> dict[str, io.Input]:
    """The node's inputs that are not TrainConfig fields (nodes/comfy/session.py NODE_ONLY)."""
    return {
        "resume": io.Boolean.Input("resume", default=True, tooltip="continue the run <output_name> from its last checkpoint"),
        "init_lora": io.Combo.Input("init_lora", options=_lora_choices(), default=NO_LORA,
                                    tooltip="start from this LoRA (same rank and targets)"),
        "extra": io.String.Input("extra", multiline=True, default="",
                                 tooltip="more TrainConfig fields, one 'key: value' per line (e.g. tdft_k: 5)"),
        "validation_prompts": io.String.Input("validation_prompts", multiline=True, default="", optional=True,
                                              tooltip="one prompt per line (empty: the dataset's first prompts)"),
    }


def config_input(w: session.Widget, optional: bool = False) -> io.Input:
    """A ComfyUI input for a TrainConfig field's widget (default, range and tooltip from the field)."""
    common = {"default": w.default, "tooltip": w.tooltip, "optional": optional}
    ranges = {k: v for k, v in (("min", w.min), ("max", w.max), ("step", w.step)) if v is not None}
    if w.kind == "combo":
        return io.Combo.Input(w.name, options=list(w.options), **common)
    if w.kind == "bool":
        return io.Boolean.Input(w.name, **common)
    if w.kind == "int":
        return io.Int.Input(w.name, **ranges, **common)
    if w.kind == "float":
        return io.Float.Input(w.name, **ranges, **({"round": w.round} if w.round is not None else {}), **common)
    return io.String.Input(w.name, **common)


def train_inputs() -> list[io.Input]:
    """The widgets in NODE_WIDGETS order: TrainConfig fields generated from the field, then the node's own."""
    config, own = session.config_widgets(), _node_only_inputs()
    return [own[n] if n in own else config_input(config[n], n in NODE_OPTIONAL) for n in session.NODE_WIDGETS]


class TrainPreferenceLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_TrainPreferenceLoRA", display_name="Train Preference LoRA", category=CATEGORY,
            description="Train a preference LoRA (Diffusion-DPO, NPO, BDPO, SNPO, Self-NPO/TDFT, DDSPO) on this MODEL "
                        "with the project's trainer; writes models/loras/<output_name>.safetensors (kohya). "
                        "Interrupt stops at the next step and saves; `resume` continues from the last checkpoint. "
                        "Widgets are TrainConfig fields (same names, defaults and help as the train CLI).",
            is_output_node=True,
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"), PrefData.Input("dataset"),
                    *train_inputs()],
            outputs=[NPOOffset.Output(display_name="offset"), io.Model.Output(display_name="model_with_lora"),
                     io.String.Output(display_name="lora_name"), io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="validation")],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, **options) -> io.NodeOutput:
        outcome, lora_name = train_in_comfy(model, clip, vae, dataset, options)
        patched = load_lora_model(model, lora_name) if lora_name else model
        curve = progress.loss_curve_image(outcome.losses, f"{options['method']} loss")
        grid = progress.image_tensor(outcome.validation) if outcome.validation else progress.blank_image()
        return io.NodeOutput(outcome.offset, patched, lora_name, curve, outcome.report, grid,
                             ui={"text": (outcome.report,)})


# ---------------------------------------------------------------------------------------------
# ComfyUI side of a run
# ---------------------------------------------------------------------------------------------
def train_in_comfy(model, clip, vae, data, options: dict):
    """Build the ComfyUI backend, run `trainer.loop.train`, publish the LoRA; releases everything after.

    Memory: after the data is encoded, model management is asked for the run's estimated working set
    (`memory.memory_estimate_for`: the traced estimate of `train --dry-run` less the base weights; a DiT's
    traced on its own model's config) with the UNet / DiT fully loaded, and the report says how much;
    afterwards every training-only object is released (`session.run_and_release`) and the cache emptied.
    The UNet itself stays loaded for the next node (docs/comfyui_training.md)."""
    import comfy.model_management as mm

    from .comfy.backend import training_mode
    from .comfy.backends import backend_for
    from ..trainer.backends.diffusers import BackendOptions, LoraOptions

    name = session.node_output_name(options)
    run_dir = paths.inside(os.path.join(folder_paths.get_output_directory(), session.RUNS_SUBDIR), name, "output_name")
    init = options.get("init_lora", NO_LORA)
    init_path = folder_paths.get_full_path_or_raise("loras", paths.safe_relative_name(init, "init_lora")) if init != NO_LORA else None
    cfg = session.node_config(options, str(run_dir), init_path, data)
    session.check_data(cfg.method, data)
    shown = NodeProgress(cfg.method, cfg.steps)
    notes: list[str] = []

    def on_ready(backend):
        try:
            est = memory.memory_estimate_for(backend, cfg)
        except ValueError as e:  # a family without a shipped config, a DiT config field that does not map
            notes.append(f"memory: {e}; no memory reserved ahead of the run")
            log.warning("npo_suite train %s: %s", cfg.method, notes[-1])
        else:
            notes.append(f"memory: {est.report()}; reserved with model management ahead of the run")
            log.info("npo_suite train %s: %s", cfg.method, notes[-1])
            backend.reserve_memory(est.total)
        shown.start()

    opts = BackendOptions(lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_init or None, cfg.seed),
                          gradient_checkpointing=cfg.gradient_checkpointing, resolution=cfg.resolution)
    cache = os.path.join(folder_paths.get_temp_directory(), "npo_suite_cache")
    with training_mode():
        outcome = session.run_and_release(lambda: backend_for(model, clip, vae, options=opts), data, cfg,
                                       resume=options.get("resume", True), cache_dir=cache,
                                       stop_requested=mm.processing_interrupted, progress=shown,
                                       on_ready=on_ready, release=mm.soft_empty_cache, warning=shown.warning)
    if notes:
        outcome.report += "".join(f"\n{n}" for n in notes)
    lora_name = None
    if outcome.lora_path is not None:
        session.publish_lora(outcome.lora_path, folder_paths.get_folder_paths("loras")[0], name)
        lora_name = f"{name}.safetensors"
    if outcome.interrupted:  # saved above; now stop the workflow the way ComfyUI does
        mm.throw_exception_if_processing_interrupted()
    return outcome, lora_name


class NodeProgress:
    """The node's live display: ComfyUI's progress bar with a loss-curve preview image, and a text line
    (step, loss, running mean, speed, ETA) under the node; both rate-limited by `progress.ProgressDisplay`.
    Outside a ComfyUI server (no PromptServer, older ComfyUI) the text goes to the log only."""

    PREVIEW_SIZE = 512  # max side of the preview image (ComfyUI's `max_size`)

    def __init__(self, method: str, total: int):
        import comfy.utils

        self.method, self.node_id = method, _executing_node_id()
        self.display = progress.ProgressDisplay(total)
        self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)

    def start(self) -> None:
        self.display.start()

    def __call__(self, step: int, total: int, loss: float) -> None:
        import time

        import comfy.model_management as mm

        upd = self.display.update(step, total, loss)
        preview = None
        if upd.image:
            t0 = time.perf_counter()
            preview = ("PNG", progress.loss_curve_preview(self.display.losses, self.display.mean_window), self.PREVIEW_SIZE)
            self.display.spent("image", time.perf_counter() - t0)
        try:
            self.bar.update_absolute(step, total, preview)
        except mm.InterruptProcessingException:
            # ComfyUI's progress hook raises on Cancel and clears the flag: set it again so that the
            # loop's stop check ends the run at this step boundary, saving a checkpoint and the LoRA
            mm.interrupt_current_processing(True)
        if upd.text is not None:
            t0 = time.perf_counter()
            log.info("npo_suite train %s: %s", self.method, upd.text)
            _send_progress_text(f"{self.method}: {upd.text}", self.node_id)
            self.display.spent("text", time.perf_counter() - t0)

    def warning(self, message: str) -> None:
        """A health warning of the run: logged now, and kept under every later progress text line."""
        log.warning("npo_suite train %s: %s", self.method, message)
        self.display.warn(message)


def _executing_node_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # ComfyUI before the execution context (0.3.4x)
        return None
    ctx = get_executing_context()
    return ctx.node_id if ctx is not None else None


def _send_progress_text(text: str, node_id: str | None) -> bool:
    """PromptServer.send_progress_text when there is a server and a node id (ComfyUI 0.3.4x+); else False."""
    if node_id is None:
        return False
    try:
        from server import PromptServer

        send = PromptServer.instance.send_progress_text
    except (ImportError, AttributeError):
        return False
    send(text, node_id)
    return True


def load_lora_model(model, lora_name: str, strength: float = 1.0):
    """The MODEL with the written LoRA, through ComfyUI's own LoRA loader (as LoraLoaderModelOnly)."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]


TRAINING_NODES = [PreferenceDataset, PromptList, TrainPreferenceLoRA]
