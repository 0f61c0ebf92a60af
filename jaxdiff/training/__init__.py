"""Training: losses, train state, optimizers, the jitted step and loop with Orbax
checkpoints, batching and cached latents; the algorithms (``text_to_image``,
``dreambooth``, ``textual_inversion``, ``lora``) take plain values, and ``recipes`` runs
them from the ``configs/`` files for ``train/*.py``."""
