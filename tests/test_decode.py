"""Images decode to what a viewer shows, or are skipped with a counted reason (trainer/data/records.py
`load_image`, the one decoder of training, the caches, evaluation and the ComfyUI nodes); unreadable
Pick-a-Pic shards are skipped and counted (trainer/data/pairs.py)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from npo_suite.core.summary import DataSummary
from npo_suite.trainer.data.records import ALPHA_BACKGROUND, BadRecord, PairRecord, load_image


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16bit_grey_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 0.7 * 65535, 32 * 32).reshape(32, 32).astype(np.uint16)  # mean ~ 0.35 of full scale
    data = encoded(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(load_image(data), dtype=np.float64)  # [32, 32, 3]
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[..., 0], np.round(ramp / 65535 * 255), atol=0.5)
    assert abs(out.mean() - ramp.mean() / 257) < 0.5  # was ~250: clipped to white


def test_float_tiff_in_unit_range_is_scaled_and_out_of_range_refused():
    f = np.linspace(0, 0.4, 16 * 16, dtype=np.float32).reshape(16, 16)
    out = np.asarray(load_image(encoded(Image.fromarray(f, mode="F"), "TIFF")), dtype=np.float64)
    np.testing.assert_allclose(out[..., 1], np.round(f * 255), atol=0.5)  # was almost black
    with pytest.raises(BadRecord, match=r"values span \[0, 40\].*outside \[0, 1\]") as e:
        load_image(encoded(Image.fromarray(f * 100, mode="F"), "TIFF"), "hdr.tif")
    assert e.value.reason == "unsupported_image"
    nan = f.copy()
    nan[3, 3] = np.nan
    with pytest.raises(BadRecord, match="NaN") as e:
        load_image(encoded(Image.fromarray(nan, mode="F"), "TIFF"))
    assert e.value.reason == "unsupported_image"


def test_jpeg_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)  # landscape: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = np.asarray(load_image(encoded(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)))
    assert out.shape == (40, 20, 3)  # shown upright: portrait
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # red on top after the 90° CW turn
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_alpha_is_composited_on_the_documented_background():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)  # colour channels hold black under full transparency
    rgba[:4, :, 3] = 0
    rgba[4:, :, :3] = (200, 10, 10)
    rgba[4:, :, 3] = 255
    out = np.asarray(load_image(encoded(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert (out[:4] == 255).all() and (out[4:] == (200, 10, 10)).all()
    half = np.asarray(load_image(encoded(Image.fromarray(np.full((2, 2, 2), (0, 128), np.uint8), "LA"), "PNG")))
    assert abs(int(half[0, 0, 0]) - 127) <= 1  # black at 50% alpha on white
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    p.info["transparency"] = 0
    assert (np.asarray(load_image(encoded(p, "PNG"))) == 255).all()


def test_bad_images_are_counted_by_reason_in_the_cache(tmp_path):
    from test_cache import CountingEncoder, save_png

    from npo_suite.trainer.data.cache import LatentCache
    from npo_suite.trainer.data.transforms import ImageTransform

    good = save_png(tmp_path / "w.png", 1, size=(32, 32))
    hdr = tmp_path / "hdr.tif"
    Image.fromarray(np.full((32, 32), 7.5, np.float32), mode="F").save(hdr)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    recs = [PairRecord("ok", "p", good, good), PairRecord("hdr", "p", good, hdr),
            PairRecord("trunc", "p", tmp_path / "trunc.png", good)]
    enc = CountingEncoder()
    summary = DataSummary("encode")
    kept = LatentCache(None, "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32)).fill(
        recs, summary=summary, verbose=False)
    assert [r.id for r in kept] == ["ok"]
    assert dict(summary.skipped) == {"unsupported_image": 1, "corrupt_image": 1}


def test_evaluation_and_progress_decode_like_training(tmp_path):
    """evaluation/runs.py load_images uses the same decoder (a 16-bit run image is not white)."""
    from npo_suite.evaluation.runs import load_images, read_run
    from npo_suite.nodes.comfy.progress import image_tensor

    ramp = np.linspace(0, 0.5 * 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "0000.png")
    clear = np.zeros((16, 16, 4), np.uint8)  # fully transparent, black colour channels
    Image.fromarray(clear, "RGBA").save(tmp_path / "0001.png")
    items = [{"file": f"000{i}.png", "prompt": "p", "seed": i} for i in range(2)]
    (tmp_path / "manifest.json").write_text(json.dumps({"images": items}))
    im, transparent = load_images(read_run(tmp_path))
    assert im.mode == "RGB" and abs(np.asarray(im, np.float64).mean() - ramp.mean() / 257) < 0.5
    assert transparent.mode == "RGB" and (np.asarray(transparent) == 255).all()  # on white, as viewers show it
    t = image_tensor(tmp_path / "0000.png")  # [1, H, W, 3] in [0, 1]
    assert t.shape == (1, 16, 16, 3) and abs(float(t.mean()) * 255 - ramp.mean() / 257) < 0.5
    assert torch.is_tensor(t)


def _shard(path, n=3, start=0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = encoded(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG")
    t = pa.table({"caption": [f"prompt {start + i}" for i in range(n)], "jpg_0": [png] * n, "jpg_1": [png] * n,
                  "label_0": [1.0] * n, "label_1": [0.0] * n})
    pq.write_table(t, path, row_group_size=1)
    return path


def test_truncated_parquet_shard_is_skipped_and_counted(tmp_path):
    pytest.importorskip("pyarrow")
    from npo_suite.trainer.data.pairs import PickAPicParquet

    _shard(tmp_path / "a.parquet")
    full = _shard(tmp_path / "b.parquet", start=3).read_bytes()
    (tmp_path / "b.parquet").write_bytes(full[: len(full) // 2])  # an interrupted download
    src = PickAPicParquet(str(tmp_path), verbose=False)
    recs = list(src)
    assert [r.prompt for r in recs] == ["prompt 0", "prompt 1", "prompt 2"]
    assert dict(src.summary.skipped) == {"unreadable_shard": 1}
    assert "b.parquet" in src.summary.examples["unreadable_shard"]
    assert np.asarray(load_image(recs[0].chosen)).shape == (8, 8, 3)
