"""Data sources, transforms, sampler and collates (trainer/data/)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from npo_suite.core.cond import Cond
from npo_suite.trainer.data.dataset import ResumableSampler, collate_pairs, collate_prompts
from npo_suite.trainer.data.pairs import FolderPairs, JsonlPairs, PickAPicParquet, open_pairs
from npo_suite.core.prompts import line_id
from npo_suite.trainer.data.prompts import ImageFolder, PromptsFile, open_prompts
from npo_suite.trainer.data.records import BadRecord, load_image
from npo_suite.trainer.data.transforms import ImageTransform


def png_bytes(seed: int, size=(40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, seed, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))
    return path


# ------------------------------------------------------------------------------------ Pick-a-Pic

def write_pickapic(path, rows, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r[k] for r in rows] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    table = pa.table({"caption": pa.array(cols["caption"], pa.string()),
                      "jpg_0": pa.array(cols["jpg_0"], pa.binary()), "jpg_1": pa.array(cols["jpg_1"], pa.binary()),
                      "label_0": pa.array(cols["label_0"], pa.float64()),
                      "label_1": pa.array(cols["label_1"], pa.float64())})
    pq.write_table(table, path, row_group_size=row_group_size)


def pickapic_rows():
    a, b, c, d, e, f = (png_bytes(i) for i in range(6))
    return [
        dict(caption="a cat", jpg_0=a, jpg_1=b, label_0=1.0, label_1=0.0),      # 0: jpg_0 wins
        dict(caption="a dog", jpg_0=c, jpg_1=d, label_0=0.0, label_1=1.0),      # 1: jpg_1 wins
        dict(caption="a tie", jpg_0=a, jpg_1=c, label_0=0.5, label_1=0.5),      # 2: tie
        dict(caption=None, jpg_0=a, jpg_1=d, label_0=1.0, label_1=0.0),         # 3: no caption
        dict(caption="broken", jpg_0=b"\x89PNG not really", jpg_1=e, label_0=1.0, label_1=0.0),  # 4: corrupt winner
        dict(caption="a tree", jpg_0=e, jpg_1=f, label_0=0.0, label_1=1.0),     # 5: jpg_1 wins
    ]


def test_pickapic_parquet_order_winner_first_and_skips(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    rows = pickapic_rows()
    write_pickapic(tmp_path / "train-000.parquet", rows[:4])
    write_pickapic(tmp_path / "train-001.parquet", rows[4:])
    requested = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        requested.append(tuple(columns or ()))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    src = PickAPicParquet(str(tmp_path / "train-*.parquet"), verbose=False)
    recs = list(src)
    # indexing reads captions and labels only, one row group at a time: never the image columns
    assert requested and all("jpg_0" not in c and "jpg_1" not in c for c in requested)
    assert [r.prompt for r in recs] == ["a cat", "a dog", "broken", "a tree"]
    assert [r.id for r in recs] == ["train-000:0", "train-000:1", "train-001:0", "train-001:1"]
    winners = {"a cat": rows[0]["jpg_0"], "a dog": rows[1]["jpg_1"], "a tree": rows[5]["jpg_1"]}
    losers = {"a cat": rows[0]["jpg_1"], "a dog": rows[1]["jpg_0"], "a tree": rows[5]["jpg_0"]}
    for r in recs:
        if r.prompt in winners:
            assert r.chosen() == winners[r.prompt] and r.rejected() == losers[r.prompt]
    assert src.summary.kept == 4
    assert dict(src.summary.skipped) == {"tie": 1, "missing_caption": 1}
    with pytest.raises(BadRecord) as e:  # the corrupt winner fails only when decoded
        load_image(recs[2].chosen)
    assert e.value.reason == "corrupt_image"


def test_pickapic_rejects_foreign_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*missing column"):
        PickAPicParquet(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        PickAPicParquet(tmp_path / "nope-*.parquet")


# ------------------------------------------------------------------------------------ JSONL, folders

def test_jsonl_pairs_relative_paths_and_skips(tmp_path, capsys):
    d = tmp_path / "ds"
    save_png(d / "img" / "w1.png", 1), save_png(d / "img" / "l1.png", 2)
    save_png(d / "img" / "w2.png", 3), save_png(d / "img" / "l2.png", 4)
    lines = [
        json.dumps({"prompt": "one", "chosen": "img/w1.png", "rejected": "img/l1.png"}),
        json.dumps({"chosen": "img/w1.png", "rejected": "img/l1.png"}),                     # no prompt
        json.dumps({"prompt": "gone", "chosen": "img/w9.png", "rejected": "img/l1.png"}),  # missing file
        "{not json",                                                                       # bad row
        "",
        json.dumps({"id": "custom", "prompt": "two", "chosen": "img/w2.png", "rejected": "img/l2.png"}),
        json.dumps({"prompt": "half", "chosen": "img/w2.png"}),                            # no rejected
    ]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    src = open_pairs(d / "pairs.jsonl")
    assert isinstance(src, JsonlPairs)
    recs = list(src)
    assert [(r.id, r.prompt) for r in recs] == [("pairs:1", "one"), ("custom", "two")]
    assert recs[0].chosen == d / "img" / "w1.png" and recs[0].rejected == d / "img" / "l1.png"
    assert dict(src.summary.skipped) == {"missing_caption": 1, "missing_file": 1, "bad_row": 2}
    assert "kept 2, skipped 4" in capsys.readouterr().err  # printed at the end of the pass


def test_folder_pairs_captions_txt_missing_partner_and_caption(tmp_path):
    for s, seed in (("a", 1), ("b", 2), ("c", 3), ("e", 5)):
        save_png(tmp_path / "chosen" / f"{s}.png", seed)
    for s, seed in (("a", 11), ("b", 12), ("d", 14), ("e", 15)):
        save_png(tmp_path / "rejected" / f"{s}.jpg" if s == "b" else tmp_path / "rejected" / f"{s}.png", seed)
    (tmp_path / "captions.txt").write_text("a\ta red cat\nb\ta blue dog\nc\tlonely\nd\tlonely too\n")
    src = FolderPairs(tmp_path, verbose=False)
    recs = list(src)
    assert [(r.id, r.prompt) for r in recs] == [("a", "a red cat"), ("b", "a blue dog")]
    assert recs[1].rejected.name == "b.jpg"
    assert dict(src.summary.skipped) == {"missing_partner": 2, "missing_caption": 1}
    # second pass: a fresh summary, same result
    assert len(list(src)) == 2 and src.summary.kept == 2


def test_folder_pairs_sidecar_captions(tmp_path):
    save_png(tmp_path / "chosen" / "x.png", 1), save_png(tmp_path / "rejected" / "x.png", 2)
    (tmp_path / "chosen" / "x.txt").write_text("  sidecar caption \n")
    recs = list(open_pairs(tmp_path, verbose=False))
    assert [(r.id, r.prompt) for r in recs] == [("x", "sidecar caption")]


def test_prompts_file_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    src = PromptsFile(tmp_path / "p.txt", verbose=False)
    recs = list(src)
    assert [(r.id, r.prompt) for r in recs] == [(line_id(1, "a cat"), "a cat"), (line_id(3, "a dog"), "a dog")]
    assert dict(src.summary.skipped) == {"empty_prompt": 1}
    save_png(tmp_path / "im" / "1.png", 1)
    (tmp_path / "p.jsonl").write_text("\n".join([
        json.dumps({"id": "k1", "prompt": "a cat", "neg_prompt": "cat", "image": "im/1.png"}),
        json.dumps({"text": "a dog"}),
        json.dumps({"prompt": "gone", "image": "im/9.png"}),
        json.dumps({"prompt": ""}),
    ]))
    src = open_prompts(tmp_path / "p.jsonl", verbose=False)
    recs = list(src)
    assert recs[0].id == "k1" and recs[0].neg_prompt == "cat" and recs[0].image == tmp_path / "im" / "1.png"
    assert recs[1].prompt == "a dog" and recs[1].image is None and recs[1].neg_prompt is None
    assert dict(src.summary.skipped) == {"missing_file": 1, "empty_prompt": 1}


def test_prompts_jsonl_negative_prompt_is_the_documented_name(tmp_path):
    """Issue 13: `negative_prompt` (what `generate --prompts` reads) is the name, `neg_prompt` its alias;
    two different values on one line are a counted bad row, never a silent choice."""
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "prompt": "a cat", "negative_prompt": "blurry"},
        {"id": "b", "prompt": "a dog", "neg_prompt": "dog"},
        {"id": "c", "prompt": "a cow", "negative_prompt": "x", "neg_prompt": "x"},
        {"id": "d", "prompt": "a hen", "negative_prompt": "x", "neg_prompt": "y"}]))
    src = open_prompts(tmp_path / "p.jsonl", verbose=False)
    assert [(r.id, r.neg_prompt) for r in src] == [("a", "blurry"), ("b", "dog"), ("c", "x")]
    assert dict(src.summary.skipped) == {"bad_row": 1}
    assert "p.jsonl:4: both negative_prompt and neg_prompt are given and differ" in str(src.summary.examples)


def test_image_folder_captions_jsonl_and_duplicates(tmp_path):
    save_png(tmp_path / "p1.png", 1), save_png(tmp_path / "p2.png", 2), save_png(tmp_path / "p3.png", 3)
    (tmp_path / "captions.jsonl").write_text("\n".join([
        json.dumps({"file": "p1.png", "caption": "first"}), json.dumps({"stem": "p2", "caption": "second"})]))
    src = ImageFolder(tmp_path, verbose=False)
    recs = list(src)
    assert [(r.id, r.prompt) for r in recs] == [("p1", "first"), ("p2", "second")]
    assert dict(src.summary.skipped) == {"missing_caption": 1}
    (tmp_path / "d.txt").write_text("same\nsame\n")  # identical lines still get distinct ids
    assert len({r.id for r in PromptsFile(tmp_path / "d.txt", verbose=False)}) == 2


def test_load_image_modes_and_missing(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white background
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(BadRecord) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.reason == "missing_file"
    trunc = png_bytes(1)[:60]
    with pytest.raises(BadRecord) as e:
        load_image(trunc)
    assert e.value.reason == "corrupt_image"


# ------------------------------------------------------------------------------------ transforms

def test_center_crop_size_cond_and_range():
    img = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (64, 1, 3)))  # 96 wide, 64 high
    t = ImageTransform(32)
    px, sc = t(img, "id")
    assert px.shape == (3, 32, 32) and px.min() >= -1 and px.max() <= 1
    assert sc.original_size == (64, 96) and sc.target_size == (32, 32)
    assert sc.crop_top_left == (0, 8)  # resized to 32x48, centre crop starts at column 8
    assert sc.time_ids().tolist() == [64, 96, 0, 8, 32, 32]
    assert t.deterministic and t.num_variants == 1 and t.key() == "32_center"
    assert ImageTransform((32, 48)).key() == "32x48_center"
    with pytest.raises(ValueError, match="multiples of 8"):
        ImageTransform(30)


def test_random_crop_and_flip_are_seeded_per_variant():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    t = ImageTransform(32, crop="random", flip="random", seed=3, variants=8)
    a0, s0 = t(img, "x", 0)
    b0, s0b = t(img, "x", 0)
    assert torch.equal(a0, b0) and s0 == s0b  # same (seed, id, variant) -> same crop
    crops = {t.params("x", v, (80, 120)) for v in range(8)}
    assert len(crops) > 1  # variants differ
    assert t.params("x", 9, (80, 120)) == t.params("x", 1, (80, 120))  # variant taken modulo `variants`
    assert t.key() == "32_random_flip_s3n8"
    flipped = [v for v in range(8) if t.params("x", v, (80, 120))[2]]
    assert 0 < len(flipped) < 8
    for v in flipped[:1]:  # a flipped variant equals the mirrored unflipped crop at the mirrored position
        (rh, rw), (top, left), _ = t.params("x", v, (80, 120))
        px, sc = t(img, "x", v)
        assert sc.crop_top_left == (top, rw - left - 32)
        base = ImageTransform(32, crop="random", seed=3, variants=8)
        assert base.params("x", v, (80, 120))[1] == (top, left)
        unflipped, _ = base(img, "x", v)
        assert torch.equal(px, unflipped.flip(-1))


# ------------------------------------------------------------------------------------ sampler

def drain(sampler, n):
    out = []
    while len(out) < n:
        for k in sampler:
            out.append(k)
            if len(out) == n:
                break
    return out


def test_sampler_epochs_are_permutations_and_seeded():
    s = ResumableSampler(10, seed=1)
    e0, e1 = list(s), list(s)
    assert sorted(i for i, _ in e0) == list(range(10)) and {e for _, e in e0} == {0} and {e for _, e in e1} == {1}
    assert [i for i, _ in e0] != [i for i, _ in e1]
    assert [i for i, _ in e0] == [i for i, _ in ResumableSampler(10, seed=1)]
    assert [i for i, _ in ResumableSampler(10, shuffle=False)] == list(range(10))


def test_sampler_resume_reproduces_uninterrupted_order():
    full = drain(ResumableSampler(7, seed=5), 20)
    s = ResumableSampler(7, seed=5)
    first = drain(s, 11)  # stops mid-epoch 1
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 1 and state["index"] == 4
    r = ResumableSampler(7, seed=5)
    r.load_state_dict(state)
    assert first + drain(r, 9) == full
    with pytest.raises(ValueError, match="num_samples=7"):
        ResumableSampler(8, seed=5).load_state_dict(state)


def test_sampler_state_from_consumed_count():
    s = ResumableSampler(10, seed=0, batch_size=2, world_size=2, rank=1)
    assert s.epoch_length == 8  # cut to whole global batches
    assert s.state_dict(consumed=12) == {**s.state_dict(), "epoch": 1, "index": 4}


@pytest.mark.parametrize("world_size,batch", [(2, 2), (3, 1), (4, 3)])
def test_ddp_shards_equal_single_process_global_order(world_size, batch):
    n, seed, epochs = 26, 7, 2
    single = ResumableSampler(n, seed=seed, batch_size=batch * world_size)
    global_batches = []
    for _ in range(epochs):
        keys = list(single)
        global_batches += [keys[k:k + batch * world_size] for k in range(0, len(keys), batch * world_size)]
    ranks = [ResumableSampler(n, seed=seed, rank=r, world_size=world_size, batch_size=batch) for r in range(world_size)]
    per_rank = [[k for _ in range(epochs) for k in s] for s in ranks]
    assert len({len(p) for p in per_rank}) == 1
    for step, gb in enumerate(global_batches):
        union = [k for p in per_rank for k in p[step * batch:(step + 1) * batch]]
        assert sorted(union) == sorted(gb)
    # and interleaving the ranks sample by sample gives exactly the single-process stream
    inter = [per_rank[r][j] for j in range(len(per_rank[0])) for r in range(world_size)]
    assert inter == [k for gb in global_batches for k in gb]


def test_sampler_with_dataloader_and_resume_mid_epoch():
    data = list(range(100, 112))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, key):
            return data[key[0]]

    s = ResumableSampler(len(data), seed=2, batch_size=4)
    loader = torch.utils.data.DataLoader(DS(), batch_size=4, sampler=s)
    full = [b.tolist() for _ in range(2) for b in loader]
    s = ResumableSampler(len(data), seed=2, batch_size=4)
    loader = torch.utils.data.DataLoader(DS(), batch_size=4, sampler=s)
    it = iter(loader)
    got = [next(it).tolist() for _ in range(2)]
    state = s.state_dict()
    r = ResumableSampler(len(data), seed=2, batch_size=4)
    r.load_state_dict(state)
    loader = torch.utils.data.DataLoader(DS(), batch_size=4, sampler=r)
    got += [b.tolist() for _ in range(2) for b in loader][:len(full) - 2]
    assert got == full


# ------------------------------------------------------------------------------------ collate

def test_collates_build_batches_and_drop_none():
    def cond(v):
        return Cond(torch.full((1, 3, 4), float(v)), {"time_ids": torch.full((1, 6), float(v))})

    items = [{"id": str(i), "prompt": f"p{i}", "latents_w": torch.full((1, 4, 2, 2), i),
              "latents_l": torch.full((1, 4, 2, 2), -i), "cond": cond(i)} for i in range(3)]
    b = collate_pairs([items[0], None, items[2]])
    assert b.latents_w.shape == (2, 4, 2, 2) and b.prompts == ["p0", "p2"]
    assert b.latents_l[1].eq(-2).all() and b.cond.added["time_ids"][:, 0].tolist() == [0, 2]
    assert collate_pairs([None]) is None
    pitems = [{"id": str(i), "prompt": f"q{i}", "cond": cond(i), "latents": None, "neg_cond": cond(-i)} for i in range(2)]
    pb = collate_prompts(pitems, latent_shape=(4, 2, 2))
    assert pb.latents is None and pb.neg_cond.hidden.shape == (2, 3, 4) and pb.latent_shape == (4, 2, 2)
    pitems[1]["neg_cond"] = None
    with pytest.raises(ValueError, match="neg_prompt"):
        collate_prompts(pitems, latent_shape=(4, 2, 2))
