"""Noisy-latent classifier for classifier guidance (colour and shape of world-v2 scenes).

    python train/classifier.py --config configs/classifier.py --workdir runs/classifier

Trains ``jaxdiff.models.noisy_classifier.NoisyClassifier`` (a UNet encoder half + pooling
heads) on the latents of the pipeline's VAE (default: the embedded model), noised at random
timesteps of its schedule; writes ``<workdir>/export`` (``config.json``,
``model.safetensors``, ``metrics.json`` with held-out accuracy per timestep). The logic is
in ``jaxdiff.training.classifier``. The ``tiny`` variant (``configs/classifier.py:tiny``)
is smoke-sized. The shipped ``jaxdiff/assets/shapes_classifier`` is this config's export
(figures: bench/README.md, ``bench/classifier_guidance.py``).
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                   # diffusers-layout pipeline directory; "" = embedded model
    c.export_dir = ""              # "" = <workdir>/export

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""           # TFDS data_dir ("" = <workdir>/tfds); one-object scenes
    c.data.world = "v2"            # jaxdiff.data.shapes.WORLDS name
    c.data.image_size = 32         # must be the pipeline's image size
    c.data.num_train = 8000
    c.data.num_test = 500

    c.classifier = ml_collections.ConfigDict()
    c.classifier.block_out_channels = (32, 64)
    c.classifier.layers_per_block = 1
    c.classifier.norm_num_groups = 8

    c.steps = 3000
    c.batch_size = 64
    c.lr = 1e-3
    c.warmup = 100
    c.log_every = 50
    c.checkpoint_every = 500

    if variant == "tiny":
        c.data.num_train, c.data.num_test = 64, 16
        c.classifier.block_out_channels = (8, 8)
        c.classifier.norm_num_groups = 4
        c.steps, c.batch_size, c.warmup = 4, 8, 1
        c.log_every = c.checkpoint_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/classifier.py (use '' or "
                         "'tiny').")
    return c
