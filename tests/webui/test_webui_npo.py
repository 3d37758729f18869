"""NPO / SNPO through a real Forge or Automatic1111 server (API only, CPU; which one is detected
from WEBUI_PATH) on a random-weight SD1.5 checkpoint, 64x64. The same checks for both hosts.

Proof that the branch path equals the merged-weights computation inside the WebUI's own batched
forward: the server runs with NPO_SUITE_VERIFY, so for the first UNet calls the script re-runs
the call (Forge: `apply_model` in the model_function_wrapper; A1111: the UNet call itself, from a
forward hook) on the same inputs with theta+eta (cond rows) and theta+alpha*eta+beta*delta
(uncond rows) merged into the weights (exact restore afterwards) and logs the max difference. Tolerance: max|branch - merged| <= 1e-4 * max|out| (fp32; measured
~1e-6 relative); "different" means max|branch - plain| > 1e-2 * max|out|.
Images are compared as uint8 RGB after Forge's VAE decode; every image and every verify record is
first checked to be finite and not constant (`image`, `_check_records`): two black (NaN) images agree.
"""
from __future__ import annotations

import json
import math
import os

import pytest

if not os.environ.get("WEBUI_PATH"):
    pytest.skip("WEBUI_PATH is not set (real-WebUI tests are opt-in, see docs/webui.md)", allow_module_level=True)

from informative import assert_informative  # noqa: E402
from npo_suite.webui.settings import NPOSettings  # noqa: E402

RTOL_SAME, RTOL_DIFF = 1e-4, 1e-2


def image(webui, resp: dict, i: int = 0):
    """The i-th image of a response as int16 RGB, asserted finite and not constant (not all black)."""
    return assert_informative(webui.decode_image(resp["images"][i]), name=f"image {i}")


def _infotext(resp: dict) -> str:
    return json.loads(resp["info"])["infotexts"][0]


def _check_records(recs: list[dict], n_rows: int | None = None) -> None:
    """Every checked UNet call equals the merged-weights computation, and its rows got the right
    branch (inside the sigma window: uncond -> neg, cond -> pos; outside: all pos). `n_rows`: each
    call had that many rows, cond and uncond batched together."""
    assert recs, "the NPO hooks never ran (no verify records)"
    for r in recs:
        vals = (r["max_abs_diff_merged"], r["max_abs_diff_plain"], r["max_abs_out"])
        assert all(math.isfinite(v) for v in vals) and r["max_abs_out"] > 0, f"degenerate UNet output: {r}"
        if n_rows is not None:
            assert len(r["rows"]) == n_rows and set(r["rows"]) == {"cond", "uncond"}, r
        assert r["max_abs_diff_merged"] <= RTOL_SAME * r["max_abs_out"], r
        if r["mode"] == "NPO" and set(r["groups"]) != {"pos"}:
            assert r["groups"] == ["neg" if u == "uncond" else "pos" for u in r["rows"]], r


@pytest.fixture
def layout_options(webui):
    """Tests that change layout options leave the defaults behind (A1111 does not restore an
    override equal to its default)."""
    webui.reset_layout()
    yield webui.set_options
    webui.reset_layout()


@pytest.fixture(scope="module")
def plain(webui):
    return webui.txt2img(None)


def test_npo_equals_merged_weights_and_differs_from_cfg(webui, plain):
    webui.clear_verify()
    resp = webui.txt2img(webui.npo_args())
    recs = webui.verify_records()
    _check_records(recs, 2)
    assert all(r["groups"][r["rows"].index("uncond")] == "neg" for r in recs)
    assert any(r["max_abs_diff_plain"] > RTOL_DIFF * r["max_abs_out"] for r in recs)
    a, b = image(webui, plain), image(webui, resp)
    assert abs(a - b).mean() > 1.0, "NPO image equals the plain-CFG image"
    info = _infotext(resp)
    assert "NPO mode: NPO" in info and f"NPO negative: {webui.LORAS['delta']}" in info


def test_infotext_parses_back(webui):
    s = NPOSettings(True, "NPO", webui.LORAS["eta"], 0.25, webui.LORAS["delta"], 0.75, 0.5, 20.0)
    webui.clear_verify()
    resp = webui.txt2img([s.enabled, s.mode, s.positive, s.alpha, s.negative, s.beta, s.sigma_min, s.sigma_max])
    recs = webui.verify_records()
    _check_records(recs, 2)
    # Euler, 2 steps: sigma 14.6 is inside [0.5, 20] (uncond rows "neg"), the last sigma (~0.03) is outside (all "pos")
    assert [sorted(r["groups"]) for r in recs] == [["neg", "pos"], ["pos", "pos"]], recs
    params = webui.post("/sdapi/v1/png-info", {"image": resp["images"][0]})["parameters"]  # the WebUI's own parser
    assert NPOSettings.from_infotext(params) == s


