"""GLIGEN training on a frozen base pipeline: boxes + phrases of the shapes world.

    python train/gligen.py --config configs/gligen.py --workdir runs/gligen

The base UNet becomes diffusers' text-box GLIGEN UNet (``attention_type="gated"``): a
position net that embeds each object's box and phrase, and a gated self-attention fuser in
every transformer block whose contribution starts at zero (closed gates, or an open
attention gate in front of a zeroed output projection), so the GLIGEN model starts exactly
as the base model; only these layers are trained (the base weights never change). The base
(``init_from``) is "embedded" (the embedded model, 32x32 images) or any SD 1.x / 2.x
diffusers folder (then set ``--config.data.image_size`` to its image size). Grounding
comes from the TFDS shapes world (builder 1.3.0, written from the ground truth, see
``jaxdiff.data.grounding``): per object its noun phrase as the caption says it ("big blue
square") and the tight box of its mask; phrases are embedded as diffusers'
``StableDiffusionGLIGENPipeline`` does (pooled text-encoder output), in ``gligen.max_objs``
slots (30, the pipeline's). Dropout as diffusers' GLIGEN training example: all boxes of an
image with probability ``train.grounding_dropout`` (0.1), the caption with
``train.caption_dropout`` (0.5). The export (``<workdir>/export``) is a diffusers GLIGEN
pipeline folder: ``jaxdiff generate --gligen <workdir>/export --box
"0.1,0.1,0.5,0.5:red circle" --prompt "a red circle"``. ``tiny`` (``--config
configs/gligen.py:tiny``): a smoke run (tests use it; 4 slots). Re-running the same command
resumes from the last checkpoint.

The training scenes have their objects moved up to 0.3 of the side from the five named
anchors (``data.jitter``), so boxes cover the whole image. Training timesteps come from
[500, 1000) only (``train.min_timestep``): the noisy steps where only the box says where
the object goes, which a scheduled-sampling beta <= 0.5 grounds at sampling. The fusers
start with their attention gate open (``gligen.attn_gate_init``, see below): with
diffusers' closed gates a run did not read the boxes in 2550 steps (bench/README.md).
The default run (6000 steps, ~28 min on 2 CPU cores) is the shipped layers
(``jaxdiff/assets/shapes_gligen``, ``--gligen shipped``; sample them with
``--gligen-beta`` 0.5-0.7: at 0.6 an object lands in a box no caption names 93.5 % of the
time); ``--config.export_dir=jaxdiff/assets/shapes_gligen
--config.export_layers=True --config.export_dtype=float16`` on the finished run writes them
(position net + fusers only).
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = "embedded"           # base pipeline: "embedded" or a diffusers folder
    c.export_dir = ""                  # "" = <workdir>/export
    c.export_dtype = "float32"         # tensors of the export (the shipped ones: float16)
    c.export_layers = False            # True: a GLIGEN layers folder, not a pipeline

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""               # TFDS data_dir ("" = <workdir>/tfds)
    c.data.world = "v2"                # jaxdiff.data.shapes.WORLDS name
    c.data.image_size = 32             # must be the base model's image size
    c.data.num_train = 20_000
    c.data.num_test = 1_000
    c.data.p_two_objects = 0.5
    # Objects moved up to 0.3 of the side from their five named anchors (captions still
    # name the anchor), so the boxes cover the image and not five points only: GLIGEN
    # must place objects where no caption can say (corners, off-grid; bench/README.md).
    c.data.jitter = 0.3

    c.gligen = ml_collections.ConfigDict()
    c.gligen.max_objs = 30             # object slots per image (diffusers' pipeline: 30)
    # Fusers start with their attention gate open (alpha 1, tanh 0.76) and the attention's
    # output projection at zero (still exactly the base model); 0 = diffusers' init
    # (gates closed), which did not learn the boxes in 2550 steps (bench/README.md).
    c.gligen.attn_gate_init = 1.0

    c.train = ml_collections.ConfigDict(dict(steps=6000, batch_size=32, lr=1e-3, warmup=100,
                                             weight_decay=1e-2, caption_dropout=0.5,
                                             grounding_dropout=0.1, min_timestep=500))
    c.log_every = 50
    c.checkpoint_every = 500

    # The mesh is (data, fsdp) as in configs/shapes.py: fsdp=1 is pure data parallel.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1
    c.mesh.rules = (("^(step|rng)$", "replicate"), (".*", "fsdp"))
    c.mesh.fsdp_min_size = 2 ** 14

    if variant == "tiny":
        c.data.num_train = 16
        c.data.num_test = 4
        c.gligen.max_objs = 4
        c.train.update(steps=2, batch_size=8, lr=1e-3, warmup=0)
        c.log_every = 1
        c.checkpoint_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/gligen.py "
                         "(use '' or 'tiny').")
    return c
