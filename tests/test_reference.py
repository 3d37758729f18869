"""Reference update with a divergence bound (seed 004 eq. 8; trainer/reference.py)."""
import sys
from pathlib import Path

import pytest
import torch

from npo_suite.core.cond import Cond
from npo_suite.trainer.batches import PairBatch
from npo_suite.trainer.methods import MethodConfig
from npo_suite.trainer.reference import ReferenceUpdater, divergence_estimate

sys.path.insert(0, str(Path(__file__).parent))
from methods_fake_backend import FakeBackend, sd_abar  # noqa: E402


class OracleBackend:
    """All data is the point mass x0*; the base network (None) is the exact denoiser
    eps = (x_t - a_t x0*) / sigma_t. Adapter `a` adds scale[a] * u, u a fixed unit-RMS pattern, so
    on our scale D(adapter, init) = mse(eps, eps + scale*u) - 0 = scale^2 exactly."""

    family, prediction_type, device = "world", "epsilon", torch.device("cpu")

    def __init__(self, x0):
        self.abar = sd_abar()
        self.x0 = x0
        u = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(3))
        self.u = u / u.pow(2).mean().sqrt()  # unit RMS
        self.scale = {"policy": 0.0}
        self.copies = 0

    num_train_timesteps = property(lambda self: 1000)

    def predict_eps(self, x_t, t, cond, adapter="policy"):
        a = self.abar[t].sqrt().float().reshape(-1, 1, 1, 1)
        sg = (1 - self.abar[t]).sqrt().float().reshape(-1, 1, 1, 1)
        return (x_t - a * self.x0[:1]) / sg + (0.0 if adapter is None else self.scale[adapter]) * self.u

    def add_adapter(self, name, init_from="policy"):
        self.scale[name] = 0.0 if init_from is None else self.scale[init_from]

    def copy_adapter(self, src, dst):
        self.copies += 1
        self.scale[dst] = self.scale[src]

    def reset_adapter(self, name):
        self.scale[name] = 0.0


def oracle_batch(B=4):
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).expand(B, -1, -1, -1).contiguous()
    return OracleBackend(x0), PairBatch(x0, x0.clone(), Cond(torch.zeros(B, 3, 8)))


def test_divergence_scale_is_per_element_mse_difference():
    be, batch = oracle_batch()
    be.add_adapter("ref")
    g = torch.Generator().manual_seed(0)
    assert abs(divergence_estimate(be, batch.latents_w, batch.cond, g).item()) < 1e-8  # ref == init
    for scale in (0.01, 0.05, 0.0707, 0.2):
        be.scale["ref"] = scale
        d = divergence_estimate(be, batch.latents_w, batch.cond, torch.Generator().manual_seed(0), n_t=2)
        # calibration: delta = 0.005 <-> an RMS eps error of sqrt(0.005) = 0.0707 per latent element
        assert d.item() == pytest.approx(scale ** 2, rel=1e-3, abs=1e-7)


def test_divergence_on_a_network_zero_at_init_grows_with_perturbation():
    be = FakeBackend(seed=0)
    be.add_adapter("ref")
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = be.encode_prompts(["a cat", "a dog", "red", "blue sky"])
    d0 = divergence_estimate(be, x, cond, torch.Generator().manual_seed(0))
    assert d0.item() == 0.0  # same adapter weights, same eps and t -> identical predictions
    ds = []
    for scale in (0.3, 1.0, 3.0):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            be.adapters["ref"]["up1"].copy_(torch.randn(be.adapters["ref"]["up1"].shape, generator=g) * scale)
        ds.append(divergence_estimate(be, x, cond, torch.Generator().manual_seed(0)).item())
    assert 0 < ds[0] < ds[1] < ds[2]


def drive(on_exceed, steps=8):
    """Policy drifts by 0.02 per step; every = 2, bound 0.005 -> D = (0.02 k)^2 crosses at k = 4 (0.0064)."""
    be, batch = oracle_batch()
    be.add_adapter("ref")
    up = ReferenceUpdater(every=2, bound=0.005, on_exceed=on_exceed, n_t=2)
    events = []
    for step in range(1, steps + 1):
        be.scale["policy"] = 0.02 * step
        ev = up.maybe_update(step, be, batch)
        events.append(ev)
    return be, up, events


def test_updater_freezes_when_bound_crossed():
    be, up, events = drive("freeze")
    assert [e is None for e in events] == [True, False, True, False, True, True, True, True]
    assert events[1]["ref/event"] == "updated" and events[1]["ref/divergence"] == pytest.approx(0.0016, rel=1e-3)
    assert events[3]["ref/event"] == "froze" and events[3]["ref/divergence"] == pytest.approx(0.0064, rel=1e-3)
    assert up.frozen and be.copies == 1
    assert be.scale["ref"] == pytest.approx(0.04)  # the last reference inside the bound
    fresh = ReferenceUpdater(every=2, bound=0.005)
    fresh.load_state_dict(up.state_dict())
    assert fresh.frozen


def test_updater_reinit_resets_reference_and_keeps_checking():
    be, up, events = drive("reinit")
    kinds = [e["ref/event"] for e in events if e is not None]
    assert kinds == ["updated", "reinitialised", "reinitialised", "reinitialised"]
    assert not up.frozen and be.scale["ref"] == 0.0


def test_from_config_and_validation():
    assert ReferenceUpdater.from_config(MethodConfig()) is None
    up = ReferenceUpdater.from_config(MethodConfig(ref_update_every=32, ref_bound=0.002, ref_on_exceed="reinit"))
    assert (up.every, up.bound, up.on_exceed) == (32, 0.002, "reinit")
    with pytest.raises(ValueError, match="on_exceed"):
        ReferenceUpdater(4, 0.005, on_exceed="stop")
    with pytest.raises(ValueError, match="bound"):
        ReferenceUpdater(4, 0.0)