def test_batch_hires_and_lora_syntax(webui):
    """batch 2, hires fix (second pass wrapped too), <lora:...> on both branches, eta with alpha."""
    webui.clear_verify()
    forge_only = dict(hr_additional_modules=["Use same choices"], hr_cfg=5.0) if webui.flavour == "forge" else {}
    resp = webui.txt2img(webui.npo_args(positive=webui.LORAS["eta"], alpha=0.5),
                         prompt=f"a photo of a cat <lora:{webui.LORAS['style'][:-12]}:0.7>", batch_size=2,
                         enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.5,
                         hr_upscaler="Latent", **forge_only)  # Forge's API needs these two (its hires CFG is 1 otherwise)
    assert len(resp["images"]) == 2
    assert image(webui, resp).shape == (96, 96, 3) and image(webui, resp, 1).shape == (96, 96, 3)
    recs = webui.verify_records()
    _check_records(recs, 4)
    assert len(recs) >= 3  # first pass (2 steps) and the hires pass (1 step)
    assert any(r["sigma"] < recs[0]["sigma"] for r in recs[2:])
    assert "<lora:npo_suite_style:0.7>" in _infotext(resp)


def test_snpo_equals_lora_with_empty_negative_prompt(webui):
    """SNPO = one model (theta + beta*delta on every row) with the empty prompt as uncond: the same
    image as the WebUI's own <lora:...> weight patching with an empty negative prompt. The infotext
    shows what was encoded: no negative prompt, and says so."""
    style = webui.LORAS["style"]
    snpo = webui.txt2img(webui.npo_args(mode="SNPO", negative=style, beta=1.0), negative_prompt="blurry")
    ref = webui.txt2img(None, prompt=f"a photo of a cat <lora:{style[:-12]}:1>", negative_prompt="")
    other = webui.txt2img(None, prompt=f"a photo of a cat <lora:{style[:-12]}:1>", negative_prompt="blurry")
    no_lora = webui.txt2img(None, negative_prompt="")
    a, b, c, d = (image(webui, r) for r in (snpo, ref, other, no_lora))
    assert abs(a - b).max() <= 2, f"SNPO differs from merged LoRA + empty negative (max {abs(a - b).max()})"
    assert abs(a - c).mean() > 1.0  # the negative prompt was really replaced by the empty one
    assert abs(b - d).mean() > 1.0  # the WebUI did apply <lora:...> (the reference is not the plain model)
    info = _infotext(snpo)
    assert "NPO mode: SNPO" in info and "NPO uncond: empty prompt" in info
    assert "Negative prompt:" not in info and "blurry" not in info, info


def test_img2img(webui, plain):
    webui.clear_verify()
    resp = webui.post("/sdapi/v1/img2img", {**webui.payload(webui.npo_args()), "init_images": [plain["images"][0]],
                                             "denoising_strength": 0.6, "steps": 3})
    _check_records(webui.verify_records(), 2)
    assert "NPO mode: NPO" in _infotext(resp)


def test_bad_offset_is_reported_not_applied(webui):
    webui.clear_verify()
    resp = webui.txt2img(webui.npo_args(negative="missing.safetensors"))
    assert webui.verify_records() == []  # nothing applied
    info = _infotext(resp)
    assert "NPO error" in info and "missing.safetensors" in info and "NPO mode" not in info


def test_panel_in_both_tabs(webui):
    """The panel's ui() builds in txt2img and img2img, with the argument order the API uses, and lists both folders."""
    info = webui.get("/sdapi/v1/script-info")
    for is_img2img in (False, True):
        npo = next(s for s in info if s["name"] == "npo" and s["is_img2img"] == is_img2img)
        labels = [a["label"] for a in npo["args"]]
        assert labels[0] == "Enable NPO" and labels[1] == "Mode" and labels[6].startswith("σ min"), labels
        assert {webui.LORAS["delta"], webui.LORAS["style"], "None"} <= set(npo["args"][4]["choices"])


