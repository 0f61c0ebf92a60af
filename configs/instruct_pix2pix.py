r"""InstructPix2Pix on the embedded model: instruction edits of the shapes world.

    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/instruct_pix2pix

The base pipeline (``model``, "" = the embedded model) gets a UNet whose ``conv_in``
takes the source image's latents as 4 more input channels, zero-initialised, so training
starts from the base model exactly; instruction and image are dropped (5 % each, 5 %
both) so that both guidance scales work when sampling. Training pairs
(``jaxdiff.data.instructions``: colour, shape, size, position and background edits from
templates such as "make the circle blue") come from the world's exact renderer
(``data.source="renderer"``), from the base model with Prompt-to-Prompt filtered by
the evaluator (``data.source="p2p"``, settings in ``p2p``), or both
(``"p2p+renderer"``: the generated pair where the filter keeps it, the renderer's where
it does not). The export
(``<workdir>/export``) is a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder
with an 8-channel UNet. ``tiny`` (``--config configs/instruct_pix2pix.py:tiny``) is a
smoke run. Re-running the same command resumes from the last checkpoint.

Training recipe: Min-SNR weighting (``train.snr_gamma=5``, as the base's diffusion stages)
and ``conv_in`` (whose new image channels start at zero) at 10x the learning rate
(``train.input_lr_multiplier``). Without them (the first run, stopped at step 1000) the
image slice of ``conv_in`` only reached RMS 0.0065 (Adam moves a weight by at most ~lr per
step and this slice's gradient is noisy) and the edits ignored the input (7-17 dB outside
the edit). No wiring bug was found: training and sampling both use the unscaled
posterior mean of the *source* image, concatenated after the noisy latents, as diffusers.

The shipped model (``jaxdiff/assets/shapes_instruct``, the default of
``edit/instruct.py``) is four runs of this config from model v2: its defaults, then
three times the previous run's model trained further (``model`` an InstructPix2Pix
pipeline: not widened again) on new pairs at half the learning rate, each exported in
float16:

    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/shapes_instruct_a --config.export_dtype=float16
    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/shapes_instruct_b --config.model=runs/shapes_instruct_a/export \
        --config.seed=1 --config.train.steps=12000 --config.train.lr=1.5e-4 \
        --config.export_dtype=float16
    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/shapes_instruct_c --config.model=runs/shapes_instruct_b/export \
        --config.seed=3 --config.train.steps=14000 --config.train.lr=1.5e-4 \
        --config.export_dtype=float16
    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/shapes_instruct_d --config.model=runs/shapes_instruct_c/export \
        --config.seed=4 --config.train.steps=14000 --config.train.lr=1.5e-4 \
        --config.export_dtype=float16

60 000 renderer pairs and 15 000 steps at batch 64 (1 h 41 min on 2 CPU cores), then
60 000 other pairs (seed 1) and 12 000 steps (1 h 6 min), then 60 000 others (seed 3) and
14 000 steps (1 h 27 min beside short side jobs), then 60 000 others (seed 4) and 14 000
steps (1 h 24 min in two parts: stopped after its step-6250 checkpoint by a session's end
and resumed from it; ~3 steps/s alone). At s_T 3, s_I 3 it edits colour / shape / size /
position / background right in 0.90 / 0.92 / 0.95 / 0.93 / 0.94 of 100 held-out triples
each (after the first run: 0.64 / 0.67 / 0.83 / 0.68 / 0.88, the second: 0.74 / 0.81 /
0.93 / 0.81 / 0.91, the third: 0.85 / 0.88 / 0.96 / 0.93 / 0.93; bench/README.md,
``bench/instruct_quality.py``). What got there: the training length at a useful
learning rate. 6000 steps (the cosine decays to lr / 10 at ``train.steps``) gave 0.47 /
0.46 / 0.56 / 0.21 / 0.30; 10x more distinct pairs, P2P-generated pairs
(``data.source="p2p+renderer"``), the object-weighted loss (``train.object_weight``) and
more two-object scenes (``data.p_two_objects``) each moved it by <= 0.05."""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                       # base pipeline ("" = the embedded model), or an
    #                                    InstructPix2Pix one to train further (renderer pairs)
    c.export_dir = ""                  # "" = <workdir>/export
    c.export_dtype = "float32"         # tensors of the export (the shipped one: float16)

    c.data = ml_collections.ConfigDict()
    c.data.source = "renderer"         # "renderer" (exact) | "p2p" (generated) | "p2p+renderer"
    c.data.world = "v1"                # jaxdiff.data.shapes.WORLDS name (the base's world)
    c.data.num_pairs = 60_000          # triples drawn (p2p: before the filter)
    c.data.p_two_objects = 0.5         # share of two-object source scenes (position edits:
    #                                    always one object); 0.5 = worlds v1 / v2's own mix

    # Generated pairs: DDIM steps, CFG scale, P2P injection, filter threshold (dB).
    c.p2p = ml_collections.ConfigDict(dict(steps=20, guidance=7.5, cross_replace_steps=0.8,
                                           self_replace_steps=0.4, min_psnr=25.0,
                                           batch_size=64))

    # snr_gamma: Min-SNR weighting (as the base's diffusion stages); input_lr_multiplier:
    # conv_in (the zero-initialised image channels) steps 10x faster (see the docstring);
    # object_weight > 0: each latent pixel's loss x (1 + object_weight x the share of it
    # covered by an object of either image), as model v2's configs/shapes.py:v2_focus.
    c.train = ml_collections.ConfigDict(dict(
        steps=15_000, batch_size=64, lr=3e-4, warmup=100, dropout=0.05,
        train_text_encoder=True, ema_decay=0.995, snr_gamma=5.0, input_lr_multiplier=10.0,
        object_weight=0.0))
    c.log_every = 50
    c.checkpoint_every = 250

    # The mesh is (data, fsdp) as in configs/shapes.py: fsdp=1 is pure data parallel.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1
    c.mesh.rules = (("^(step|rng)$", "replicate"), (".*", "fsdp"))
    c.mesh.fsdp_min_size = 2 ** 14

    if variant == "tiny":
        c.data.num_pairs = 16
        c.p2p.update(steps=2, batch_size=16)
        c.train.update(steps=2, batch_size=8, warmup=0)
        c.log_every = 1
        c.checkpoint_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/instruct_pix2pix.py "
                         "(use '' or 'tiny').")
    return c
