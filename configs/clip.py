"""Trains the shapes CLIP: a small ViT and text tower, contrastively, on world v2.

    python train/clip.py --config configs/clip.py --workdir runs/clip_shapes

``tiny`` shrinks everything for a smoke run (tests use it). ``noisy`` trains the
noise-aware variant by the same recipe: its inputs are the embedded model's VAE latents
(8x8x4, patch 1), noised at a uniform random timestep of the embedded model's schedule, with
the timestep added to the class token (guidance on x_t):

    python train/clip.py --config configs/clip.py:noisy --workdir runs/clip_shapes_noisy \
        --config.train.steps=2500

(16 min of training at 2.6 steps/s plus ~2 min of data and encoding on the 2 idle cores;
``bench/clip_quality.py --clip runs/clip_shapes_noisy/export`` scores it per noise level:
colour 0.91 / shape 0.24 at t = 0, so it is not shipped; bench/README.md.)

``init_from`` starts from an exported CLIP folder of the same config instead of a random
init (a checkpoint in the workdir still wins on resume). ``more`` uses it to continue the
shipped weights (``jaxdiff/assets/clip_shapes``): a fresh draw of 20k training scenes
(seed 1), 50 warm-up steps, then a cosine from 8e-4 to 8e-5 over ``train.steps``, a
checkpoint every 200 steps.

The shipped ``jaxdiff/assets/clip_shapes/`` (transformers ``CLIPModel`` layout) is the
export of the fourth of these commands (2220 steps in all):

    python train/clip.py --config configs/clip.py --workdir runs/clip_shapes
    python train/clip.py --config configs/clip.py --workdir runs/clip_shapes \
        --config.train.steps=1600
    python train/clip.py --config configs/clip.py:more --workdir runs/clip_shapes_more \
        --config.init_from=runs/clip_shapes/export --config.train.steps=320 \
        --config.train.warmup=30
    python train/clip.py --config configs/clip.py:more --workdir runs/clip_shapes_more2 \
        --config.init_from=runs/clip_shapes_more/export \
        --config.data.data_dir=runs/clip_shapes_more/tfds --config.train.steps=300 \
        --config.train.warmup=20 --config.train.lr=5e-4 --config.checkpoint_every=100

(1000 steps from a random init; the second resumes from the step-1000 checkpoint with a
cosine over 1600 steps: 600 more; the third continues that export for 320 steps on fresh
scenes, the fourth that export for 300 more on the same scenes at a peak lr of 5e-4.)

Images are 32x32 world-v2 scenes (``jaxdiff.data.shapes.WORLD_V2``) read from the TFDS
builder; the text tower uses the embedded model's tokenizer (16 tokens). 0.25 M parameters
(1.0 MB): a 4-layer ViT of width 64 (patch 4) and a 2-layer text tower of width 64 at batch
128. Wall time on 2 shared CPU cores: 6 min of data preparation and 46 min (``nice -n 15``,
load 10-13), 38 min (``nice -n 5``, load 25-38), 16 min of data preparation and 19 min
(``nice -n 15``, 0.15-0.29 steps/s, load 8-13), 4 min (``nice -n 15``, 1.3 steps/s,
load 2-4). Figures (``bench/clip_quality.py``, bench/README.md) on 500
held-out one-object scenes: zero-shot colour 100%, shape 97.0% (88.2% after 1600 steps,
93.8% after 1920).
"""
import os

import ml_collections

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "jaxdiff",
                       "assets", "clip_shapes")


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.export_dir = ""                  # "" = <workdir>/export
    c.noisy = False                    # noise-aware CLIP on noised VAE latents (see above)
    c.init_from = ""                   # exported CLIP folder to start from ("" = random init)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""               # TFDS data_dir ("" = <workdir>/tfds)
    c.data.world = "v2"                # jaxdiff.data.shapes.WORLDS name
    c.data.image_size = 32
    c.data.num_train = 20_000
    c.data.num_test = 1_000
    c.data.p_two_objects = 0.5

    c.model = ml_collections.ConfigDict()
    c.model.projection_dim = 64
    c.model.text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, hidden_act="quick_gelu")
    c.model.vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, image_size=32, patch_size=4, num_channels=3,
                          hidden_act="quick_gelu")

    c.train = ml_collections.ConfigDict(dict(steps=1000, batch_size=128, lr=2e-3, warmup=100,
                                             weight_decay=0.1))
    c.log_every = 50
    c.checkpoint_every = 500

    if variant == "tiny":
        c.data.num_train = 64
        c.data.num_test = 16
        c.model.text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, hidden_act="quick_gelu")
        c.model.vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              num_channels=3, hidden_act="quick_gelu")
        c.model.projection_dim = 16
        c.train = ml_collections.ConfigDict(dict(steps=2, batch_size=16, lr=1e-3, warmup=0,
                                                 weight_decay=0.1))
        c.log_every = 1
        c.checkpoint_every = 2
    elif variant == "noisy":
        c.noisy = True
        c.model.vision = dict(c.model.vision, patch_size=1)   # 8x8 latents: 64 patches
    elif variant == "more":
        # More steps from the shipped weights, on a fresh draw of 20k training scenes
        # (seed 1), warm-up then cosine from 8e-4 (the lr where the 1000 -> 1600 resume began).
        c.seed = 1
        c.init_from = os.path.normpath(SHIPPED)
        c.train = ml_collections.ConfigDict(dict(steps=1000, batch_size=128, lr=8e-4,
                                                 warmup=50, weight_decay=0.1))
        c.checkpoint_every = 200
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/clip.py "
                         "(use '', 'tiny', 'noisy' or 'more').")
    return c
