"""NPO / SNPO through a real Forge server (API only, CPU) on a random-weight SD1.5 checkpoint, 64x64.

Proof that the branch path equals the merged-weights computation inside Forge's own denoiser
path: the server runs with NPO_SUITE_VERIFY, so for the first forwards of every sampling pass
the script re-runs Forge's `apply_model` on the same inputs with theta+eta (cond rows) and
theta+alpha*eta+beta*delta (uncond rows) merged into the weights (exact restore afterwards)
and logs the max difference. Tolerance: max|branch - merged| <= 1e-4 * max|out| (fp32; measured
~1e-6 relative); "different" means max|branch - plain| > 1e-2 * max|out|.
Images are compared as uint8 RGB after Forge's VAE decode.
"""
from __future__ import annotations

import json
import os
import time

import pytest

if not os.environ.get("WEBUI_PATH"):
    pytest.skip("WEBUI_PATH is not set (real-Forge tests are opt-in, see docs/webui.md)", allow_module_level=True)

from npo_suite.webui.logic import NPOSettings

RTOL_SAME, RTOL_DIFF = 1e-4, 1e-2


def _infotext(resp: dict) -> str:
    return json.loads(resp["info"])["infotexts"][0]


def _check_records(recs: list[dict], n_rows: int) -> None:
    assert recs, "the NPO wrapper never ran (no verify records)"
    for r in recs:
        assert len(r["rows"]) == n_rows and set(r["rows"]) == {"cond", "uncond"}, r
        assert r["max_abs_diff_merged"] <= RTOL_SAME * r["max_abs_out"], r


@pytest.fixture(scope="module")
def plain(forge):
    return forge.txt2img(None)


def test_npo_equals_merged_weights_and_differs_from_cfg(forge, plain):
    forge.clear_verify()
    resp = forge.txt2img(forge.npo_args())
    recs = forge.verify_records()
    _check_records(recs, 2)
    assert all(r["groups"][r["rows"].index("uncond")] == "neg" for r in recs)
    assert any(r["max_abs_diff_plain"] > RTOL_DIFF * r["max_abs_out"] for r in recs)
    a, b = forge.decode_image(plain["images"][0]), forge.decode_image(resp["images"][0])
    assert abs(a - b).mean() > 1.0, "NPO image equals the plain-CFG image"
    info = _infotext(resp)
    assert "NPO mode: NPO" in info and f"NPO negative: {forge.LORAS['delta']}" in info


def test_infotext_parses_back(forge):
    s = NPOSettings(True, "NPO", forge.LORAS["eta"], 0.25, forge.LORAS["delta"], 0.75, 0.5, 20.0)
    forge.clear_verify()
    resp = forge.txt2img([s.enabled, s.mode, s.positive, s.alpha, s.negative, s.beta, s.sigma_min, s.sigma_max])
    recs = forge.verify_records()
    _check_records(recs, 2)
    # Euler, 2 steps: sigma 14.6 is inside [0.5, 20] (uncond rows "neg"), the last sigma (~0.03) is outside (all "pos")
    assert [sorted(r["groups"]) for r in recs] == [["neg", "pos"], ["pos", "pos"]], recs
    params = forge.post("/sdapi/v1/png-info", {"image": resp["images"][0]})["parameters"]  # the WebUI's own parser
    assert NPOSettings.from_infotext(params) == s


def test_batch_hires_and_lora_syntax(forge):
    """batch 2, hires fix (second pass wrapped too), <lora:...> on both branches, eta with alpha."""
    forge.clear_verify()
    resp = forge.txt2img(forge.npo_args(positive=forge.LORAS["eta"], alpha=0.5),
                         prompt=f"a photo of a cat <lora:{forge.LORAS['style'][:-12]}:0.7>", batch_size=2,
                         enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.5,
                         hr_upscaler="Latent", hr_additional_modules=["Use same choices"], hr_cfg=5.0)  # Forge API needs these two
    assert len(resp["images"]) == 2
    assert forge.decode_image(resp["images"][0]).shape == (96, 96, 3)
    recs = forge.verify_records()
    _check_records(recs, 4)
    assert len(recs) >= 3  # first pass (2 steps) and the hires pass (1 step)
    assert any(r["sigma"] < recs[0]["sigma"] for r in recs[2:])
    assert "[LORA] Loaded" in forge.log() and "npo_suite_style" in forge.log()


