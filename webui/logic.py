"""NPO / SNPO in Forge and Automatic1111: settings, infotext, row layouts, offsets, runtime.

METHODS.md "NPO guidance at sampling time" (seed 001 §3.2, seed 000 eq. 12-13): the conditional
rows of the WebUI's batched CFG forward run `theta + eta`, the unconditional rows
`theta + alpha*eta + beta*delta`; the WebUI's own CFG combine then gives
`eps = eps_neg + w*(eps_pos - eps_neg)`. The per-row offsets come from `core.branch_lora`
(forward hooks, no weight patching, no second model); this module only decides which rows are
unconditional in each WebUI and maps offset keys (diffusers module paths) to the LDM module
names the WebUIs' UNets use.

Row layouts (the only WebUI-specific part, both tested in tests/test_webui_logic.py):
  * Forge: cond and uncond are batched in its ComfyUI-style backend
    (backend/sampling/sampling_function.py), which calls `model_function_wrapper` with
    `cond_or_uncond` (one entry per equal-size chunk, 0 = cond, 1 = uncond): `forge_uncond_flags`.
  * A1111: `CFGDenoiser.forward` concatenates `[cond rows (AND-prompts repeated)..., uncond rows]`
    (uncond LAST, `batch_size` rows) before `on_cfg_denoiser`, then runs the UNet on that tensor
    whole or in consecutive slices, always in order; a skipped uncond (s_min_uncond,
    skip_early_cond) just never reaches the UNet. `A1111RowCursor` hands each UNet call its rows.

SNPO (seed 000 §4.3): one model for both branches (`theta + eta + beta*s` on every row, s the SNPO
LoRA chosen in the negative dropdown; `core.npo`) and the unconditional input is the encoded empty prompt (the script sets the negative prompt to ""
before the WebUI encodes it).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import branch_lora
from ..core.branch_lora import BranchOffsets
from ..core.npo import (ALPHA_DEFAULT, BETA_DEFAULT, COND, UNCOND, NPOSpec, chunk_kinds, match_deltas, row_groups,
                        sigma_bound)
from ..core.offsets.keys import SD15_UNET, SDXL_UNET, diffusers_to_ldm, unet_block_prefixes
from ..core.offsets.schema import metadata_lines
from ..core.offsets.types import DenseDelta, LowRankDelta, Offset, coverage_line
from ..core.paths import safe_relative_name

Delta = LowRankDelta | DenseDelta

MODES = ("NPO", "SNPO")
NONE = "None"  # dropdown entry for "no offset"
OFFSET_SUFFIXES = (".safetensors",)

# infotext keys (generation parameters); "NPO mode" marks the feature as on. A key equal to its
# value would be written bare by the WebUI (`create_infotext`) and lost when parsed back.
INFOTEXT_KEYS = {
    "mode": "NPO mode",
    "positive": "NPO positive",
    "alpha": "NPO alpha",
    "negative": "NPO negative",
    "beta": "NPO beta",
    "sigma_min": "NPO sigma min",
    "sigma_max": "NPO sigma max",
}
ERROR_KEY = "NPO error"  # written instead of the keys above when NPO could not be applied
# SNPO encodes the empty prompt as the unconditional input: the infotext says so (the negative
# prompt line is empty, as encoded), and pasting it back needs nothing from this key.
SNPO_UNCOND = ("NPO uncond", "empty prompt")


# ---------------------------------------------------------------------------------------------
# settings and infotext
# ---------------------------------------------------------------------------------------------
@dataclass
class NPOSettings:
    """The panel's values. Offsets are file names relative to an offset folder ("" = none);
    sigma_min / sigma_max <= 0 mean unbounded (the offsets act at every step)."""

    enabled: bool = False
    mode: str = "NPO"
    positive: str = ""
    alpha: float = ALPHA_DEFAULT
    negative: str = ""
    beta: float = BETA_DEFAULT
    sigma_min: float = 0.0
    sigma_max: float = 0.0

    def __post_init__(self):
        self.positive = "" if self.positive in (None, NONE) else str(self.positive)
        self.negative = "" if self.negative in (None, NONE) else str(self.negative)
        self.alpha, self.beta = float(self.alpha), float(self.beta)
        self.sigma_min = float(self.sigma_min or 0.0)
        self.sigma_max = float(self.sigma_max or 0.0)

    def validate(self) -> None:
        """Raise ValueError naming the problem; called before anything is applied."""
        if self.mode not in MODES:
            raise ValueError(f"NPO: unknown mode {self.mode!r} (expected one of {MODES})")
        for name in ("alpha", "beta", "sigma_min", "sigma_max"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"NPO: {name} must be a finite number, got {v}")
        if self.mode == "NPO" and not self.negative:
            raise ValueError("NPO: choose a negative offset (delta); NPO without one is plain CFG")
        if self.mode == "SNPO" and not (self.negative or self.positive):
            raise ValueError("SNPO: choose the SNPO offset (the negative-offset dropdown), or a positive offset")
        lo, hi = self.sigma_range()
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"NPO: sigma min {lo:g} is larger than sigma max {hi:g}")

    def sigma_range(self) -> tuple[float | None, float | None]:
        return sigma_bound(self.sigma_min), sigma_bound(self.sigma_max)

    def infotext(self) -> dict[str, str]:
        """Generation parameters (`p.extra_generation_params`): only what is set."""
        if not self.enabled:
            return {}
        k = INFOTEXT_KEYS
        out = {k["mode"]: self.mode}
        if self.positive:
            out[k["positive"]] = self.positive
            if self.mode == "NPO":
                out[k["alpha"]] = _num(self.alpha)
        if self.negative:
            out[k["negative"]] = self.negative
            out[k["beta"]] = _num(self.beta)
        lo, hi = self.sigma_range()
        if lo is not None:
            out[k["sigma_min"]] = _num(lo)
        if hi is not None:
            out[k["sigma_max"]] = _num(hi)
        if self.mode == "SNPO":
            out[SNPO_UNCOND[0]] = SNPO_UNCOND[1]
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> NPOSettings:
        """Inverse of `infotext` (values as the WebUI's infotext parser returns them: strings)."""
        k = INFOTEXT_KEYS
        if k["mode"] not in params:
            return cls(enabled=False)
        return cls(enabled=True, mode=str(params[k["mode"]]), positive=str(params.get(k["positive"], "")),
                   alpha=float(params.get(k["alpha"], ALPHA_DEFAULT)), negative=str(params.get(k["negative"], "")),
                   beta=float(params.get(k["beta"], BETA_DEFAULT)), sigma_min=float(params.get(k["sigma_min"], 0.0)),
                   sigma_max=float(params.get(k["sigma_max"], 0.0)))


def _num(v: float) -> str:
    return f"{float(v):g}"


def error_text(e: BaseException) -> str:
    """The `NPO error` infotext value for `e` (commas would split the infotext)."""
    if isinstance(e, ModuleNotFoundError):
        msg = (f"the Python package {e.name or e} is not installed in the WebUI's environment "
               "(the extension's install.py installs it at the next WebUI start)")
    else:
        msg = str(e) or type(e).__name__
    return msg.replace(",", ";")[:300]


@contextlib.contextmanager
def reported_errors(params: dict, logger: logging.Logger):
    """Any exception inside is written to `params["NPO error"]` (the infotext), logged with its
    traceback, and re-raised: NPO never silently does nothing."""
    try:
        yield
    except Exception as e:
        params[ERROR_KEY] = error_text(e)
        logger.exception("NPO error: %s", params[ERROR_KEY])
        raise


def paste_value(params: Mapping[str, str], field: str):
    """Value of panel field `field` for pasted generation parameters (the "send to txt2img" flow)."""
    s = NPOSettings.from_infotext(params)
    if field in ("positive", "negative"):
        return getattr(s, field) or NONE
    return getattr(s, field)


# ---------------------------------------------------------------------------------------------
# offset files
# ---------------------------------------------------------------------------------------------
def list_offset_files(dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Offset files (`.safetensors`) under `dirs`, as '/'-separated names relative to their folder,
    sorted, first folder wins on duplicates; missing folders are skipped."""
    seen: dict[str, None] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in OFFSET_SUFFIXES:
                seen.setdefault(p.relative_to(root).as_posix(), None)
    return sorted(seen, key=str.lower)


def resolve_offset_file(name: str, dirs: Sequence[str | os.PathLike]) -> Path:
    """The file a dropdown `name` refers to (searched in `dirs` in order).

    Raises ValueError for names that could leave the folders (absolute, drive, '..') or have a
    pickle suffix, FileNotFoundError (listing the folders searched) when no folder has it.
    """
    if name == NONE:
        raise ValueError("NPO: empty offset file name")
    norm = safe_relative_name(name, "NPO: offset file")  # no absolute, drive or '..' names
    if not norm.lower().endswith(OFFSET_SUFFIXES):
        raise ValueError(f"NPO: {name!r}: only .safetensors offsets are loaded (pickle files are refused)")
    for d in dirs:
        p = Path(d) / norm
        if p.is_file():
            return p
    raise FileNotFoundError(f"NPO: offset file {name!r} not found in {', '.join(str(d) for d in dirs)}")


def offset_summary(offset: Offset, name: str) -> str:
    """The panel's note on a chosen file: what was recognised (LoadReport), its notes, and its NPO
    metadata (core/offsets/schema.py: method, role, β, λ, base model hash, steps)."""
    s = offset.report.summary() if offset.report is not None else name
    if offset.report is not None and offset.report.notes:
        s += " (" + "; ".join(offset.report.notes) + ")"
    meta = metadata_lines(offset.metadata)
    return s + ("; " + ", ".join(meta) if meta else "")


class OffsetCache:
    """Loaded offsets keyed by (path, mtime, size, family): re-read only when the file changes."""

    def __init__(self, loader: Callable[..., Offset] | None = None, max_entries: int = 4):
        if loader is None:
            from ..core.offsets import load_offset as loader
        self.loader = loader
        self.max_entries = max_entries
        self._items: dict[tuple, Offset] = {}

    def get(self, path: str | os.PathLike, family: str | None) -> Offset:
        p = Path(path)
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size, family)
        if key not in self._items:
            if len(self._items) >= self.max_entries:
                self._items.pop(next(iter(self._items)))
            self._items[key] = self.loader(p, family=family, strict=False)
        return self._items[key]


# ---------------------------------------------------------------------------------------------
# offset keys: diffusers module paths -> the WebUI UNet's LDM module paths
# ---------------------------------------------------------------------------------------------
_STANDARD_LAYOUTS = {"sd1": SD15_UNET, "sdxl": SDXL_UNET}


def unet_deltas_to_ldm(offset: Offset | None, unet: nn.Module, layouts: Sequence[Mapping] | None = None
                       ) -> tuple[dict[str, Delta], list[str]]:
    """The offset's UNet deltas re-keyed to `unet`'s own module paths, and the keys matching nothing.

    The WebUIs' UNets use LDM names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); offsets
    are keyed by diffusers paths. The block numbering depends only on the block layout, which is
    the same for SD1.x/SD2.x and differs for SDXL: both standard layouts are tried and the one
    under which more deltas fit (module exists, weight size matches) wins. Keys already in the
    target's naming (e.g. a diffusers-named UNet) pass through. `layouts`: diffusers UNet configs
    (block types, layers_per_block) to try instead of the standard SD1.x and SDXL ones.
    """
    if offset is None or not offset.unet:
        return {}, []
    best: tuple[dict, list] | None = None
    for layout in (layouts or list(_STANDARD_LAYOUTS.values())):
        prefixes = unet_block_prefixes(layout)
        mapped, unmatched = match_deltas(offset.unet, unet, lambda path: (path, diffusers_to_ldm(path, prefixes)))
        if best is None or len(mapped) > len(best[0]):
            best = (mapped, unmatched)
    return best


def describe(offset: Offset | None, mapped: Mapping[str, Delta], unmatched: Sequence[str], role: str) -> str:
    """One line for the panel / infotext-adjacent log (`core.offsets.types.coverage_line`)."""
    return coverage_line(offset, len(mapped), unmatched, role)


# ---------------------------------------------------------------------------------------------
# row layouts
# ---------------------------------------------------------------------------------------------
def forge_uncond_flags(cond_or_uncond: Sequence[int], batch: int) -> list[bool]:
    """Forge (ComfyUI-style backend): one flag per row of the batched forward, True = unconditional.

    `cond_or_uncond` has one entry per chunk; `sampling_function` concatenates equal-size chunks
    and splits the output with `.chunk(len(cond_or_uncond))`.
    """
    return [k == UNCOND for k in chunk_kinds(cond_or_uncond, batch)]


def a1111_uncond_flags(n_rows: int, n_uncond: int) -> list[bool]:
    """A1111 `CFGDenoiser`: `x_in` = cond rows (AND-prompts repeated), then `n_uncond` uncond rows last."""
    if not 0 <= n_uncond <= n_rows:
        raise ValueError(f"NPO: {n_uncond} unconditional rows cannot be the tail of a batch of {n_rows}")
    return [False] * (n_rows - n_uncond) + [True] * n_uncond


class A1111RowCursor:
    """Hands each UNet call of one A1111 CFG step its slice of the step's row layout.

    A1111 runs the UNet on `x_in` whole or in consecutive slices in order (batch_cond_uncond off,
    or cond/uncond of different token lengths), and drops the uncond tail when it skips uncond
    (skip-early-CFG, NGMS); a cursor over the layout covers all of these. `take` answers None for
    a call the layout does not explain (layout exhausted or never set); `A1111Session` refuses it.
    """

    def __init__(self):
        self.layout: list[bool] = []
        self.pos = 0

    def reset(self, n_rows: int, n_uncond: int) -> None:
        self.layout, self.pos = a1111_uncond_flags(n_rows, n_uncond), 0

    def take(self, n: int) -> list[bool] | None:
        """Flags for the next `n` rows, or None when this call is not part of the step's layout."""
        if self.pos + n > len(self.layout):
            self.layout, self.pos = [], 0
            return None
        rows = self.layout[self.pos:self.pos + n]
        self.pos += n
        return rows

    def state(self) -> str:
        return f"{self.pos} of {len(self.layout)} rows taken" if self.layout else "no CFG step in progress"


def a1111_refusal(sd_model, refiner_checkpoint) -> str | None:
    """Why NPO cannot run on this A1111 generation (None: it can). Refused up front, because the
    offsets would otherwise reach the wrong rows or no rows at all:
      * InstructPix2Pix (`cond_stage_key == "edit"`): A1111 lays out [cond, image-cond, uncond];
      * a refiner checkpoint: A1111 swaps the UNet mid-sampling, the offsets sit on the first one."""
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        return ("NPO: InstructPix2Pix (edit) models are not supported (A1111 batches [cond, image-cond, uncond] "
                "rows, not [cond, uncond])")
    if refiner_checkpoint not in (None, "", "None", "none"):
        return ("NPO: the refiner is not supported (A1111 switches to the refiner's UNet mid-sampling, "
                "which would run without the offsets); disable the refiner")
    return None


class A1111Session:
    """NPO on A1111's own batched forward for one batch of one generation (`process_batch` to
    `postprocess_batch`).

    `CFGDenoiser.forward` calls `on_cfg_denoiser` (-> `step`) with `x_in` = [cond rows..., uncond
    rows], then runs the UNet on `x_in` whole or in consecutive slices; a forward pre-hook on the
    UNet gives each call its rows (`A1111RowCursor`) and refuses a call the layout does not
    explain. The session belongs to the processing object `owner` that started it: a CFG step of
    another generation closes it (a generation whose sampling raised never reaches
    `postprocess_batch`) instead of applying stale offsets. With `verify` (NPO_SUITE_VERIFY) a
    forward hook re-runs each checked call with the offsets merged into the weights (VerifyLog).
    """

    def __init__(self, unet: nn.Module, plan: NPOPlan, owner, verify: VerifyLog | None = None):
        self.runtime = NPORuntime(unet, plan)
        self.cursor = A1111RowCursor()
        self.owner, self.verify = owner, verify
        self.sigma = math.inf
        self.closed = False
        self._rows: list[bool] | None = None
        self._reference = False  # inside a verify re-run: no offsets, cursor untouched
        self.runtime.hold()
        self._handles = [unet.register_forward_pre_hook(self._pre),
                         unet.register_forward_hook(self._post, with_kwargs=True)]

    def step(self, owner, n_rows: int, n_uncond: int, sigma: float) -> bool:
        """A CFG step of `owner` begins (`on_cfg_denoiser`). False, and the session closed, when
        `owner` is not the generation that started it."""
        if owner is not self.owner:
            self.close()
            return False
        self.sigma = float(sigma)
        self.cursor.reset(n_rows, n_uncond)
        return True

    def _pre(self, module, args):
        n = int(args[0].shape[0])  # x: [n, C, H, W]
        if self._reference:
            self.runtime.set_rows(None, self.sigma, n)
            return
        state = self.cursor.state()
        rows = self.cursor.take(n)
        if rows is None:
            raise RuntimeError(f"NPO: a UNet call of {n} rows that A1111's CFG step does not explain ({state}); "
                               "refusing to guess which rows are unconditional")
        self._rows = rows
        self.runtime.set_rows(rows, self.sigma, n)

    def _post(self, module, args, kwargs, out):
        if self.verify is None or self._reference:
            return

        def forward():
            self._reference = True
            try:
                return module(*args, **kwargs)
            finally:
                self._reference = False

        self.verify.check(self.runtime.unet, self.runtime.plan, self._rows, self.sigma, forward, out)

    def close(self) -> None:
        if not self.closed:
            for h in self._handles:
                h.remove()
            self.runtime.release()
            self.closed = True


# ---------------------------------------------------------------------------------------------
# the runtime: per-row offsets on one batched forward
# ---------------------------------------------------------------------------------------------
@dataclass
class NPOPlan:
    """Resolved offsets (keyed by the UNet's own module paths) and their weights."""

    mode: str
    eta: dict[str, Delta]
    delta: dict[str, Delta]
    alpha: float = ALPHA_DEFAULT
    beta: float = BETA_DEFAULT
    sigma_min: float | None = None
    sigma_max: float | None = None

    @property
    def spec(self) -> NPOSpec:
        """The run as `core.npo.NPOSpec`; in SNPO mode the negative dropdown holds the SNPO LoRA s."""
        snpo = self.mode == "SNPO"
        return NPOSpec(eta=self.eta, delta=None if snpo else self.delta, alpha=self.alpha, beta=self.beta,
                       snpo=self.delta if snpo else None, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def groups(self) -> dict[str, list]:
        """`core.npo` groups: pos = theta+eta, neg = theta+alpha*eta+beta*delta, snpo = theta+eta+beta*s."""
        return self.spec.groups()

    def row_groups(self, uncond: Sequence[bool], sigma: float) -> list[str]:
        """Group of every row (`core.npo.row_groups`). Outside the sigma range every row runs theta+eta."""
        kinds = [UNCOND if u else COND for u in uncond]
        return row_groups(kinds, self.mode.lower(), self.spec.active(sigma))

    def merged_terms(self, group: str) -> list[tuple[Offset, float]]:
        """The same group as weight-space terms for `core.offsets.applied` (the merged reference)."""
        return [(Offset(unet=dict(o)), w) for o, w in self.groups()[group]]


class NPORuntime:
    """Per-row offsets on `unet` for forwards whose unconditional rows are known.

    The hook plan (`core.branch_lora.BranchOffsets`) is built lazily on the first forward, when
    the WebUI has put the UNet on its device, and rebuilt if the device or dtype changes. Hooks
    exist only during `run(...)` unless `hold()` keeps them (A1111 path).
    """

    def __init__(self, unet: nn.Module, plan: NPOPlan):
        self.unet = unet
        self.plan = plan
        self._br: branch_lora.BranchOffsets | None = None
        self._key = None
        self.calls = 0

    def _branch(self) -> BranchOffsets:
        probe = next((self.unet.get_submodule(p) for p in (*self.plan.delta, *self.plan.eta)), None)
        key = None if probe is None else (probe.weight.device, probe.weight.dtype)
        if self._br is None or key != self._key:
            if self._br is not None:
                self._br.close()
            self._br, self._key = branch_lora.BranchOffsets(self.unet, self.plan.groups()), key
        return self._br

    def run(self, uncond: Sequence[bool], sigma: float, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`forward()` with the rows' offsets active (hooks installed for this call only)."""
        br = self._branch()
        br.set_rows(self.plan.row_groups(uncond, sigma))
        self.calls += 1
        with br:
            return forward()

    def hold(self) -> BranchOffsets:
        """Install the hooks until `release()`; rows are set per forward with `set_rows`."""
        br = self._branch()
        br.set_rows([None])
        br.__enter__()
        return br

    def set_rows(self, uncond: Sequence[bool] | None, sigma: float, n: int) -> None:
        br = self._branch()
        br.set_rows([None] * n if uncond is None else self.plan.row_groups(uncond, sigma))
        self.calls += 1

    def release(self) -> None:
        if self._br is not None:
            self._br.close()


def merged_reference(unet: nn.Module, plan: NPOPlan, uncond: Sequence[bool], sigma: float,
                     forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-model computation with merged weights, for checking the branch path in a real WebUI.

    Runs `forward()` once with `theta+eta` merged into `unet`'s weights and once with
    `theta+alpha*eta+beta*delta` (SNPO: `theta+eta+beta*s`) merged (core.offsets.applied:
    exact restore afterwards) and takes each row from the model of its group. Also returns the
    plain forward (no offset) so a caller can show the offsets change anything. [B, C, H, W] each.
    """
    from ..core.offsets import applied

    groups = plan.row_groups(uncond, sigma)
    outs = {}
    for g in sorted(set(groups)):
        with applied(unet, plan.merged_terms(g)):
            outs[g] = forward().detach().clone()
    plain = forward().detach().clone()
    ref = torch.stack([outs[g][i] for i, g in enumerate(groups)])  # [B, C, H, W]
    return ref, plain


class VerifyLog:
    """Opt-in check (env NPO_SUITE_VERIFY=<file.jsonl>): for the first `limit` forwards, compare the
    branch output with `merged_reference` and append one JSON line per forward. Costs 3 extra
    forwards per checked step; off unless the variable is set."""

    def __init__(self, path: str | os.PathLike, limit: int = 4):
        self.path, self.limit, self.done = Path(path), limit, 0

    def check(self, unet, plan: NPOPlan, uncond, sigma, forward, out: torch.Tensor) -> None:
        if self.done >= self.limit:
            return
        self.done += 1
        ref, plain = merged_reference(unet, plan, uncond, sigma, forward)
        rec = {"sigma": float(sigma), "rows": ["uncond" if u else "cond" for u in uncond],
               "groups": plan.row_groups(uncond, sigma), "mode": plan.mode,
               "max_abs_diff_merged": float((out.float() - ref.float()).abs().max()),
               "max_abs_diff_plain": float((out.float() - plain.float()).abs().max()),
               "max_abs_out": float(out.float().abs().max())}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def verify_log_from_env() -> VerifyLog | None:
    p = os.environ.get("NPO_SUITE_VERIFY")
    return VerifyLog(p) if p else None


class ForgeNPOWrapper:
    """Forge `model_function_wrapper` (UnetPatcher.set_model_unet_function_wrapper).

    Reads `cond_or_uncond`, gives the rows their offsets for this forward, and chains a wrapper
    set before it (which then runs inside our hooks). The sigma is Forge's k-diffusion sigma.
    """

    def __init__(self, runtime: NPORuntime, previous=None, verify: VerifyLog | None = None):
        self.runtime, self.previous, self.verify = runtime, previous, verify

    def __deepcopy__(self, memo):  # UnetPatcher.clone deep-copies model_options: share, don't copy tensors
        return self

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        x = args["input"]  # [n_chunks * B, C, H, W]
        uncond = forge_uncond_flags(list(args["cond_or_uncond"]), x.shape[0])
        sigma = float(args["timestep"].flatten()[0])

        def forward():
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])

        out = self.runtime.run(uncond, sigma, forward)
        if self.verify is not None:
            self.verify.check(self.runtime.unet, self.runtime.plan, uncond, sigma, forward, out)
        return out


def build_plan(settings: NPOSettings, unet: nn.Module, eta: Offset | None, delta: Offset | None,
               layouts: Sequence[Mapping] | None = None) -> tuple[NPOPlan, list[str]]:
    """Map the loaded offsets onto `unet`; returns the plan and report lines. Raises ValueError when
    a chosen offset has no module that fits this model (nothing is applied then)."""
    eta_m, eta_un = unet_deltas_to_ldm(eta, unet, layouts)
    delta_m, delta_un = unet_deltas_to_ldm(delta, unet, layouts)
    for off, m, role in ((eta, eta_m, "positive offset"), (delta, delta_m, "negative offset")):
        if off is not None and not m:
            name = off.report.path if off.report is not None else role
            raise ValueError(f"NPO: {role} {name}: none of its {len(off.unet)} UNet modules fit this model "
                             "(wrong model family, or not a UNet offset)")
    lo, hi = settings.sigma_range()
    plan = NPOPlan(settings.mode, eta_m, delta_m, settings.alpha, settings.beta, lo, hi)
    lines = [describe(eta, eta_m, eta_un, "positive"), describe(delta, delta_m, delta_un,
                                                                "SNPO" if settings.mode == "SNPO" else "negative")]
    return plan, lines


def settings_dict(s: NPOSettings) -> dict:
    return asdict(s)
