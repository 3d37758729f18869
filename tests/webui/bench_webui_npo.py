"""Step-time benchmark inside a real Forge or Automatic1111 (detected from WEBUI_PATH): NPO vs plain
CFG with the SAME LoRA loaded through the WebUI's own `<lora:npo_suite_style:1>` (merged into the
weights by the WebUI) in both cases; the NPO case adds the script with the rank-4 negative offset
δ of conftest.py (80 attention/proj_in modules, β = 1, no η, full σ range). Not collected by
pytest (bench_*.py); the server runs WITHOUT NPO_SUITE_VERIFY. Run:

    WEBUI_PATH=/work/hosts/a1111/src OMP_NUM_THREADS=2 flock /tmp/npo-heavy.lock \
        python tests/webui/bench_webui_npo.py --json
    WEBUI_PATH=/work/hosts/forge/src OMP_NUM_THREADS=2 flock /tmp/npo-heavy.lock \
        python tests/webui/bench_webui_npo.py --json

Method: per-step cost = (t_N − t_M) / (N − M) from an N-step and an M-step txt2img (64×64, Euler,
batch 1), which removes model load, text encode, VAE decode and the per-request constant; plain
and NPO interleaved, `--repeats` times, medians. Both the server process's CPU seconds (robust on
a shared machine) and wall seconds are reported; ratio = NPO / plain measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import LORAS, npo_args, running_webui, txt2img_payload


def per_step(server, npo: bool, m: int, n: int, prompt: str) -> tuple[float, float]:
    """(CPU s, wall s) per sampling step from an n-step and an m-step request."""
    def run(steps):
        c, t = server.cpu_seconds(), time.perf_counter()
        server.post("/sdapi/v1/txt2img", txt2img_payload(npo_args() if npo else None, prompt=prompt, steps=steps))
        return server.cpu_seconds() - c, time.perf_counter() - t

    (cn, wn), (cm, wm) = run(n), run(m)
    return (cn - cm) / (n - m), (wn - wm) / (n - m)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    root = Path(os.environ["WEBUI_PATH"])
    prompt = f"a photo of a cat <lora:{LORAS['style'][:-len('.safetensors')]}:1>"
    with tempfile.TemporaryDirectory() as tmp, running_webui(root, Path(tmp), verify=False, install=False) as server:
        per_step(server, True, 1, 2, prompt), per_step(server, False, 1, 2, prompt)  # warm-up (loads the LoRA)
        runs = {"plain": [], "npo": []}
        for _ in range(a.repeats):
            for case in ("plain", "npo"):
                runs[case].append(per_step(server, case == "npo", a.m, a.n, prompt))
        flavour = server.flavour
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in runs.items()}
    res = {"host": flavour, "steps": [a.m, a.n], "repeats": a.repeats, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "machine": platform.processor() or platform.machine(),
           "cpu_s_per_step": {k: v[0] for k, v in med.items()}, "wall_s_per_step": {k: v[1] for k, v in med.items()},
           "cpu_ratio": med["npo"][0] / med["plain"][0], "wall_ratio": med["npo"][1] / med["plain"][1], "runs": runs}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{flavour}: NPO/plain per-step ratio CPU {res['cpu_ratio']:.3f}, wall {res['wall_ratio']:.3f} "
              f"(plain {med['plain'][0]:.2f} CPU s/step, NPO {med['npo'][0]:.2f})")
    return res


if __name__ == "__main__":
    main()
