"""Forge / Automatic1111 script: an "NPO" panel in txt2img and img2img.

NPO (Diffusion-NPO seed 001 §3.2): the WebUI's own batched CFG forward runs `theta + eta` on the
conditional rows and `theta + alpha*eta + beta*delta` on the unconditional rows (per-row low-rank
offsets via forward hooks, `core.branch_lora`; no weight swapping, no second model). SNPO
(seed 000 §4.3): one model `theta + eta + beta*delta` on every row, and the unconditional input is
the encoded empty prompt. The WebUI-independent logic lives in `npo_suite.webui` (one module per
concern, listed in its `__init__`); this file only talks to the WebUI (`modules.*`, gradio), and does
nothing when imported outside one.

Forge: a `model_function_wrapper` on the UnetPatcher (it receives `cond_or_uncond`), installed in
`process_before_every_sampling` (so hires fix gets it too). A1111: hooks held for the batch and a
row cursor reset by `on_cfg_denoiser` (uncond rows are the tail of `x_in`), `webui.a1111_session`.
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


def _import_package() -> None:
    """`npo_suite`: the installed package if importable, else this extension folder."""
    if "npo_suite" not in sys.modules:
        try:
            importlib.import_module("npo_suite")
        except ImportError:
            spec = importlib.util.spec_from_file_location("npo_suite", ROOT / "__init__.py",
                                                          submodule_search_locations=[str(ROOT)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules["npo_suite"] = mod
            spec.loader.exec_module(mod)


if IN_WEBUI:
    _import_package()
    from npo_suite.core.npo import ALPHA_DEFAULT, BETA_DEFAULT
    from npo_suite.webui import xyz_axes
    from npo_suite.webui.a1111_session import A1111Session, a1111_refusal
    from npo_suite.webui.forge_wrapper import ForgeNPOWrapper
    from npo_suite.webui.infotext import INFOTEXT_KEYS, error_text, reported_errors
    from npo_suite.webui.offset_files import OffsetCache, list_offset_files, resolve_offset_file
    from npo_suite.webui.offset_notes import offset_summary
    from npo_suite.webui.plan import build_plan, flow_model_refusal
    from npo_suite.webui.runtime import NPORuntime
    from npo_suite.webui.settings import MODES, NONE, NPOSettings, paste_value
    from npo_suite.webui.verify import verify_log_from_env

    _CACHE = OffsetCache()
    _A1111_ACTIVE: dict = {}  # the A1111 session of the running batch: runtime, cursor, sigma conversion

    def offset_dirs() -> list[str]:
        """models/npo first, then the WebUI's LoRA folder (`--lora-dir`)."""
        lora = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
        return [os.path.join(paths.models_path, "npo"), lora]

    def model_family(sd_model) -> str:
        return "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd1"

    def is_forge(sd_model) -> bool:
        return hasattr(sd_model, "forge_objects")

    def _diffusion_model_or_none(sd_model):
        try:
            return unet_module(sd_model)
        except AttributeError:
            return None

    def unet_module(sd_model):
        if is_forge(sd_model):
            return sd_model.forge_objects.unet.model.diffusion_model
        return sd_model.model.diffusion_model

    def load_offsets(settings, family: str):
        dirs = offset_dirs()
        eta = _CACHE.get(resolve_offset_file(settings.positive, dirs), family) if settings.positive else None
        delta = _CACHE.get(resolve_offset_file(settings.negative, dirs), family) if settings.negative else None
        return eta, delta

    def describe_files(positive: str, negative: str) -> str:
        """Panel note: what each chosen file was recognised as (LoadReport summary), or the error."""
        lines = []
        family = None  # detected from the file: reading shared.sd_model here could trigger a model load
        for role, name in (("positive η", positive), ("negative δ / SNPO", negative)):
            if not name or name == NONE:
                continue
            try:
                off = _CACHE.get(resolve_offset_file(name, offset_dirs()), family)
                lines.append(f"**{role}**: {offset_summary(off, name)}")
            except Exception as e:  # any failure is shown, e.g. a missing package
                lines.append(f"**{role}**: error: {error_text(e)}")
        return "\n\n".join(lines)

    # ------------------------------------------------------------------------------------------
    # A1111: one A1111Session per batch; on_cfg_denoiser (registered once) starts each step
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
        plan, lines = build_plan(settings, dm, eta, delta)
        _A1111_ACTIVE["session"] = A1111Session(dm, plan, p, verify_log_from_env())
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
        mod = xyz_axes.find_xyz_module(scripts.scripts_data)
        if mod is not None:
            xyz_axes.add_axes(mod, lambda: list_offset_files(offset_dirs()))

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
            choices = [NONE] + list_offset_files(offset_dirs())
            tab = "img2img" if is_img2img else "txt2img"
            with gr.Accordion("NPO: negative preference offsets", open=False, elem_id=f"npo_suite_{tab}"):
                with gr.Row():
                    enabled = gr.Checkbox(label="Enable NPO", value=False)
                    mode = gr.Radio(list(MODES), value="NPO", label="Mode",
                                    info="NPO: δ on the unconditional rows. SNPO: one model, empty-prompt unconditional.")
                with gr.Row():
                    positive = gr.Dropdown(choices, value=NONE, label="Positive offset η (optional)",
                                           allow_custom_value=True)
                    alpha = gr.Slider(0.0, 1.0, value=ALPHA_DEFAULT, step=0.05, label="α (η on the negative branch, NPO)")
                with gr.Row():
                    negative = gr.Dropdown(choices, value=NONE, label="Negative offset δ (NPO) / SNPO offset",
                                           allow_custom_value=True)
                    beta = gr.Slider(0.0, 1.0, value=BETA_DEFAULT, step=0.05, label="β (δ strength)")
                with gr.Row():
                    sigma_min = gr.Number(value=0.0, label="σ min (0 = no lower bound)")
                    sigma_max = gr.Number(value=0.0, label="σ max (0 = no upper bound)")
                    refresh = gr.Button(value="Refresh offset lists")
                note = gr.Markdown("")

            def refreshed():
                files = [NONE] + list_offset_files(offset_dirs())
                return gr.update(choices=files), gr.update(choices=files)

            refresh.click(fn=refreshed, inputs=[], outputs=[positive, negative])
            for dd in (positive, negative):
                dd.change(fn=describe_files, inputs=[positive, negative], outputs=[note])
            k = INFOTEXT_KEYS
            self.infotext_fields = [
                (enabled, lambda d: paste_value(d, "enabled")),
                (mode, k["mode"]), (positive, k["positive"]), (alpha, k["alpha"]), (negative, k["negative"]),
                (beta, k["beta"]), (sigma_min, k["sigma_min"]), (sigma_max, k["sigma_max"]),
            ]
            self.paste_field_names = list(k.values())
            return [enabled, mode, positive, alpha, negative, beta, sigma_min, sigma_max]

        @staticmethod
        def settings(p, args):
            return xyz_axes.apply_overrides(NPOSettings(*args[:8]), p)  # X/Y/Z plot overrides

        def process(self, p, *args):
            _a1111_end()  # every generation starts clean: one whose sampling raised never reached postprocess
            p._npo_state = None
            s = self.settings(p, args)
            if not s.enabled:
                return
            with reported_errors(p.extra_generation_params, log):
                s.validate()
                flow = flow_model_refusal(p.sd_model, _diffusion_model_or_none(p.sd_model))
                if flow:
                    raise ValueError(flow)
                if not is_forge(p.sd_model):
                    refusal = a1111_refusal(p.sd_model, getattr(p, "refiner_checkpoint", None))
                    if refusal:
                        raise ValueError(refusal)
                eta, delta = load_offsets(s, model_family(p.sd_model))
                build_plan(s, unet_module(p.sd_model), eta, delta)  # refuse before anything runs
            p._npo_state = (s, eta, delta)
            p.extra_generation_params.update(s.infotext())
            if s.mode == "SNPO":
                use_empty_negative(p)

        def process_batch(self, p, *args, **kwargs):
            state = getattr(p, "_npo_state", None)
            if state is None or is_forge(p.sd_model):
                return
            with reported_errors(p.extra_generation_params, log):
                _a1111_begin(p, *state)

        def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only (first pass and hires)
            state = getattr(p, "_npo_state", None)
            if state is None or not is_forge(p.sd_model):
                return
            s, eta, delta = state
            unet = p.sd_model.forge_objects.unet.clone()
            dm = unet.model.diffusion_model
            plan, lines = build_plan(s, dm, eta, delta)
            previous = unet.model_options.get("model_function_wrapper")
            unet.set_model_unet_function_wrapper(
                ForgeNPOWrapper(NPORuntime(dm, plan), previous, verify_log_from_env()))
            p.sd_model.forge_objects.unet = unet
            print("[NPO] Forge: " + " | ".join(lines))

        def postprocess_batch(self, p, *args, **kwargs):
            _a1111_end()

        def postprocess(self, p, processed, *args):
            _a1111_end()
