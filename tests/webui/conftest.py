"""Real-WebUI harness (opt-in): set WEBUI_PATH to a Forge or an Automatic1111 checkout (which one is
detected: Forge has `modules_forge/`), and WEBUI_PYTHON to a Python with its requirements (default:
WEBUI_PATH/venv/bin/python, else WEBUI_PATH/../venv/bin/python as ../shared/harness/*-setup.sh
build it, else this Python), e.g.

    WEBUI_PATH=/work/hosts/a1111/src OMP_NUM_THREADS=2 python -m pytest -q tests/webui
    WEBUI_PATH=/work/hosts/forge/src OMP_NUM_THREADS=2 python -m pytest -q tests/webui

A1111 builds `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")` for any SD1.5 model,
offline too: WEBUI_HF_HOME (default WEBUI_PATH/../hf-home, which a1111-setup.sh builds) is used as
HF_HOME. Nothing here imports the WebUI: first the extension's install.py runs the way the WebUI
runs it (`launch.run_extension_installer`, with pip's view of the environment recorded before and
after), then the server runs as a subprocess (API only, loopback, CPU, no download, NPO_SUITE_VERIFY
set) and the tests talk HTTP. This package is symlinked into WEBUI_PATH/extensions as `npo_suite`.
A random-weight SD1.5 checkpoint (diffusers classes with SD1.5 configs from configs/sd15, UNet keys
converted to the LDM single-file layout), three kohya LoRAs (eta, delta, an SNPO/"style" one) are
linked / written under WEBUI_PATH/models (`npo_suite_*` names). The checkpoint is built once into
NPO_WEBUI_CACHE (default /tmp/npo_suite_webui_cache) and symlinked into the host; after the session
the checkpoint link, the LoRAs, the extension link and any model folder this harness created are
removed again (`cleanup`), so the host's folders are as before.

The random CLIP's final layer norm has bias 0.5 (not 0): with bias 0 every token's output has mean
exactly 0 up to rounding, and the WebUIs' "Original" emphasis rescales the prompt embedding by
`old_mean / new_mean` of it - 0/0 in some thread counts (Forge, OMP_NUM_THREADS=1: NaN latents,
all-black images before any NPO request). A mean bounded away from 0 keeps that ratio finite.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

WEBUI_PATH = os.environ.get("WEBUI_PATH")
REPO = Path(__file__).resolve().parents[2]
CKPT = "npo_suite_random_sd15_v2.safetensors"  # v2: CLIP final layer norm bias 0.5
CACHE = Path(os.environ.get("NPO_WEBUI_CACHE", "/tmp/npo_suite_webui_cache"))
FINAL_LN_BIAS = 0.5
LORAS = {"eta": "npo_suite_eta.safetensors", "delta": "npo_suite_delta.safetensors",
         "style": "npo_suite_style.safetensors"}


def _init(name: str, shape, gen, std: float = 0.02):
    import torch

    if len(shape) >= 2:
        return (torch.randn(shape, generator=gen) * std).half()
    if name.endswith("weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith("final_layer_norm.bias"):  # a prompt embedding whose mean is not ~0 (module docstring)
        return torch.full(shape, FINAL_LN_BIAS, dtype=torch.float16)
    return torch.zeros(shape, dtype=torch.float16)


def _vae_map() -> list[tuple[str, str]]:
    """(diffusers, LDM) VAE name parts, as diffusers' convert_diffusers_to_original_stable_diffusion.py."""
    m = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        m += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            m += [(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                  (f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample.")]
        m += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    m += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    return m


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_key_to_ldm(k: str) -> str:
    """A diffusers AutoencoderKL parameter name in the LDM single-file layout (A1111 loads only these;
    the mid-block attention projections are 1x1 convs there)."""
    attn = "attentions" in k
    for hf, ldm in _VAE_MAP:
        k = k.replace(hf, ldm)
    if attn:
        for hf, ldm in _VAE_ATTN:
            k = k.replace(hf, ldm)
    return k


_VAE_MAP = _vae_map()


def build_random_sd15(path: Path) -> None:
    """Random-weight SD1.5 single-file checkpoint, fp16 (~2 GB), atomic write."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from npo_suite.core.offsets.keys import canonical_te_path, diffusers_to_ldm, unet_block_prefixes
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg_dir = REPO / "configs" / "sd15"
    gen = torch.Generator().manual_seed(1234)
    sd = {}
    ucfg = {k: v for k, v in json.loads((cfg_dir / "unet" / "config.json").read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        te = CLIPTextModel(CLIPTextConfig.from_json_file(str(cfg_dir / "text_encoder" / "config.json")))
        vcfg = {k: v for k, v in json.loads((cfg_dir / "vae" / "config.json").read_text()).items() if not k.startswith("_")}
        vae = AutoencoderKL(**vcfg)
    prefixes = unet_block_prefixes(ucfg)
    for k, p in unet.named_parameters():
        mod, pname = k.rsplit(".", 1)
        ldm = diffusers_to_ldm(mod, prefixes)
        assert ldm is not None, k
        sd[f"model.diffusion_model.{ldm}.{pname}"] = _init(k, tuple(p.shape), gen)
    for k, p in te.named_parameters():
        sd["cond_stage_model.transformer." + canonical_te_path(k)] = _init(k, tuple(p.shape), gen)
    for k, p in vae.named_parameters():
        ldm = vae_key_to_ldm(k)
        shape = tuple(p.shape) + ((1, 1) if ".mid.attn_1." in f".{ldm}" and ldm.endswith(("q.weight", "k.weight",
                                                                                             "v.weight", "proj_out.weight")) else ())
        sd["first_stage_model." + ldm] = _init(k, shape, gen)
    del unet, te, vae
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def build_loras(lora_dir: Path, npo_dir: Path) -> None:
    """kohya LoRAs on the standard SD1.5 attention projections: eta and delta (models/npo), style (Lora)."""
    import torch
    from npo_suite.core.offsets.keys import Target
    from npo_suite.core.offsets.types import LowRankDelta, Offset
    from npo_suite.core.offsets import save_offset

    shapes = Target.standard("sd1", "unet").shapes
    keys = [k for k in shapes if k.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "proj_in"))]
    for i, (role, name) in enumerate(LORAS.items()):
        gen = torch.Generator().manual_seed(100 + i)
        deltas = {}
        for k in keys:
            shape = shapes[k]
            extra = tuple(shape[2:])
            deltas[k] = LowRankDelta(down=(torch.randn((4, shape[1], *extra), generator=gen) * 0.2),
                                     up=(torch.randn((shape[0], 4, *([1] * len(extra))), generator=gen) * 0.2),
                                     scale=1.0)
        out = (lora_dir if role == "style" else npo_dir) / name
        save_offset(Offset(unet=deltas), out, family="sd1", metadata={"role": "negative" if role == "delta" else "positive"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# layout options the tests change; A1111 does not restore an override equal to its default, so
# they are set explicitly (start and after each test that changes them)
LAYOUT_DEFAULTS = {"batch_cond_uncond": True, "skip_early_cond": 0.0, "s_min_uncond": 0.0, "pad_cond_uncond": False}


def detect_flavour(root: Path) -> str | None:
    """'forge', 'a1111', or None when `root` is neither."""
    if not (root / "launch.py").is_file():
        return None
    if (root / "modules_forge").is_dir():
        return "forge"
    if (root / "modules" / "sd_samplers_cfg_denoiser.py").is_file():
        return "a1111"
    return None


def webui_python(root: Path) -> str:
    for cand in (os.environ.get("WEBUI_PYTHON"), root / "venv/bin/python", root.parent / "venv/bin/python"):
        if cand and Path(cand).exists():
            return str(cand)
    return sys.executable


class WebUI:
    def __init__(self, flavour: str, url: str, proc: subprocess.Popen, log_path: Path, verify_path: Path,
                 install: dict):
        self.flavour, self.url, self.proc, self.log_path, self.verify_path = flavour, url, proc, log_path, verify_path
        self.install = install

    def post(self, route: str, payload: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return json.loads(r.read())

    def set_options(self, opts: dict) -> None:
        """Set the WebUI options this host has (Forge lacks some of A1111's)."""
        have = self.get("/sdapi/v1/options")
        known = {k: v for k, v in opts.items() if k in have}
        if known:
            self.post("/sdapi/v1/options", known)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc): robust to a shared CPU."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_layout(self) -> None:
        self.set_options(LAYOUT_DEFAULTS)

    def verify_records(self) -> list[dict]:
        if not self.verify_path.exists():
            return []
        return [json.loads(x) for x in self.verify_path.read_text().splitlines() if x.strip()]

    def clear_verify(self) -> None:
        self.verify_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def payload(self, npo: list | None = None, **kw) -> dict:
        return txt2img_payload(npo, **kw)

    def txt2img(self, npo: list | None = None, **kw) -> dict:
        return self.post("/sdapi/v1/txt2img", txt2img_payload(npo, **kw))

    decode_image = staticmethod(lambda b64: decode_image(b64))
    npo_args = staticmethod(lambda **kw: npo_args(**kw))
    LORAS = LORAS


def decode_image(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB")).astype("int16")


def _pip_versions(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out.stdout)}


def run_installer(root: Path, python: str, ext: Path) -> dict:
    """install.py the way the WebUI runs it at start-up (launch.run_extension_installer: a subprocess
    with the WebUI on PYTHONPATH, pip through launch.run_pip), then `pip check`."""
    before = _pip_versions(python)
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("PIP_CONSTRAINT", None)
    code = f"import launch; launch.run_extension_installer({str(ext)!r})"
    r = subprocess.run([python, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    return {"rc": r.returncode, "output": r.stdout + r.stderr, "before": before, "after": _pip_versions(python),
            "pip_check_rc": check.returncode, "pip_check": check.stdout + check.stderr}


def launch_args(flavour: str, port: int, ckpt: Path) -> list[str]:
    common = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-python-version-check",
              "--skip-version-check", "--no-download-sd-model", "--nowebui", "--api", "--server-name", "127.0.0.1",
              "--port", str(port), "--no-hashing", "--ckpt", str(ckpt)]
    if flavour == "forge":
        return common + ["--always-cpu"]
    return common + ["--use-cpu", "all", "--no-half", "--do-not-download-clip"]


class Unavailable(Exception):
    """WEBUI_PATH does not lead to a usable host (the tests skip with this reason)."""


def prepare(root: Path) -> tuple[str, str, dict]:
    """(flavour, python, environment) for a server at `root`; writes nothing (`install_artifacts` does).
    Raises Unavailable with the reason when `root` is not a usable host."""
    flavour = detect_flavour(root)
    if flavour is None:
        raise Unavailable(f"WEBUI_PATH={root} is neither a Forge nor an Automatic1111 checkout (no launch.py + modules)")
    python = webui_python(root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    env.pop("WEBUI_PATH", None)
    env.pop("NPO_SUITE_VERIFY", None)
    if flavour == "a1111":
        hf = Path(os.environ.get("WEBUI_HF_HOME") or root.parent / "hf-home")
        if not (hf / "hub" / "models--openai--clip-vit-large-patch14").is_dir():
            raise Unavailable(f"A1111 needs an HF cache with openai/clip-vit-large-patch14's tokenizer "
                              f"(WEBUI_HF_HOME={hf}; a1111-setup.sh builds one)")
        env["HF_HOME"] = str(hf)
    return flavour, python, env


def _created_dirs_file(root: Path) -> Path:
    return root / "models" / ".npo_suite_test_created_dirs"


def install_artifacts(root: Path) -> None:
    """The checkpoint (built once into CACHE, symlinked into the host), the three LoRAs and the extension
    link; the model folders this creates are listed in a marker file, so `cleanup` removes exactly those."""
    models = root / "models"
    created = []
    for d in ("Stable-diffusion", "Lora", "npo"):
        if not (models / d).is_dir():
            (models / d).mkdir(parents=True)
            created.append(d)
    if created:
        with open(_created_dirs_file(root), "a") as f:
            f.write("".join(d + "\n" for d in created))
    cached = CACHE / CKPT
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_random_sd15(cached)
    ckpt = models / "Stable-diffusion" / CKPT
    if ckpt.is_symlink() or ckpt.exists():
        ckpt.unlink()
    ckpt.symlink_to(cached)
    build_loras(models / "Lora", models / "npo")
    link = root / "extensions" / "npo_suite"
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()  # an earlier checkout's link: test this one
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    elif link.resolve() != REPO:
        raise Unavailable(f"{link} exists and is not a link to {REPO}")


def cleanup(root: Path) -> list[str]:
    """Remove what `install_artifacts` put into the host (and the old uncached v1 checkpoint of earlier
    harness versions); returns the removed paths. The cached checkpoint in CACHE stays."""
    models = root / "models"
    removed = []
    paths = [models / "Stable-diffusion" / CKPT, models / "Stable-diffusion" / "npo_suite_random_sd15.safetensors",
             *((models / ("Lora" if r == "style" else "npo") / n) for r, n in LORAS.items())]
    for p in paths:
        if p.is_symlink() or p.exists():
            p.unlink()
            removed.append(str(p))
    link = root / "extensions" / "npo_suite"
    if link.is_symlink() and link.resolve() == REPO:
        link.unlink()
        removed.append(str(link))
    marker = _created_dirs_file(root)
    if marker.exists():
        for d in reversed(marker.read_text().split()):
            with contextlib.suppress(OSError):  # not empty: something else was put there since
                (models / d).rmdir()
                removed.append(str(models / d))
        marker.unlink()
    return removed


@contextlib.contextmanager
def running_webui(root: Path, tmp: Path, verify: bool = True, install: bool = True):
    """A started server (WebUI object); stopped on exit. `install`: run install.py first, as the
    WebUI does; `verify`: NPO_SUITE_VERIFY on (costs extra forwards: off for timing)."""
    flavour, python, env = prepare(root)
    try:
        install_artifacts(root)
        with _server(root, tmp, flavour, python, env, verify, install) as server:
            yield server
    finally:
        cleanup(root)


@contextlib.contextmanager
def _server(root: Path, tmp: Path, flavour: str, python: str, env: dict, verify: bool, install: bool):
    installed = run_installer(root, python, root / "extensions" / "npo_suite") if install else {}
    port = _free_port()
    if verify:
        env["NPO_SUITE_VERIFY"] = str(tmp / "verify.jsonl")
    log_path = tmp / "webui.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([python, "launch.py", *launch_args(flavour, port, root / "models/Stable-diffusion" / CKPT)],
                                cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT)
    server = WebUI(flavour, f"http://127.0.0.1:{port}", proc, log_path, tmp / "verify.jsonl", installed)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{flavour} exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                server.get("/sdapi/v1/sd-models")
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{flavour} did not start in 600 s:\n{server.log()[-4000:]}") from None
                time.sleep(2)
        server.reset_layout()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    if not WEBUI_PATH:
        pytest.skip("WEBUI_PATH is not set (path to a Forge or an Automatic1111 checkout)")
    try:
        prepare(Path(WEBUI_PATH))
    except Unavailable as e:
        pytest.skip(str(e))
    with running_webui(Path(WEBUI_PATH), tmp_path_factory.mktemp("webui")) as server:
        yield server


def txt2img_payload(npo: list | None = None, **kw) -> dict:
    payload = dict(prompt="a photo of a cat", negative_prompt="blurry", seed=7, steps=2, width=64, height=64,
                   cfg_scale=5.0, sampler_name="Euler", scheduler="Automatic", batch_size=1, n_iter=1,
                   send_images=True, save_images=False)
    payload.update(kw)
    if npo is not None:
        payload["alwayson_scripts"] = {"npo": {"args": npo}}
    return payload


def npo_args(enabled=True, mode="NPO", positive="None", alpha=0.0, negative=LORAS["delta"], beta=1.0,
             sigma_min=0.0, sigma_max=0.0) -> list:
    return [enabled, mode, positive, alpha, negative, beta, sigma_min, sigma_max]

