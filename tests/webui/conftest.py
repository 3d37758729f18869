"""Real-WebUI harness (opt-in): set WEBUI_PATH to a Forge checkout and WEBUI_PYTHON to a Python that
has Forge's requirements (default: WEBUI_PATH/venv/bin/python, else this Python), e.g.

    WEBUI_PATH=/work/forge WEBUI_PYTHON=/work/forge_venv/bin/python OMP_NUM_THREADS=1 \
        python -m pytest -q tests/webui

Nothing here imports the WebUI: the server runs as a subprocess (API only, loopback, CPU, no
download) and the tests talk HTTP. This package is symlinked into WEBUI_PATH/extensions as
`npo_suite`. A random-weight SD1.5 checkpoint (diffusers classes with SD1.5 configs from
configs/sd15, UNet keys converted to the LDM single-file layout), three kohya LoRAs (eta, delta,
an SNPO/"style" one) are written under WEBUI_PATH/models once (`npo_suite_*` names).
"""
from __future__ import annotations

import base64
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
CKPT = "npo_suite_random_sd15.safetensors"
LORAS = {"eta": "npo_suite_eta.safetensors", "delta": "npo_suite_delta.safetensors",
         "style": "npo_suite_style.safetensors"}


def _init(name: str, shape, gen, std: float = 0.02):
    import torch

    if len(shape) >= 2:
        return (torch.randn(shape, generator=gen) * std).half()
    if name.endswith("weight"):
        return torch.ones(shape, dtype=torch.float16)
    return torch.zeros(shape, dtype=torch.float16)


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
        sd["first_stage_model." + k] = _init(k, tuple(p.shape), gen)
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


class Forge:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path, verify_path: Path):
        self.url, self.proc, self.log_path, self.verify_path = url, proc, log_path, verify_path

    def post(self, route: str, payload: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return json.loads(r.read())

    def verify_records(self) -> list[dict]:
        if not self.verify_path.exists():
            return []
        return [json.loads(x) for x in self.verify_path.read_text().splitlines() if x.strip()]

    def clear_verify(self) -> None:
        self.verify_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc): robust to a shared CPU."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


@pytest.fixture(scope="session")
def forge(tmp_path_factory):
    if not WEBUI_PATH:
        pytest.skip("WEBUI_PATH is not set (path to a Forge checkout)")
    root = Path(WEBUI_PATH)
    if not (root / "launch.py").is_file():
        pytest.skip(f"WEBUI_PATH={root} has no launch.py")
    python = os.environ.get("WEBUI_PYTHON") or (str(root / "venv/bin/python") if (root / "venv/bin/python").exists()
                                                 else sys.executable)
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    for d in ("Lora", "npo"):
        (models / d).mkdir(parents=True, exist_ok=True)
    ckpt = models / "Stable-diffusion" / CKPT
    if not ckpt.exists():
        build_random_sd15(ckpt)
    if not all((models / ("Lora" if r == "style" else "npo") / n).exists() for r, n in LORAS.items()):
        build_loras(models / "Lora", models / "npo")
    link = root / "extensions" / "npo_suite"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    tmp = tmp_path_factory.mktemp("forge")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", NPO_SUITE_VERIFY=str(tmp / "verify.jsonl"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    env.pop("WEBUI_PATH", None)
    cmd = [python, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
           "--skip-python-version-check", "--skip-version-check", "--no-download-sd-model", "--always-cpu",
           "--nowebui", "--server-name", "127.0.0.1", "--port", str(port), "--no-hashing",
           "--ckpt", str(ckpt)]
    log_path = tmp / "forge.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT)
    server = Forge(f"http://127.0.0.1:{port}", proc, log_path, tmp / "verify.jsonl")
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Forge exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                server.get("/sdapi/v1/sd-models")
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"Forge did not start in 300 s:\n{server.log()[-4000:]}")
                time.sleep(2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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

