"""Colour-mixup conditioning: the embedded model's last two training commands.

    python train/colour_mixup.py --config configs/colour_mixup.py --workdir runs/shapes_v2_mixup_a
    python train/colour_mixup.py --config configs/colour_mixup.py:second \
        --workdir runs/shapes_v2_mixup_b
    python train/colour_mixup.py --config configs/colour_mixup.py:tiny --workdir /tmp/smoke \
        --config.init_from=embedded

The first fine-tunes text encoder + UNet of model v2's object-weighted stage
(``configs/shapes.py:v2_focus``'s export, ``runs/shapes_v2_focus/export``; the shipped
model was made from that command's shipped output, now ``candidates/shapes_v2_focus``:
``--config.init_from=candidates/shapes_v2_focus``) for 2500 steps with 30 % colour-mix
scenes; ``second`` continues from the first's export for 2500 steps with 50 % colour-mix
scenes, a new draw of 20 000 examples (seed 22), and exports in float16: that export is the
shipped ``jaxdiff/assets/shapes``. Both run data parallel over two XLA CPU devices
(``cpu_devices``; 12 min each on the idle 2-core machine). ``jaxdiff.training.colour_mixup``
says what a colour-mix scene is and how the loss conditions on it; ``tiny`` is a smoke run.
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 21                     # data draw, caption dropout / noise and batch order
    c.cpu_devices = 2               # >0: split the CPU into this many XLA devices
    c.init_from = "runs/shapes_v2_focus/export"  # pipeline to fine-tune, or "embedded"
    c.export_dir = ""               # "" = <workdir>/export
    c.export_dtype = "float32"      # float16 halves the file (loads as float32)

    c.world = "v2_brief"            # jaxdiff.data.shapes.WORLDS name of the ordinary scenes
    c.num_train = 20_000            # examples drawn once (ordinary + colour-mix)
    c.mix = 0.3                     # share of colour-mix scenes
    c.p_three = 0.3                 # a mix has 3 anchors with this probability, else 2
    c.spread = 15.0                 # shade ball around a mix (RGB units)

    c.steps = 2500
    c.batch_size = 64
    c.lr = 1e-4                     # AdamW, linear warm-up then cosine decay
    c.warmup = 100
    c.ema_decay = 0.999             # the export holds the EMA weights
    c.snr_gamma = 5.0               # Min-SNR loss weighting
    c.object_weight = 4.0           # a latent pixel's error x (1 + w x object coverage)
    c.caption_dropout = 0.1

    c.log_every = 100
    c.checkpoint_every = 500

    if variant == "second":
        c.init_from = "runs/shapes_v2_mixup_a/export"
        c.seed = 22
        c.mix = 0.5
        c.export_dtype = "float16"
    elif variant == "tiny":
        c.cpu_devices = 0
        c.num_train = 256
        c.steps = 2
        c.batch_size = 8
        c.warmup = 1
        c.log_every = 1
        c.checkpoint_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/colour_mixup.py "
                         "(use '', 'second' or 'tiny').")
    return c
