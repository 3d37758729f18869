"""`pairs`: pairing rules, the resumable sample log, atomic JSONL appends, scorer errors, and the
pairs -> train --method npo -> generate --modes npo loop on a tiny digits world."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from npo_suite.core.jsonl import append_jsonl, read_jsonl
from npo_suite.evaluation.pairing import PAIR_RULES, Sample, make_pairs
from npo_suite.evaluation.pairs import build_dataset, check_config, collect, load_samples, plan_jobs


def S(score, seed, prompt="a", neg=""):
    return Sample(prompt, neg, seed, f"images/{prompt}_{seed}.png", score)


# ----------------------------------------------------------------------------- pairing rules

def test_best_worst_pairs_highest_with_lowest_per_prompt():
    samples = [S(0.9, 0), S(0.1, 1), S(0.5, 2), S(0.52, 3), S(0.3, 0, "b"), S(0.8, 1, "b")]
    p = make_pairs(samples, "best_worst", margin=0.05)
    got = [(x.chosen.prompt, x.chosen.seed, x.rejected.seed) for x in p.pairs]
    assert got == [("a", 0, 1), ("b", 1, 0)]
    assert p.candidates == 2 and p.near_ties == 0
    assert p.pairs[0].margin == pytest.approx(0.8)
    assert p.per_group == {("a", ""): 1, ("b", ""): 1}


def test_best_worst_near_tie_dropped_and_counted():
    p = make_pairs([S(0.50, 0), S(0.53, 1), S(0.9, 0, "b"), S(0.2, 1, "b")], "best_worst", margin=0.05)
    assert [x.chosen.prompt for x in p.pairs] == ["b"]
    assert p.near_ties == 1 and p.per_group[("a", "")] == 0


def test_all_rule_keeps_every_pair_above_margin_winner_first():
    # scores 0.9, 0.1, 0.5, 0.52: 6 candidates; |0.5 - 0.52| = 0.02 <= 0.05 is a near-tie
    p = make_pairs([S(0.9, 0), S(0.1, 1), S(0.5, 2), S(0.52, 3)], "all", margin=0.05)
    got = sorted((x.chosen.seed, x.rejected.seed) for x in p.pairs)
    assert got == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    assert p.candidates == 6 and p.near_ties == 1
    assert all(x.chosen.score > x.rejected.score for x in p.pairs)


def test_equal_scores_are_never_paired_even_with_margin_zero():
    p = make_pairs([S(0.5, 0), S(0.5, 1)], "all", margin=0.0)
    assert p.pairs == [] and p.near_ties == 1


def test_negative_prompt_makes_its_own_group_and_single_samples_are_counted():
    p = make_pairs([S(0.9, 0), S(0.1, 0, neg="blurry"), S(0.2, 1, neg="blurry")], "best_worst", 0.05)
    assert p.skipped["single_sample"] == 1
    assert [(x.chosen.negative_prompt, x.chosen.seed) for x in p.pairs] == [("blurry", 1)]


def test_unknown_rule_and_negative_margin_refused():
    with pytest.raises(ValueError, match="unknown pairing rule"):
        make_pairs([S(1, 0), S(0, 1)], "median")
    with pytest.raises(ValueError, match="margin"):
        make_pairs([S(1, 0), S(0, 1)], "all", margin=-1)
    assert set(PAIR_RULES) == {"best_worst", "all"}


# ----------------------------------------------------------------------------- JSONL

def test_append_is_one_write_and_cuts_a_torn_tail(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"a": 1}])
    with open(path, "ab") as fh:
        fh.write(b'{"a": 2, "tor')  # a crash mid-write
    rows, skipped = read_jsonl(path)
    assert rows == [{"a": 1}] and skipped["torn_line"] == 1
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    append_jsonl(path, [{"a": 3}, {"a": 4}])
    assert len(writes) == 1  # both lines in one write on an O_APPEND descriptor
    rows, skipped = read_jsonl(path)
    assert rows == [{"a": 1}, {"a": 3}, {"a": 4}] and not skipped
    assert path.read_bytes().endswith(b"\n")


def test_bad_rows_are_counted_not_fatal(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n{"a": 2}\n', encoding="utf-8")
    rows, skipped = read_jsonl(path)
    assert rows == [{"a": 1}, {"a": 2}] and skipped == {"bad_row": 2}


# ----------------------------------------------------------------------------- jobs, resume

def test_plan_jobs_fixed_seeds_duplicates_and_own_seed():
    items = [{"prompt": "p", "negative_prompt": "", "seeds": []}, {"prompt": "q", "negative_prompt": "", "seeds": [7]},
             {"prompt": "p", "negative_prompt": "", "seeds": []}, {"prompt": "r", "negative_prompt": "n", "seeds": []}]
    jobs, dups = plan_jobs(items, 3, 100)
    assert dups == 1
    assert [(j.prompt, j.seed) for j in jobs] == [("p", 100), ("p", 101), ("p", 102), ("q", 7), ("q", 8), ("q", 9),
                                                  ("r", 109), ("r", 110), ("r", 111)]
    with pytest.raises(ValueError, match=">= 2"):
        plan_jobs(items, 1, 0)


def _render(jobs):
    from PIL import Image

    # grey level from the seed: a deterministic image per job
    return [Image.new("L", (8, 8), (j.seed * 37) % 256) for j in jobs]


class CountingScorer:
    name = "mean_grey"

    def __init__(self, fail_on_call=None):
        self.seen, self.calls, self.fail_on_call = [], 0, fail_on_call

    def score(self, images, prompts):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt  # an interruption mid-run
        self.seen += [np.asarray(im).mean() for im in images]
        return np.asarray([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


def _jobs():
    items = [{"prompt": p, "negative_prompt": "", "seeds": []} for p in ("a one", "a two", "a three")]
    return plan_jobs(items, 4, 0)[0]


def test_interrupted_run_resumes_without_scoring_twice(tmp_path):
    jobs = _jobs()
    first = CountingScorer(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(tmp_path / "r", jobs, _render, first, scorer_name="g", rule="all", margin=0.01,
                      config={"x": 1}, batch_size=5)
    assert len(first.seen) == 5
    assert len(load_samples(tmp_path / "r")[0]) == 5
    again = CountingScorer()
    res = build_dataset(tmp_path / "r", jobs, _render, again, scorer_name="g", rule="all", margin=0.01,
                        config={"x": 1}, batch_size=5)
    assert len(again.seen) == 12 - 5 and res["resumed"] == 5 and res["new"] == 7
    fresh = build_dataset(tmp_path / "f", jobs, _render, CountingScorer(), scorer_name="g", rule="all", margin=0.01,
                          config={"x": 1}, batch_size=5)
    assert (tmp_path / "r" / "pairs.jsonl").read_text() == (tmp_path / "f" / "pairs.jsonl").read_text()
    assert res["pairs"] == fresh["pairs"] > 0
    # a third run has nothing left to do
    third = CountingScorer()
    assert build_dataset(tmp_path / "r", jobs, _render, third, scorer_name="g", rule="best_worst", margin=0.01,
                         config={"x": 1})["new"] == 0
    assert third.calls == 0


def test_resume_refuses_other_settings(tmp_path):
    check_config(tmp_path, {"model_hash": "aa", "cfg_scale": 3.0})
    check_config(tmp_path, {"model_hash": "aa", "cfg_scale": 3.0})  # same: fine
    with pytest.raises(ValueError, match="cfg_scale: 3.0 -> 7.5"):
        check_config(tmp_path, {"model_hash": "aa", "cfg_scale": 7.5})


def test_duplicate_sample_rows_counted_and_first_kept(tmp_path):
    jobs = _jobs()[:2]
    collect(tmp_path, jobs, _render, CountingScorer())
    rows = (tmp_path / "samples.jsonl").read_text().splitlines()
    bad = json.loads(rows[0])
    bad["score"] = 99.0
    with open(tmp_path / "samples.jsonl", "a") as fh:
        fh.write(json.dumps(bad) + "\n")
    done, skipped = load_samples(tmp_path)
    assert skipped == {"duplicate_sample": 1} and len(done) == 2
    assert done[jobs[0].key].score != 99.0


def test_pairs_file_is_what_the_trainer_reads(tmp_path):
    from npo_suite.trainer.data.pairs import JsonlPairs
    from npo_suite.trainer.data.records import load_image

    res = build_dataset(tmp_path, _jobs(), _render, CountingScorer(), scorer_name="g", rule="all", margin=0.01,
                        config={}, batch_size=4)
    recs = list(JsonlPairs(tmp_path / "pairs.jsonl", verbose=False))
    assert len(recs) == res["pairs"] > 0
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for r, row in zip(recs, rows):
        grey = [np.asarray(load_image(x)).mean() / 255 for x in (r.chosen, r.rejected)]
        assert grey[0] - grey[1] > 0.01  # chosen scored higher, and the file on disk is that image
        assert grey[0] == pytest.approx(row["score_chosen"], abs=1e-6)
        assert row["chosen_by"] == "scorer:g" and row["seed_chosen"] != row["seed_rejected"]
    for f in ("report.md", "scores.png", "pairs_grid.png", "summary.json"):
        assert (tmp_path / f).is_file()
    assert "## Pairs per prompt" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- CLI errors

def test_scorer_with_missing_local_weights_is_a_clear_error_before_sampling(tmp_path, capsys):
    from npo_suite.cli import main

    out = tmp_path / "out"
    rc = main(["pairs", "--model", str(tmp_path / "no_model"), "--prompt", "x", "--scorer", "pickscore",
               "--model-path", str(tmp_path / "PickScore_v1"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "PickScore_v1" in err and "not found" in err
    assert not out.exists()  # nothing sampled, nothing written
    rc = main(["pairs", "--model", str(tmp_path), "--prompt", "x", "--scorer", "clip_score", "--out", str(out)])
    assert rc == 1 and "nothing is downloaded" in capsys.readouterr().err


def test_pairs_is_a_registered_command():
    from npo_suite.cli import COMMANDS

    assert COMMANDS["pairs"][0] == ".pairs"


# ----------------------------------------------------------------------------- the loop

@pytest.mark.slow
def test_pairs_train_generate_loop_on_a_tiny_world(tmp_path, capsys):
    from npo_suite.cli import main
    from npo_suite.trainer.data.pairs import JsonlPairs
    from npo_suite.world.build import WorldConfig, build_world

    world = build_world(tmp_path / "world", WorldConfig(steps=3, batch_size=8), diagnose_samples=0, log=None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\na handwritten one\na handwritten three\n", encoding="utf-8")
    data = tmp_path / "pairs"
    args = ["pairs", "--model", str(world), "--prompts", str(prompts), "--samples-per-prompt", "4", "--steps", "3",
            "--cfg", "3", "--scorer", "world_reward", "--rule", "all", "--margin", "0.0", "--out", str(data), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 12 and res["new"] == 12 and res["pairs"] > 0
    assert main(args) == 0  # a re-run scores nothing again
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["new"] == 0 and again["resumed"] == 12 and again["pairs"] == res["pairs"]
    assert len(list(JsonlPairs(data / "pairs.jsonl", verbose=False))) == res["pairs"]

    assert main(["train", "--model", str(world), "--method", "npo", "--data-path", str(data / "pairs.jsonl"),
                 "--resolution", "8", "--batch-size", "2", "--steps", "2", "--output-dir", str(tmp_path / "train"),
                 "--checkpoint-every", "0", "--validate-every", "0", "--cpu"]) == 0
    lora = tmp_path / "train" / "npo_lora.safetensors"
    assert lora.is_file()
    gen = tmp_path / "gen"
    assert main(["generate", str(world), "--prompts", str(prompts), "--seeds", "0", "1", "--modes", "cfg", "npo",
                 "--neg-offset", str(lora), "--cfg", "3", "--steps", "3", "--device", "cpu", "--out", str(gen)]) == 0
    manifest = json.loads((gen / "manifest.json").read_text())
    assert sorted({r["mode"] for r in manifest["images"]}) == ["cfg", "npo"]
    assert manifest["offsets"]["neg"]["path"] == str(lora)
    capsys.readouterr()
    # the generate run is a pairs source too (its own prompts and seeds; the world's reward from --world)
    assert main(["pairs", "--from-run", f"{gen}:cfg", "--scorer", "world_reward", "--world", str(world),
                 "--margin", "0", "--out", str(tmp_path / "from_run"), "--json"]) == 0
    fr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fr["samples"] == 6 and fr["prompts"] == 3
    # the strength sweep on validation seeds, world reward with the accuracy guard
    assert main(["evaluate", "sweep", "--model", str(world), "--neg-offset", str(lora), "--betas", "0.5", "2",
                 "--prompts", str(prompts), "--seeds", "0", "1", "--steps", "3", "--cfg", "3", "--n-boot", "100",
                 "--scorer", "world_reward", "--guard", "world_correct", "--out", str(tmp_path / "sweep"), "--json"]) == 0
    sw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["alpha"], r["beta"]) for r in sw["rows"]] == [(1.0, 0.5), (1.0, 2.0)] and sw["n"] == 6
    assert sw["chosen"] is None or sw["chosen"]["guard_diff"] >= -0.02
    for f in ("sweep.md", "sweep.png", "sweep.json"):
        assert (tmp_path / "sweep" / f).is_file()


# ----------------------------------------------------------------------------- sweep

def test_sweep_chooses_the_strongest_beta_that_keeps_the_guard():
    from npo_suite.evaluation.sweep import choose

    better = {"win_rate": 0.6, "diff": 0.1}  # each of these settings beats plain CFG on the scorer
    rows = [{"alpha": 1.0, "beta": 0.5, "guard_diff": 0.01}, {"alpha": 1.0, "beta": 1.0, "guard_diff": -0.015},
            {"alpha": 1.0, "beta": 2.0, "guard_diff": -0.05}, {"alpha": 0.0, "beta": 1.0, "guard_diff": 0.0}]
    rows = [{**r, **better} for r in rows]
    best = choose(rows, tolerance=0.02)
    assert (best["alpha"], best["beta"]) == (1.0, 1.0)  # beta 2 lowers the guard by 0.05 > 0.02
    assert [r["guard_ok"] for r in rows] == [True, True, False, True]
    assert choose(rows, tolerance=0.0)["beta"] == 1.0 and choose(rows, tolerance=0.0)["alpha"] == 0.0
    assert choose([{"alpha": 1.0, "beta": 1.0, "guard_diff": -0.5, **better}], 0.02) is None


def test_sweep_recommends_nothing_over_plain_cfg_when_nothing_beats_it():
    """A Self-NPO LoRA's sweep chose beta 1 at win 0.45 [0.35, 0.56]: the strongest setting that kept
    the guard, though it scored below plain CFG. A setting must beat CFG (win rate > 0.5 and a
    positive mean difference) to be recommended; otherwise the answer is plain CFG (None)."""
    from npo_suite.evaluation.sweep import choose

    worse = [{"alpha": 1.0, "beta": b, "guard_diff": 0.0, "win_rate": 0.45, "diff": -0.02} for b in (0.5, 1.0)]
    assert choose(worse, 0.02) is None
    assert [r["beats_cfg"] for r in worse] == [False, False]
    mixed = worse + [{"alpha": 1.0, "beta": 0.25, "guard_diff": 0.0, "win_rate": 0.62, "diff": 0.03},
                     {"alpha": 1.0, "beta": 2.0, "guard_diff": 0.0, "win_rate": 0.5, "diff": 0.0}]  # a tie is not better
    assert choose(mixed, 0.02)["beta"] == 0.25


def test_sweep_scores_every_setting_against_plain_cfg_on_the_same_images():
    from PIL import Image

    from npo_suite.evaluation.sweep import grid, run_sweep

    # fake renders: grey level = 100 + 50*beta (CFG: 100); the scorer likes grey, the guard dislikes beta 2
    def render(alpha, beta):
        return [Image.new("L", (2, 2), int(100 + 50 * (beta or 0)) + k) for k in range(4)]

    class Grey:
        def score(self, ims, prompts):
            return np.asarray([np.asarray(i, dtype=float).mean() / 255 for i in ims])

    class Guard:
        def score(self, ims, prompts):
            return np.asarray([0.0 if np.asarray(i).mean() > 190 else 1.0 for i in ims])

    res = run_sweep(grid([1.0], [1.0, 2.0]), render, ["p"] * 4, Grey(), Guard(), n_boot=200)
    r1, r2 = res["rows"]
    assert res["base_mean"] == pytest.approx(np.mean([100 + k for k in range(4)]) / 255)
    assert r1["win_rate"] == 1.0 and r1["diff"] == pytest.approx(50 / 255) and r1["guard_diff"] == 0.0
    assert r2["guard_diff"] == -1.0 and r2["setting"] == "alpha=1 beta=2"
    with pytest.raises(ValueError, match="beta = 0"):
        grid([1.0], [0.0])
