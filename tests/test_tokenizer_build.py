"""The shapes-world CLIP BPE tokenizer loads like an SD checkpoint's tokenizer/ folder."""
import itertools
import json
import os

import numpy as np
import pytest

from jaxdiff.data import shapes, tokenizer as tk
from jaxdiff.data.shapes import ShapeObject, WorldSpec

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tk.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tk.load_tokenizer(tok_dir)


def _longest_captions():
    big = ShapeObject("triangle", "purple", "small", "left")
    right = ShapeObject("square", "orange", "big", "right")
    return [shapes.caption([big, right], "white"),
            shapes.caption([ShapeObject("star", "cyan", "small", "centre")], "gray")]


def test_files_and_special_tokens(tok_dir, tok):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(tok_dir, name))
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    assert len(vocab) == len(tok) < 700
    assert vocab["<|startoftext|>"] == len(vocab) - 2 == tok.bos_token_id
    assert vocab["<|endoftext|>"] == len(vocab) - 1 == tok.eos_token_id == tok.pad_token_id
    assert tok.model_max_length == tk.DEFAULT_MAX_LENGTH == 16
    assert open(os.path.join(tok_dir, "merges.txt")).readline().startswith("#version")


def test_every_word_is_one_token(tok):
    words = tk.tokenizer_words(SPEC)
    assert set(SPEC.words()) <= set(words) and set(tk.RARE_IDENTIFIERS) <= set(words)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>"], w


def test_captions_round_trip_and_fit(tok):
    caps = [e["caption"] for e in itertools.islice(shapes.iterate(0, SPEC), 1000)]
    caps += _longest_captions()
    enc = tok(caps).input_ids
    for c, ids in zip(caps, enc):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(c.split()) + 2  # one token per word
        assert tok.decode(ids, skip_special_tokens=True) == c
    assert max(len(i) for i in enc) == 16 == tok.model_max_length
    padded = tok(caps[:4], padding="max_length", max_length=16, truncation=True,
                 return_tensors="np").input_ids
    assert padded.shape == (4, 16) and (padded[:, -1] == tok.pad_token_id).all()


def test_unknown_text_does_not_crash(tok):
    texts = ["a zebra riding a unicycle", "Héllo wörld 日本 123!!", "", "A BIG RED STAR",
             "a photo of sks dog, blurry"]
    enc = tok(texts, padding="max_length", max_length=16, truncation=True,
              return_tensors="np").input_ids
    assert enc.shape == (5, 16) and enc.max() < len(tok)
    assert tok.decode(tok("a zebra").input_ids, skip_special_tokens=True) == "a zebra"
    assert tok("A BIG RED STAR").input_ids == tok("a big red star").input_ids


def test_python_bpe_matches_transformers(tok):
    ranks = {p: i for i, p in enumerate(tk.learn_merges(tk.tokenizer_words(SPEC)))}
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdeilnorstu"), rng.integers(1, 9))) for _ in range(300)]
    words += ["squares", "circles", "redder", "bigger", "background"]
    for w in words:
        assert tk.bpe(w, ranks) == tok.convert_ids_to_tokens(
            tok(w, add_special_tokens=False).input_ids), w


def test_fast_alias_and_max_length_override(tok_dir, tok):
    from transformers import CLIPTokenizerFast
    fast = CLIPTokenizerFast.from_pretrained(tok_dir)
    cap = _longest_captions()[0]
    assert fast(cap).input_ids == tok(cap).input_ids
    assert tk.load_tokenizer(tok_dir, model_max_length=77).model_max_length == 77


def test_merges_for_words_sharing_pieces(tmp_path):
    words = ["square", "quality", "squares", "qua", "s", "ss", "sss"]
    vocab, merges = tk.build_vocab(words)
    ranks = {p: i for i, p in enumerate(merges)}
    assert all(tk.bpe(w, ranks) == [w + "</w>"] for w in words)
    with pytest.raises(ValueError):
        tk.tokenizer_words(SPEC, extra_words=["don't"])