def test_snpo_equals_lora_with_empty_negative_prompt(forge):
    """SNPO = one model (theta + beta*delta on every row) with the empty prompt as uncond: the same
    image as Forge's own <lora:...> weight patching with an empty negative prompt."""
    style = forge.LORAS["style"]
    snpo = forge.txt2img(forge.npo_args(mode="SNPO", negative=style, beta=1.0), negative_prompt="blurry")
    ref = forge.txt2img(None, prompt=f"a photo of a cat <lora:{style[:-12]}:1>", negative_prompt="")
    other = forge.txt2img(None, prompt=f"a photo of a cat <lora:{style[:-12]}:1>", negative_prompt="blurry")
    a, b, c = (forge.decode_image(r["images"][0]) for r in (snpo, ref, other))
    assert abs(a - b).max() <= 2, f"SNPO differs from merged LoRA + empty negative (max {abs(a - b).max()})"
    assert abs(a - c).mean() > 1.0  # the negative prompt was really replaced by the empty one
    assert "NPO mode: SNPO" in _infotext(snpo)


def test_img2img(forge, plain):
    forge.clear_verify()
    resp = forge.post("/sdapi/v1/img2img", {**forge.payload(forge.npo_args()), "init_images": [plain["images"][0]],
                                             "denoising_strength": 0.6, "steps": 3})
    _check_records(forge.verify_records(), 2)
    assert "NPO mode: NPO" in _infotext(resp)


def test_bad_offset_is_reported_not_applied(forge):
    forge.clear_verify()
    resp = forge.txt2img(forge.npo_args(negative="missing.safetensors"))
    assert forge.verify_records() == []  # nothing applied
    info = _infotext(resp)
    assert "NPO error" in info and "missing.safetensors" in info and "NPO mode" not in info


def test_panel_in_both_tabs(forge):
    """The panel's ui() builds in txt2img and img2img, with the argument order the API uses, and lists both folders."""
    info = forge.get("/sdapi/v1/script-info")
    for is_img2img in (False, True):
        npo = next(s for s in info if s["name"] == "npo" and s["is_img2img"] == is_img2img)
        labels = [a["label"] for a in npo["args"]]
        assert labels[0] == "Enable NPO" and labels[1] == "Mode" and labels[6].startswith("σ min"), labels
        assert {forge.LORAS["delta"], forge.LORAS["style"], "None"} <= set(npo["args"][4]["choices"])


def test_xyz_plot_beta_axis(forge, plain):
    info = forge.get("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_choices = xyz["args"][0]["choices"]
    assert "[NPO] Beta" in x_choices and "[NPO] Alpha" in x_choices
    idx = x_choices.index("[NPO] Beta")
    npo_full = forge.txt2img(forge.npo_args())
    resp = forge.post("/sdapi/v1/txt2img", {
        **forge.payload(forge.npo_args()), "script_name": "x/y/z plot",
        "script_args": [idx, "0, 1", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]})
    imgs = [forge.decode_image(x) for x in resp["images"]]
    assert len(imgs) == 3  # grid + one per value
    beta0, beta1 = imgs[1], imgs[2]
    assert abs(beta0 - forge.decode_image(plain["images"][0])).max() <= 2  # beta = 0: plain CFG
    assert abs(beta1 - forge.decode_image(npo_full["images"][0])).max() <= 2  # beta = 1: the NPO image
    assert abs(beta0 - beta1).mean() > 1.0


@pytest.mark.slow
def test_step_time_overhead(forge):
    """Step time with NPO vs without, same LoRA (<lora:...>) loaded in both. Per-step cost from the
    difference of an 8- and a 4-step run (removes load/encode/decode and the 4 verified forwards),
    in server CPU seconds (robust to other processes on a shared CPU; wall time printed too),
    interleaved, median of 5. Target <= 1.15x (docs/BENCHMARKS.md "## Forge")."""
    prompt = f"a photo of a cat <lora:{forge.LORAS['style'][:-12]}:1>"

    def run(npo, steps):
        c, t = forge.cpu_seconds(), time.perf_counter()
        forge.txt2img(forge.npo_args() if npo else None, prompt=prompt, steps=steps)
        return forge.cpu_seconds() - c, time.perf_counter() - t

    run(True, 2), run(False, 2)  # warm-up
    cpu, wall = {True: [], False: []}, {True: [], False: []}
    for _ in range(5):
        for npo in (False, True):
            (c8, w8), (c4, w4) = run(npo, 8), run(npo, 4)
            cpu[npo].append((c8 - c4) / 4)
            wall[npo].append((w8 - w4) / 4)
    med = {k: sorted(v)[2] for k, v in cpu.items()}
    wmed = {k: sorted(v)[2] for k, v in wall.items()}
    ratio = med[True] / med[False]
    res = {"cpu_s_per_step": {"plain": med[False], "npo": med[True]}, "cpu_ratio": ratio,
           "wall_s_per_step": {"plain": wmed[False], "npo": wmed[True]}, "wall_ratio": wmed[True] / wmed[False],
           "cpu_runs": {"plain": cpu[False], "npo": cpu[True]}, "wall_runs": {"plain": wall[False], "npo": wall[True]}}
    print("\n" + json.dumps(res))
    out = os.environ.get("NPO_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    assert ratio <= 1.15
