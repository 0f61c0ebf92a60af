"""Adapters: pieces trained apart from a pipeline's weights and applied to it functionally.

``lora``: low-rank adapters on Dense layers and their diffusers/peft safetensors files;
``kohya``: kohya-ss / A1111 LoRA files (``lora_unet_*``, ``lora_te_*``, LoCon convolutions);
``textual_inversion``: new placeholder tokens, their embedding rows and
``learned_embeds.safetensors``; ``apply``: both applied to a loaded ``(pipe, params)``.
Training them is in ``jaxdiff.training``; ``jaxdiff generate --lora/--textual-inversion``
applies them.
"""
from jaxdiff.adapters.apply import apply_adapters

__all__ = ["apply_adapters"]