def test_xyz_plot_beta_axis(webui, plain):
    info = webui.get("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_choices = xyz["args"][0]["choices"]
    assert "[NPO] Beta" in x_choices and "[NPO] Alpha" in x_choices
    idx = x_choices.index("[NPO] Beta")
    npo_full = webui.txt2img(webui.npo_args())
    args = [idx, "0, 1", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    if len(xyz["args"]) == 19:  # A1111 dev: draw_grid
        args.append(True)
    resp = webui.post("/sdapi/v1/txt2img", {**webui.payload(webui.npo_args()), "script_name": "x/y/z plot",
                                            "script_args": args})
    imgs = [image(webui, resp, i) for i in range(len(resp["images"]))]
    assert len(imgs) == 3  # grid + one per value
    beta0, beta1 = imgs[1], imgs[2]
    assert abs(beta0 - image(webui, plain)).max() <= 2  # beta = 0: plain CFG
    assert abs(beta1 - image(webui, npo_full)).max() <= 2  # beta = 1: the NPO image
    assert abs(beta0 - beta1).mean() > 1.0


def test_install_keeps_the_hosts_versions(webui):
    """install.py, run as the WebUI runs it, installs only what is absent, changes no installed
    version, and leaves `pip check` clean; the server then starts (this fixture)."""
    inst = webui.install
    assert inst["rc"] == 0 and "Error running install.py" not in inst["output"], inst["output"][-3000:]
    changed = {k: (v, inst["after"][k]) for k, v in inst["before"].items() if inst["after"].get(k) != v}
    assert not changed, f"install.py changed installed versions: {changed}"
    assert {"diffusers", "safetensors", "transformers"} <= set(inst["after"])
    assert inst["pip_check_rc"] == 0, inst["pip_check"]


def test_token_lengths_and_and_prompts(webui):
    """A prompt longer than 75 tokens with a short negative: A1111 runs cond and uncond as two UNet
    calls (different token lengths); `A AND B`: two cond rows per image, one uncond row."""
    webui.clear_verify()
    webui.txt2img(webui.npo_args(), prompt="a photo of a cat on a red sofa " * 12)
    recs = webui.verify_records()
    _check_records(recs)
    assert {"cond", "uncond"} <= {x for r in recs for x in r["rows"]}
    if webui.flavour == "a1111":
        assert [r["rows"] for r in recs[:2]] == [["cond"], ["uncond"]], recs
    webui.clear_verify()
    webui.txt2img(webui.npo_args(), prompt="a photo of a cat AND a red sofa")
    recs = webui.verify_records()
    _check_records(recs)
    if webui.flavour == "a1111":
        assert recs[0]["rows"] == ["cond", "cond", "uncond"], recs


def test_batch_cond_uncond_off(webui, layout_options):
    """One UNet call per chunk (A1111: cond rows, then uncond rows, batch 2 each)."""
    layout_options({"batch_cond_uncond": False})
    webui.clear_verify()
    webui.txt2img(webui.npo_args(), batch_size=2)
    recs = webui.verify_records()
    _check_records(recs)
    if webui.flavour == "a1111":
        assert [r["rows"] for r in recs[:2]] == [["cond", "cond"], ["uncond", "uncond"]], recs


def test_skipped_uncond(webui, layout_options):
    """Skip-early-CFG and NGMS drop the uncond rows before the UNet: the cond rows keep theta+eta,
    nothing is shifted onto the wrong rows."""
    layout_options({"skip_early_cond": 0.5})
    webui.clear_verify()
    resp = webui.txt2img(webui.npo_args(), steps=4)
    recs = webui.verify_records()
    _check_records(recs)
    if webui.flavour == "a1111":
        assert "Skip Early CFG" in _infotext(resp)
        assert recs[0]["rows"] == ["cond"] and recs[-1]["rows"] == ["cond", "uncond"], recs
    webui.reset_layout()
    webui.clear_verify()
    resp = webui.txt2img(webui.npo_args(), steps=4, s_min_uncond=100.0)  # NGMS: odd steps skip uncond
    recs = webui.verify_records()
    _check_records(recs)
    if webui.flavour == "a1111":
        assert "NGMS" in _infotext(resp)
        assert [r["rows"] for r in recs[:2]] == [["cond", "uncond"], ["cond"]], recs


def test_failed_generation_leaves_nothing_on(webui, plain):
    """A generation with NPO whose sampling fails (NaN CFG scale: A1111 raises on the NaN latent)
    never reaches postprocess: the next plain generation must still be plain."""
    try:
        webui.post("/sdapi/v1/txt2img", webui.payload(webui.npo_args(), cfg_scale=math.nan))
    except OSError:  # A1111 answers 500
        pass
    webui.clear_verify()
    again = webui.txt2img(None)
    assert webui.verify_records() == []
    assert abs(image(webui, again) - image(webui, plain)).max() == 0
    assert "NPO" not in _infotext(again)
