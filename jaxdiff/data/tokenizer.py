"""Builds a small CLIP-format BPE tokenizer for the shapes world.

The output directory has exactly the files of a Stable Diffusion checkpoint's
``tokenizer/`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``) and loads with ``transformers.CLIPTokenizer.from_pretrained``.
It follows CLIP's conventions: byte-level symbols, a ``</w>`` suffix on a word's last
symbol, ``<|startoftext|>`` (BOS) and ``<|endoftext|>`` (EOS, and PAD as in SD 1.x) as
the last two ids. The alphabet is printable ASCII (each symbol with and without
``</w>``), so any ASCII word tokenizes (letter by letter at worst); other characters
become the unknown token ``<|endoftext|>``. Merges are built so that every word of the
world, ``EXTRA_WORDS`` and ``RARE_IDENTIFIERS`` is one token: 547 tokens by default.

``model_max_length`` defaults to 16: the longest world caption is 16 tokens with BOS/EOS
(see ``jaxdiff.data.shapes.grammar``), and a short context keeps the tiny text encoder cheap.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

from jaxdiff.data.shapes import WorldSpec

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
DEFAULT_MAX_LENGTH = 16
# Printable ASCII: CLIP's byte-to-unicode map leaves these characters as they are.
ALPHABET = tuple(chr(c) for c in range(33, 127))
# Common prompt words beyond the world's own: synonyms, other shapes/colours, negative-
# prompt words and DreamBooth class nouns. Never in training captions.
EXTRA_WORDS = (
    "the", "of", "in", "with", "to", "is", "this", "my", "very", "one", "two", "three",
    "photo", "picture", "image", "drawing", "painting", "render", "style", "art", "icon",
    "shape", "shapes", "object", "objects", "scene", "thing", "center", "middle", "corner",
    "large", "tiny", "huge", "medium", "next", "beside", "below", "under", "over", "near",
    "upper", "lower", "front", "behind", "grey", "pink", "brown", "magenta", "violet",
    "dark", "light", "bright", "colour", "color", "colored", "diamond", "heart", "hexagon",
    "oval", "rectangle", "ring", "dot", "line", "plus", "dog", "cat", "toy", "person",
    "blurry", "blur", "low", "high", "quality", "bad", "ugly", "noise", "noisy", "detailed",
    "simple", "flat", "plain", "empty", "pixel", "cartoon", "sharp")
# Rare identifiers for DreamBooth-style personalization ("a photo of sks star").
RARE_IDENTIFIERS = ("sks", "zwx", "ohwx", "qvx")


def tokenizer_words(spec: Optional[WorldSpec] = None,
                    extra_words: Sequence[str] = EXTRA_WORDS,
                    identifiers: Sequence[str] = RARE_IDENTIFIERS) -> tuple[str, ...]:
    """All whole-word tokens: the world's words first, then extras, then identifiers."""
    spec = WorldSpec() if spec is None else spec
    words = list(dict.fromkeys([*spec.words(), *extra_words, *identifiers]))
    bad = [w for w in words if not (w.isascii() and w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"words must be lower-case ASCII letters only, got {bad}")
    return tuple(words)


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + SUFFIX]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-token: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = _symbols(word)
    while len(pieces) > 1:
        rank, first, second = min((ranks.get(p, float("inf")),) + p
                                  for p in zip(pieces, pieces[1:]))
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges (rank order) under which every word is one token.

    For each word, BPE with the merges so far, then append left-to-right merges of the
    remaining pieces. Appended merges rank after all earlier ones, so words that are
    already single tokens stay so.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for word in words:
        if bpe(word, ranks) != [word + SUFFIX]:
            raise AssertionError(f"{word!r} is not a single token")  # cannot happen
    return merges


def build_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """-> (vocab token -> id, merges): alphabet, alphabet + </w>, merge results, BOS, EOS."""
    merges = learn_merges(words)
    tokens = list(ALPHABET) + [c + SUFFIX for c in ALPHABET] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(out_dir: str, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                    model_max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Writes the four tokenizer files in SD-checkpoint format; returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "add_prefix_space": False, "bos_token": {"__type": "AddedToken", **_special(BOS)},
        "clean_up_tokenization_spaces": False, "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS)}, "errors": "replace",
        "model_max_length": int(model_max_length), "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS)}}
    specials = {"bos_token": _special(BOS), "eos_token": _special(EOS), "pad_token": EOS,
                "unk_token": _special(EOS)}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return out_dir


def build_tokenizer(out_dir: str, spec: Optional[WorldSpec] = None,
                    extra_words: Sequence[str] = EXTRA_WORDS,
                    identifiers: Sequence[str] = RARE_IDENTIFIERS,
                    model_max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Builds the world's tokenizer into ``out_dir`` (created); returns ``out_dir``.

    Load it with ``load_tokenizer(out_dir)`` or ``CLIPTokenizer.from_pretrained(out_dir)``.
    """
    vocab, merges = build_vocab(tokenizer_words(spec, extra_words, identifiers))
    return write_tokenizer(out_dir, vocab, merges, model_max_length)


def load_tokenizer(path: str, model_max_length: Optional[int] = None):
    """``CLIPTokenizer.from_pretrained(path)``, optionally overriding model_max_length.

    (transformers 5 ignores vocab/merges file arguments to the constructor; loading
    from a directory is the reliable way.)
    """
    from transformers import CLIPTokenizer
    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    return CLIPTokenizer.from_pretrained(path, **kwargs)
