"""Textual Inversion: learn new token embedding(s) for a concept.

    python train/textual_inversion.py --config configs/textual_inversion.py \
        --workdir runs/ti_shape --config.instance_dir=my_concept/ \
        --config.placeholder_token="<new-shape>" --config.initializer_token=circle
    python train/textual_inversion.py --config configs/textual_inversion.py:tiny \
        --workdir /tmp/smoke --config.instance_dir=my_concept/

Writes ``<workdir>/export/learned_embeds.safetensors`` (diffusers'
``load_textual_inversion`` reads it). Defaults suit the embedded shapes model; for Stable
Diffusion use ``--config.model=/path/to/sd15 --config.lr=5e-3 --config.steps=3000
--config.templates='("a photo of a {}", "a rendering of a {}")'`` (tuple fields take a
Python tuple, quoted for the shell).
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                    # diffusers-layout pipeline directory; "" = embedded model
    c.export_dir = ""               # "" = <workdir>/export

    c.instance_dir = ""             # folder of concept images (required)
    c.fit = "crop"                  # mixed sizes: crop | resize | reject
    c.mask_dir = ""                 # masks, one per instance image (same name, white = subject)
    c.mask_weight = 0.0             # >0: masked loss, a pixel's error x (1 + w x mask coverage)
    c.placeholder_token = "<new-shape>"
    c.initializer_token = "circle"
    c.num_vectors = 1
    c.templates = ("a {}",)         # prompt templates, "{}" = the placeholder

    c.steps = 500
    c.batch_size = 4
    c.lr = 5e-3
    c.warmup = 0
    c.ema_decay = 0.0               # > 0: export the EMA of the learned rows (0 = last step)
    c.train_guidance = 1.0          # > 1: fit the CFG-guided prediction at this scale
                                    # (make_ti_loss; 1 = the paper's conditional loss)

    c.log_every = 10
    c.checkpoint_every = 100
    c.sample_every = 100            # 0 disables sample grids

    if variant == "tiny":
        c.steps = 2
        c.batch_size = 2
        c.log_every = 1
        c.checkpoint_every = 2
        c.sample_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/textual_inversion.py "
                         "(use '' or 'tiny').")
    return c
