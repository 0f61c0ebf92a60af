"""ControlNet training on a frozen base pipeline: segmentation maps of the shapes world.

    python train/controlnet.py --config configs/controlnet.py --workdir runs/controlnet_seg

The ControlNet starts as a copy of the base UNet's encoder with its zero convolutions at
zero (diffusers' ``ControlNetModel.from_unet``), so the controlled model starts exactly as
the base model; only the ControlNet is trained (the base weights never change). The base
is the embedded model (``model=""``, 32x32 images, VAE factor 4) or any SD 1.x / 2.x
diffusers folder (``--config.model=DIR``; then set ``--config.data.image_size`` to its
image size). Conditions come from the TFDS shapes world (``condition``: "segmentation" or
"edges", written by the builder from the true masks, see ``jaxdiff.data.conditions``). The
export (``<workdir>/export``) is a diffusers ``ControlNetModel`` folder: ``jaxdiff
generate --controlnet <workdir>/export --control-image map.png``. ``tiny`` (``--config
configs/controlnet.py:tiny``): a smoke run (tests use it). Re-running the same command
resumes from the last checkpoint.

Training scenes have their objects moved up to 0.3 of the side off the five named
anchors (``data.jitter``; the captions still name the anchor), so the ControlNet learns to
put objects where the map says, not only at the anchors: trained on anchored scenes only,
it followed a map with the object elsewhere in 6 % of 200 held-out scenes (IoU >= 0.5),
with this default in 79.5 % (bench/README.md).

The shipped ControlNet (``jaxdiff/assets/shapes_controlnet_seg``, ``--controlnet shipped``)
is this default run (4000 steps, batch 32, lr 3e-4; 14 min on the 2 idle CPU cores)
written in float16: add ``--config.export_dir=jaxdiff/assets/shapes_controlnet_seg
--config.export_dtype=float16`` to the command above (a finished run does not train again:
it reads the data and exports). Measured by ``bench/control_quality.py`` (figures in
bench/README.md).
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                       # base pipeline ("" = the embedded model)
    c.export_dir = ""                  # "" = <workdir>/export
    c.export_dtype = "float32"         # tensors of the export (the shipped ones: float16)
    c.condition = "segmentation"       # "segmentation" or "edges"

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""               # TFDS data_dir ("" = <workdir>/tfds)
    c.data.world = "v2"                # jaxdiff.data.shapes.WORLDS name
    c.data.image_size = 32             # must be the base model's image size
    c.data.num_train = 20_000
    c.data.num_test = 1_000
    c.data.p_two_objects = 0.5
    c.data.jitter = 0.3                # max offset of an object from its named anchor

    c.controlnet = ml_collections.ConfigDict()
    # Widths of the condition embedding; () = diffusers' (16, 32, 96, 256) cut to the
    # base VAE's factor (log2(factor) + 1 entries: (16, 32, 96) for the embedded model).
    c.controlnet.conditioning_embedding_out_channels = ()

    c.train = ml_collections.ConfigDict(dict(steps=4000, batch_size=32, lr=3e-4, warmup=100,
                                             weight_decay=1e-2, caption_dropout=0.5))
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
        c.train = ml_collections.ConfigDict(dict(steps=2, batch_size=8, lr=1e-3, warmup=0,
                                                 weight_decay=1e-2, caption_dropout=0.5))
        c.log_every = 1
        c.checkpoint_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/controlnet.py "
                         "(use '' or 'tiny').")
    return c
