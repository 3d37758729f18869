"""DDSPO pieces (seed 003 eq. 5) and prompt perturbation (seed 003 app. G)."""
import random

import pytest
import torch

from npo_suite.trainer.ddspo import (DropWordsRewriter, LocalLMRewriter, PromptRewriter, build_rewriter,
                                     ddspo_margins, perturb_prompt, rewriter_names)

PROMPT = "a red fox sitting on a snowy hill under the northern lights, highly detailed"


def test_perturb_reproducible_and_seeded():
    assert perturb_prompt(PROMPT, 3) == perturb_prompt(PROMPT, 3)
    outs = {perturb_prompt(PROMPT, s) for s in range(20)}
    assert len(outs) > 5
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert perturb_prompt(PROMPT, g1) == perturb_prompt(PROMPT, g2)
    assert perturb_prompt(PROMPT, random.Random(1)) == perturb_prompt(PROMPT, 1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10, 13, 30])
def test_perturb_removes_40_to_70_percent_never_unchanged_never_empty(n):
    words = [f"w{i}" for i in range(n)]
    prompt = " ".join(words)
    for seed in range(40):
        out = perturb_prompt(prompt, seed).split()
        removed = n - len(out)
        assert 1 <= removed <= n - 1  # changed, not empty
        assert max(1, round(0.4 * n) - 1) <= removed <= min(n - 1, round(0.7 * n) + 1)
        it = iter(words)
        assert all(w in it for w in out)  # an order-preserving subsequence


def test_perturb_edge_cases():
    assert perturb_prompt("fox", 0) == ""  # documented: one word -> the null prompt
    assert perturb_prompt("", 0) == ""
    assert perturb_prompt("a  b", 0) in ("a", "b")
    with pytest.raises(ValueError):
        perturb_prompt(PROMPT, 0, min_frac=0.8, max_frac=0.2)
    with pytest.raises(TypeError):
        perturb_prompt(PROMPT, "seed")


def test_rewriter_registry_and_errors(tmp_path):
    assert list(rewriter_names()) == ["drop_words", "local_lm", "world_digits"]  # the world: a plug-in
    rw = build_rewriter("drop_words", 0.4, 0.7)
    assert isinstance(rw, PromptRewriter) and isinstance(rw, DropWordsRewriter)
    assert rw([PROMPT, "a b c"], [1, 2]) == [perturb_prompt(PROMPT, 1), perturb_prompt("a b c", 2)]
    with pytest.raises(ValueError, match="unknown DDSPO prompt rewriter"):
        build_rewriter("llama")
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_rewriter("local_lm", path=str(missing))
    with pytest.raises(ValueError, match="model folder"):
        build_rewriter("local_lm")
    with pytest.raises(ValueError, match="cannot load"):
        LocalLMRewriter(path=str(tmp_path))  # exists, but holds no model


@pytest.mark.slow
def test_local_lm_rewriter_with_a_tiny_local_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from npo_suite.testing.tiny_models import build_tokenizer

    tok = build_tokenizer(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    rw = LocalLMRewriter(path=str(tmp_path), max_new_tokens=8)
    a = rw([PROMPT, "a b"], [0, 1])
    assert a == rw([PROMPT, "a b"], [0, 1])  # greedy: deterministic
    assert all(isinstance(x, str) and x.split() != p.split() for x, p in zip(a, [PROMPT, "a b"]))


def test_ddspo_margins_golden():
    z = torch.zeros(1, 2)
    # m_w = mse(eps_ref_w_c = [0,0], eps_pol_w = [1,1]) = 1
    # mse(eps_l* = [2,0], eps_pol_l = [0,0]) = (4 + 0)/2 = 2 ; mse(eps_l*, eps_ref_l_c = [1,0]) = 1/2 ; m_l = 1.5
    m = ddspo_margins(torch.ones(1, 2), z, z, torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert m.m_w.item() == pytest.approx(1.0)
    assert m.mse_pol_l.item() == pytest.approx(2.0) and m.mse_ref_l.item() == pytest.approx(0.5)
    assert m.m_l.item() == pytest.approx(1.5)
