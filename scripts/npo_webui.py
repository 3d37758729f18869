"""Forge / Automatic1111 script: an "NPO" panel in txt2img and img2img.

NPO (Diffusion-NPO seed 001 §3.2): the WebUI's own batched CFG forward runs `theta + eta` on the
conditional rows and `theta + alpha*eta + beta*delta` on the unconditional rows (per-row low-rank
offsets via forward hooks, `core.branch_lora`; no weight swapping, no second model). SNPO
(seed 000 §4.3): one model `theta + eta + beta*delta` on every row, and the unconditional input is
the encoded empty prompt. The WebUI-independent logic lives in `npo_suite.webui.logic`; this file
only talks to the WebUI (`modules.*`, gradio), and does nothing when imported outside one.

Forge: a `model_function_wrapper` on the UnetPatcher (it receives `cond_or_uncond`), installed in
`process_before_every_sampling` (so hires fix gets it too). A1111: hooks held for the batch and a
row cursor reset by `on_cfg_denoiser` (uncond rows are the tail of `x_in`), `logic.A1111Session`.
Both were run (tests/webui, docs/webui.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("npo_suite")
ROOT = Path(__file__).resolve().parents[1]

try:  # inside a WebUI only
    import gradio as gr
    from modules import paths, script_callbacks, scripts, shared
    IN_WEBUI = True
except ImportError:  # imported by something else (tests, tools): define nothing WebUI-related
    IN_WEBUI = False


def _package_logic():
    """npo_suite.webui.logic: the installed package if already imported, else this extension folder."""
    if "npo_suite" not in sys.modules:
        try:
            importlib.import_module("npo_suite")
        except ImportError:
            spec = importlib.util.spec_from_file_location("npo_suite", ROOT / "__init__.py",
                                                          submodule_search_locations=[str(ROOT)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules["npo_suite"] = mod
            spec.loader.exec_module(mod)
    return importlib.import_module("npo_suite.webui.logic")


if IN_WEBUI:
    logic = _package_logic()
    _CACHE = logic.OffsetCache()
    _A1111_ACTIVE: dict = {}  # the A1111 session of the running batch: runtime, cursor, sigma conversion
    XYZ_FIELDS = {"alpha": "npo_alpha", "beta": "npo_beta", "negative": "npo_negative", "mode": "npo_mode"}

    def offset_dirs() -> list[str]:
        """models/npo first, then the WebUI's LoRA folder (`--lora-dir`)."""
        lora = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
        return [os.path.join(paths.models_path, "npo"), lora]

    def model_family(sd_model) -> str:
        return "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd1"

    def is_forge(sd_model) -> bool:
        return hasattr(sd_model, "forge_objects")

    def unet_module(sd_model):
        if is_forge(sd_model):
            return sd_model.forge_objects.unet.model.diffusion_model
        return sd_model.model.diffusion_model

    def load_offsets(settings, family: str):
        dirs = offset_dirs()
        eta = _CACHE.get(logic.resolve_offset_file(settings.positive, dirs), family) if settings.positive else None
        delta = _CACHE.get(logic.resolve_offset_file(settings.negative, dirs), family) if settings.negative else None
        return eta, delta

    def describe_files(positive: str, negative: str) -> str:
        """Panel note: what each chosen file was recognised as (LoadReport summary), or the error."""
        lines = []
        family = None  # detected from the file: reading shared.sd_model here could trigger a model load
        for role, name in (("positive η", positive), ("negative δ / SNPO", negative)):
            if not name or name == logic.NONE:
                continue
            try:
                off = _CACHE.get(logic.resolve_offset_file(name, offset_dirs()), family)
                lines.append(f"**{role}**: {logic.offset_summary(off, name)}")
            except Exception as e:  # any failure is shown, e.g. a missing package
                lines.append(f"**{role}**: error: {logic.error_text(e)}")
        return "\n\n".join(lines)

    # ------------------------------------------------------------------------------------------
    # A1111: one logic.A1111Session per batch; on_cfg_denoiser (registered once) starts each step
    # ------------------------------------------------------------------------------------------
    def _a1111_on_cfg_denoiser(params) -> None:
        sess = _A1111_ACTIVE.get("session")
        if sess is None:
            return
        uncond = params.text_uncond
        uncond = uncond["crossattn"] if isinstance(uncond, dict) else uncond
        sigma = float(params.sigma.flatten()[0])
        if type(params.denoiser).__name__ == "CFGDenoiserTimesteps":  # DDIM/PLMS/UniPC: a timestep, not a sigma
            abar = float(shared.sd_model.alphas_cumprod[round(sigma)])
            sigma = ((1 - abar) / abar) ** 0.5
        if not sess.step(getattr(params.denoiser, "p", None), int(params.x.shape[0]), int(uncond.shape[0]), sigma):
            _A1111_ACTIVE.pop("session", None)
            log.warning("NPO: released the offsets of an earlier generation that did not finish")

    def _a1111_begin(p, settings, eta, delta) -> None:
        _a1111_end()
        dm = unet_module(p.sd_model)
        plan, lines = logic.build_plan(settings, dm, eta, delta)
        _A1111_ACTIVE["session"] = logic.A1111Session(dm, plan, p, logic.verify_log_from_env())
        print("[NPO] A1111: " + " | ".join(lines))

    def _a1111_end() -> None:
        sess = _A1111_ACTIVE.pop("session", None)
        if sess is not None:
            sess.close()

    def use_empty_negative(p) -> None:
        """SNPO: the unconditional input is the encoded empty prompt. Set before the WebUI slices the
        batch's prompts (`process` runs after `setup_prompts`), so the infotext shows what was encoded."""
        p.all_negative_prompts = [""] * len(p.all_negative_prompts)
        p.main_negative_prompt = ""
        if getattr(p, "all_hr_negative_prompts", None):
            p.all_hr_negative_prompts = [""] * len(p.all_hr_negative_prompts)

    # ------------------------------------------------------------------------------------------
    # X/Y/Z plot axes
    # ------------------------------------------------------------------------------------------
    def register_xyz_axes() -> None:
        mod = next((d.module for d in scripts.scripts_data if d.script_class.__module__ in ("xyz_grid.py", "xyz_grid")),
                   None)
        if mod is None or any(getattr(o, "label", "").startswith("[NPO]") for o in mod.axis_options):
            return

        def setter(attr):
            def apply(p, x, xs):
                setattr(p, attr, x)
            return apply

        mod.axis_options.extend([
            mod.AxisOption("[NPO] Alpha", float, setter(XYZ_FIELDS["alpha"])),
            mod.AxisOption("[NPO] Beta", float, setter(XYZ_FIELDS["beta"])),
            mod.AxisOption("[NPO] Negative offset", str, setter(XYZ_FIELDS["negative"]),
                           choices=lambda: logic.list_offset_files(offset_dirs())),
            mod.AxisOption("[NPO] Mode", str, setter(XYZ_FIELDS["mode"]), choices=lambda: list(logic.MODES)),
        ])

    script_callbacks.on_cfg_denoiser(_a1111_on_cfg_denoiser)
    script_callbacks.on_before_ui(register_xyz_axes)
    try:
        register_xyz_axes()  # xyz_grid.py (WebUI's scripts/) is loaded before extensions: API-only runs too
    except Exception:
        log.exception("NPO: could not register X/Y/Z plot axes")

    class NPOScript(scripts.Script):
        sorting_priority = 15

        def title(self):
            return "NPO"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            choices = [logic.NONE] + logic.list_offset_files(offset_dirs())
            tab = "img2img" if is_img2img else "txt2img"
            with gr.Accordion("NPO: negative preference offsets", open=False, elem_id=f"npo_suite_{tab}"):
                with gr.Row():
                    enabled = gr.Checkbox(label="Enable NPO", value=False)
                    mode = gr.Radio(list(logic.MODES), value="NPO", label="Mode",
                                    info="NPO: δ on the unconditional rows. SNPO: one model, empty-prompt unconditional.")
                with gr.Row():
                    positive = gr.Dropdown(choices, value=logic.NONE, label="Positive offset η (optional)",
                                           allow_custom_value=True)
                    alpha = gr.Slider(0.0, 1.0, value=logic.ALPHA_DEFAULT, step=0.05, label="α (η on the negative branch, NPO)")
                with gr.Row():
                    negative = gr.Dropdown(choices, value=logic.NONE, label="Negative offset δ (NPO) / SNPO offset",
                                           allow_custom_value=True)
                    beta = gr.Slider(0.0, 1.0, value=logic.BETA_DEFAULT, step=0.05, label="β (δ strength)")
                with gr.Row():
                    sigma_min = gr.Number(value=0.0, label="σ min (0 = no lower bound)")
                    sigma_max = gr.Number(value=0.0, label="σ max (0 = no upper bound)")
                    refresh = gr.Button(value="Refresh offset lists")
                note = gr.Markdown("")

            def refreshed():
                files = [logic.NONE] + logic.list_offset_files(offset_dirs())
                return gr.update(choices=files), gr.update(choices=files)

            refresh.click(fn=refreshed, inputs=[], outputs=[positive, negative])
            for dd in (positive, negative):
                dd.change(fn=describe_files, inputs=[positive, negative], outputs=[note])
            k = logic.INFOTEXT_KEYS
            self.infotext_fields = [
                (enabled, lambda d: logic.paste_value(d, "enabled")),
                (mode, k["mode"]), (positive, k["positive"]), (alpha, k["alpha"]), (negative, k["negative"]),
                (beta, k["beta"]), (sigma_min, k["sigma_min"]), (sigma_max, k["sigma_max"]),
            ]
            self.paste_field_names = list(k.values())
            return [enabled, mode, positive, alpha, negative, beta, sigma_min, sigma_max]

        @staticmethod
        def settings(p, args):
            s = logic.NPOSettings(*args[:8])
            for field, attr in XYZ_FIELDS.items():  # X/Y/Z plot overrides
                if hasattr(p, attr):
                    setattr(s, field, getattr(p, attr))
            return logic.NPOSettings(**logic.settings_dict(s))  # re-normalise overridden values

        def process(self, p, *args):
            _a1111_end()  # every generation starts clean: one whose sampling raised never reached postprocess
            p._npo_state = None
            s = self.settings(p, args)
            if not s.enabled:
                return
            with logic.reported_errors(p.extra_generation_params, log):
                s.validate()
                if not is_forge(p.sd_model):
                    refusal = logic.a1111_refusal(p.sd_model, getattr(p, "refiner_checkpoint", None))
                    if refusal:
                        raise ValueError(refusal)
                eta, delta = load_offsets(s, model_family(p.sd_model))
                logic.build_plan(s, unet_module(p.sd_model), eta, delta)  # refuse before anything runs
            p._npo_state = (s, eta, delta)
            p.extra_generation_params.update(s.infotext())
            if s.mode == "SNPO":
                use_empty_negative(p)

        def process_batch(self, p, *args, **kwargs):
            state = getattr(p, "_npo_state", None)
            if state is None or is_forge(p.sd_model):
                return
            with logic.reported_errors(p.extra_generation_params, log):
                _a1111_begin(p, *state)

        def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only (first pass and hires)
            state = getattr(p, "_npo_state", None)
            if state is None or not is_forge(p.sd_model):
                return
            s, eta, delta = state
            unet = p.sd_model.forge_objects.unet.clone()
            dm = unet.model.diffusion_model
            plan, lines = logic.build_plan(s, dm, eta, delta)
            previous = unet.model_options.get("model_function_wrapper")
            unet.set_model_unet_function_wrapper(
                logic.ForgeNPOWrapper(logic.NPORuntime(dm, plan), previous, logic.verify_log_from_env()))
            p.sd_model.forge_objects.unet = unet
            print("[NPO] Forge: " + " | ".join(lines))

        def postprocess_batch(self, p, *args, **kwargs):
            _a1111_end()

        def postprocess(self, p, processed, *args):
            _a1111_end()
