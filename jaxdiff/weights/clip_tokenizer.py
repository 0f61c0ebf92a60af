"""CLIP's tokenizer from the BPE merges shipped in ``jaxdiff/assets/clip_tokenizer``.

A single-file checkpoint holds no tokenizer; SD 1.x uses CLIP ViT-L/14's and SD 2.x
OpenCLIP's, which share one 49,408-token vocabulary built from CLIP's byte-pair merges
(bytes, bytes + ``</w>``, the merged pairs, ``<|startoftext|>``, ``<|endoftext|>``: CLIP's
``SimpleTokenizer``). They differ only in the padding token: ``<|endoftext|>`` (SD 1.x) or
``!`` (id 0, SD 2.x), as in the tokenizers diffusers' SD 1.5 / 2.1 repositories hold.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile

from transformers import CLIPTokenizer

MERGES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "clip_tokenizer",
                      "merges.txt.gz")
PAD_TOKENS = {"v1": "<|endoftext|>", "v2": "!"}
CLIP_VOCAB_SIZE = 49408


def _byte_alphabet():
    """GPT-2/CLIP's reversible byte -> unicode character table, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return printable, out


def vocabulary(merges) -> dict:
    """CLIP's token -> id table from its merges (``"a b"`` lines)."""
    printable, alphabet = _byte_alphabet()
    # CLIP orders the single characters as bytes_to_unicode's dict: printable bytes first.
    order = [chr(b) for b in printable] + [c for c in alphabet if ord(c) >= 256]
    vocab = order + [c + "</w>" for c in order] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def clip_tokenizer(model_type: str = "v1", max_length: int = 77) -> CLIPTokenizer:
    """The SD 1.x (``"v1"``) or SD 2.x (``"v2"``) CLIP tokenizer, built offline."""
    with gzip.open(MERGES, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [line for line in lines[1:] if line]
    with tempfile.TemporaryDirectory(prefix="jaxdiff-clip-tok-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocabulary(merges), f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
                       "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>", "pad_token": PAD_TOKENS[model_type],
                       "do_lower_case": True}, f)
        return CLIPTokenizer.from_pretrained(folder)
