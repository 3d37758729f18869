"""A small CLIP tokenizer and text-encoder config built locally (no downloads).

One BPE token per listed word, every other word byte-level: the embedded world's tokenizer, and
the tiny test models' (`testing.tiny_models`). `CLIPTokenizer` reads the files as it reads a
real CLIP vocabulary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


# Words that get a single BPE token each; every other word falls back to byte-level characters.
DEFAULT_WORDS = (
    "a photo of the an and with in on at blurry ugly low quality high detailed sharp cat dog "
    "handwritten zero one two three four five six seven eight nine digit thin thick bold "
    "neat messy painting red blue green tree house car person"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(directory: str | os.PathLike, words=DEFAULT_WORDS) -> Path:
    """Write `vocab.json` + `merges.txt` of a small CLIP BPE vocabulary into `directory`.

    The vocabulary holds the byte alphabet (with and without the `</w>` end-of-word mark), the
    special tokens, and one token per word of `words` (merges built letter by letter).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = ["<|startoftext|>", "<|endoftext|>"]
    vocab += alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in sorted(set(w.lower() for w in words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merged = cur + nxt
            if merged not in seen:
                merges.append(f"{cur} {nxt}")
                vocab.append(merged)
                seen.add(merged)
            cur = merged
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(directory: str | os.PathLike, words=DEFAULT_WORDS, max_length: int = 77):
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory, words)
    # from_pretrained reads vocab.json + merges.txt in transformers 4.x and 5.x alike.
    return CLIPTokenizer.from_pretrained(str(directory), pad_token="<|endoftext|>", model_max_length=max_length)


def text_encoder_config(vocab_size: int, hidden: int = 32, layers: int = 2, projection_dim: int = 32, max_pos: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_pos, projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )
