"""Test and benchmark helpers, never used by the library.

- ``torchref.models``: tiny random PyTorch reference models and pipelines (diffusers /
  transformers) and the layout helpers to compare them with jaxdiff.
- ``torchref.p2p``: the reference inversion + Prompt-to-Prompt algorithm in PyTorch.
- ``torchref.imagic``: the reference Imagic and UniTune (three stages) in PyTorch.
- ``torchref.uvit``: a small PyTorch U-ViT (Bao et al.), the reference of models/uvit.py.
- ``torchref.scripts``: ``load_script`` for the repository's script folders.

PyTorch, diffusers and transformers models are imported lazily (they come with
``pip install -e '.[test]'``), so importing this package costs nothing without them.
"""
