"""Trains the embedded default model: a tiny SD-architecture pipeline on the shapes world.

The shipped model (``jaxdiff/assets/shapes``, model v2) is nine commands: model v1's two
(kept as ``candidates/shapes_v1``), then model v2's four here on top of v1's export, then
the two colour-mixup commands of ``configs/colour_mixup.py`` (``train/colour_mixup.py``),
then ``v2_sharp`` here (the VAE decoder fine-tuned on for longer, below).

    python train/text_to_image.py --config configs/shapes.py --workdir runs/shapes
    python train/text_to_image.py --config configs/shapes.py:finetune --workdir runs/shapes_ft \
        --config.init_from=runs/shapes/export
    python train/text_to_image.py --config configs/shapes.py:tiny --workdir /tmp/smoke

The first (no variant) trains the autoencoder and the text encoder + U-Net from scratch on
world v1; ``finetune`` continues the diffusion stage of an existing pipeline
(``init_from``). The ``tiny`` variant shrinks everything for a smoke run (tests use it).

``dit_v2`` trains the embedded text-DiT model (``embedded:dit``, ``jaxdiff/assets/shapes_dit``):
a PixArt-style transformer of dit-L's size from scratch on the frozen VAE and text encoder
of ``candidates/shapes_v2_focus`` (model v2 before its colour-mixup stage), 20 000 steps on
world "v2_brief" (bench/README.md, "The shipped text DiT"):

    python train/text_to_image.py --config configs/shapes.py:dit_v2 --workdir runs/shapes_dit_v2

``dit`` is the first one (shipped until 2026-12-04): the dit-L run of
bench/backbones_study.py, 450 steps on model v1's VAE and text encoder
(``--config configs/shapes.py:dit --workdir runs/shapes_dit``).

Model v2's first four commands, on model v1's export. ``v2_vae`` fine-tunes only
v1's VAE decoder on world v2 (``jaxdiff.data.shapes.WORLD_V2``; encoder, latent space,
text encoder and UNet kept), then ``v2_grown`` grows its U-Net one layer deeper per block
and trains text encoder + U-Net on world ``v2_terse``, ``v2_brief`` trains that on a fresh
draw of world ``v2_brief`` (terser captions) at half the learning rate, on two XLA CPU
devices, and ``v2_focus`` trains that for 2500 more steps with the object-weighted loss
(``diffusion.object_weight``; README, bench/README.md):

    python train/text_to_image.py --config configs/shapes.py:v2_vae --workdir runs/shapes_v2_vae
    python train/text_to_image.py --config configs/shapes.py:v2_grown \
        --workdir runs/shapes_v2_grown
    python train/text_to_image.py --config configs/shapes.py:v2_brief \
        --workdir runs/shapes_v2_brief
    python train/text_to_image.py --config configs/shapes.py:v2_focus \
        --workdir runs/shapes_v2_focus

``v2_vae`` starts from ``runs/shapes_ft/export`` (the v1 commands' output); the shipped
model was made from the shipped v1 weights, ``--config.init_from=candidates/shapes_v1``.
(``candidates/shapes_v2_brief`` is the third command's export, ``candidates/shapes_v2_focus``
the fourth's, the input of ``configs/colour_mixup.py``.)
The last command, after the colour-mixup ones:

    python train/text_to_image.py --config configs/shapes.py:v2_sharp \
        --workdir runs/shapes_v2_sharp

``v2_sharp`` starts from ``runs/shapes_v2_mixup_b/export`` (the second colour-mixup
command's float16 export); the shipped model was made from the shipped one,
``--config.init_from=jaxdiff/assets/shapes`` as it was at commit ``2628910``, before this
command's decoder replaced its own (the other files are unchanged, byte for byte).
``v2_grown2`` is the previous third command (``v2_terse``, 5500 steps, one device). The
variants ``v2``, ``v2_stage2``, ``v2_decoder``, ``v2_stage3``, ``v2_zsnr``, ``v2_deep``
and ``v2_deep2`` are an earlier, longer chain (each starts from the previous one's
``runs/`` export, the first from ``candidates/shapes_v1``; bench/README.md has their
figures).
"""
import ml_collections

# Sample-grid prompts of the model v2 stages: colour-free, shape-free and full captions.
V2_SAMPLE_PROMPTS = ("a small red circle on the left", "a square on a white background",
                     "a red object", "a big star at the top on a gray background",
                     "a blue triangle above a green cross", "an object on the right")


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.cpu_devices = 0                    # >0: split the CPU into this many XLA devices
    c.stages = "autoencoder,diffusion"   # comma-separated: autoencoder, decoder, diffusion
    c.export_dir = ""                    # diffusers-layout output ("" = <workdir>/export)
    c.init_from = ""                     # "" = random init; a pipeline dir or "embedded"
    c.export_dtype = "float32"           # the export's tensors (float16 halves the file)
    # With init_from: scheduler fields to change, e.g. dict(prediction_type="v_prediction",
    # rescale_betas_zero_snr=True, timestep_spacing="trailing") ({} keeps the loaded one).
    c.scheduler_update = {}

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""                 # TFDS data_dir ("" = <workdir>/tfds)
    c.data.image_size = 32
    c.data.num_train = 20_000
    c.data.num_test = 1_000
    c.data.p_two_objects = 0.5
    c.data.world = "v1"                  # jaxdiff.data.shapes.WORLDS name: v1, v2, v2_terse

    c.model = ml_collections.ConfigDict()
    c.model.tokenizer_max_length = 16
    c.model.text_encoder = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16,
                                hidden_act="quick_gelu")
    # Sized for 2 CPU cores and a <= 10 MB checkpoint: f=4 VAE (32x32 -> 8x8x4 latents,
    # 0.24 M params), 1.1 M-param UNet, 0.1 M-param text encoder.
    c.model.vae = dict(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1,
                       down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                       norm_num_groups=8)
    # The denoiser: "" keeps the init_from pipeline's (or builds the U-Net below from
    # scratch); "unet" | "dit" builds that one (with init_from: a fresh denoiser on the
    # loaded VAE and text encoder). "dit": a PixArt-style text DiT (PixArtTransformer2DModel,
    # widths and depth below; sizes, channels and text width follow the VAE and text
    # encoder). bench/backbones_study.py also trains "uvit" (no export format).
    c.model.backbone = ""
    # With init_from: grow the loaded U-Net one layer deeper per block, computing what it
    # did (jaxdiff.training.grow), before fine-tuning.
    c.model.deepen = False
    c.model.dit = dict(num_attention_heads=6, attention_head_dim=16, num_layers=6,
                       patch_size=2)
    # A fresh text DiT's cross-attention reads the prompt's tokens only (PixArt's caption
    # mask, as diffusers' PixArtAlphaPipeline) or, False, every token ("_caption_mask":
    # false in model_index.json; what Imagic / UniTune and null-text inversion need).
    c.model.caption_mask = True
    # A fresh transformer's initialisation: "flax" (the modules' defaults) or "reference"
    # (its paper's code: PixArt-α's for "dit", zero output and cross-attention projections;
    # at 4000 steps it took dit-L from 0.00 to 0.105 one-object accuracy, bench/README.md
    # "The second study").
    c.model.init = "flax"
    c.model.uvit = dict(embed_dim=112, depth=7, num_heads=7, patch_size=2)
    c.model.unet = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    c.model.scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon",
                             timestep_spacing="leading", steps_offset=1,
                             set_alpha_to_one=False, clip_sample=False)

    c.autoencoder = ml_collections.ConfigDict(dict(
        steps=4000, batch_size=32, lr=1e-3, warmup=100, kl_weight=1e-6))
    # Decoder-only fine-tuning (stage "decoder"): encoder and latent space kept.
    # object_weight > 0: each pixel's loss weighted by 1 + object_weight * its ground-truth
    # object coverage (text_to_image.train_decoder).
    c.decoder = ml_collections.ConfigDict(dict(steps=400, batch_size=16, lr=1e-3, warmup=50,
                                               object_weight=0.0))
    # object_weight > 0: each latent pixel's loss weighted by 1 + object_weight * its
    # ground-truth object coverage (text_to_image.train_diffusion); 0 in every variant.
    c.diffusion = ml_collections.ConfigDict(dict(
        steps=6000, batch_size=64, lr=5e-4, warmup=300, caption_dropout=0.1,
        ema_decay=0.999, train_text_encoder=True, snr_gamma=0.0, object_weight=0.0))
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = 2000               # 0 disables periodic sample grids
    c.sample_prompts = ("a small red circle on the left", "a big blue square",
                        "a green triangle at the top", "a yellow star on a black background")

    # Training at scale (README "Training at scale"). The mesh is (data, fsdp): each group
    # of `fsdp` devices holds one FSDP-sharded copy of the train state, sharded by `rules`
    # ((regex on the state path, "fsdp" | "replicate"), first match wins; leaves under
    # `fsdp_min_size` elements stay replicated). See jaxdiff.parallel.tree_shardings.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1                      # 1 = pure data parallel
    c.mesh.rules = (("^(step|rng)$", "replicate"), (".*", "fsdp"))
    c.mesh.fsdp_min_size = 2 ** 14
    c.autoencoder.accum_steps = 1        # micro-batches per step (batch_size is the total)
    c.decoder.accum_steps = 1
    c.diffusion.accum_steps = 1
    c.diffusion.remat = False            # rematerialise UNet blocks (less memory)
    c.diffusion.dtype = "float32"        # UNet compute dtype: float32 | bfloat16

    if variant == "finetune":
        # Second stage of model v1: continue the diffusion stage of the first command's
        # export (fresh optimizer, Min-SNR-5 weighting), keeping its VAE and tokenizer.
        c.init_from = "runs/shapes/export"   # the first command's output
        c.stages = "diffusion"
        c.diffusion.update(steps=8000, lr=3e-4, warmup=100, snr_gamma=5.0)
    elif variant == "dit":
        # The embedded text DiT: bench/backbones_study.py's dit-L run (its settings: 10 000
        # world-v1 scenes, 450 steps at batch 64, EMA 0.99, frozen text encoder), on model
        # v1's VAE and text encoder.
        c.init_from = "candidates/shapes_v1"
        c.stages = "diffusion"
        c.model.backbone = "dit"
        c.data.num_train = 10_000
        c.diffusion.update(steps=450, lr=5e-4, warmup=100, ema_decay=0.99,
                           train_text_encoder=False)
        c.checkpoint_every = 150
        c.sample_every = 150
    elif variant == "dit_v2":
        # The embedded text DiT on model v2 (``embedded:dit`` since 2026-12-04): a fresh
        # PixArt-style transformer of dit-L's size on the frozen VAE and text encoder of
        # model v2 before its colour-mixup stage (the embedded default then), trained on 40 000 scenes of world "v2_brief" (the shipped U-Net's
        # last worlds) for 20 000 steps at batch 64 (Min-SNR-5, EMA 0.999), data parallel
        # over two XLA CPU devices.
        _v2_diffusion(c, "candidates/shapes_v2_focus", seed=20, world="v2_brief", steps=20_000,
                      lr=5e-4)
        c.model.backbone = "dit"
        c.model.caption_mask = False   # as the first embedded:dit (README "caption mask")
        c.data.num_train = 40_000
        c.diffusion.update(warmup=300, train_text_encoder=False)
        c.cpu_devices = 2
        c.checkpoint_every = 1000
        c.sample_every = 0
    elif variant == "v2":
        # An early model v2: model v1's diffusion stage fine-tuned on world v2 (colour
        # and shape mention dropout, shades, unnamed colours, anti-aliased edges), keeping
        # its VAE and tokenizer ("object" is already a token) as `finetune` does.
        _v2_diffusion(c, "candidates/shapes_v1", seed=0, world="v2", steps=6000, lr=3e-4)
    elif variant == "v2_stage2":
        # Model v2, second command: continues `v2`'s export for 6000 more diffusion steps at a
        # lower peak learning rate on a fresh draw of world v2 (seed 1: 20 000 new images,
        # new noise), so the two stages together see 40 000 distinct images.
        _v2_diffusion(c, "runs/shapes_v2/export", seed=1, world="v2", steps=6000, lr=2e-4)
    elif variant == "v2_decoder":
        # Model v2, third command: only the VAE decoder fine-tuned on world v2 (shades,
        # anti-aliased edges); the encoder, the latent space and the UNet are kept.
        _v2_decoder(c, "runs/shapes_v2_stage2/export")
    elif variant == "v2_stage3":
        # Model v2, fourth command: the diffusion stage continued from `v2_decoder`'s export
        # on a fresh draw (seed 2) of world "v2_terse" (colour word dropped for half of the
        # objects), so that colour-free prompts are learned; VAE and tokenizer kept.
        _v2_diffusion(c, "runs/shapes_v2_decoder/export", seed=2, world="v2_terse",
                      steps=4000, lr=2e-4)
    elif variant == "v2_zsnr":
        # A tried fifth step (negative result, not part of model v2): `v2_stage3`'s export
        # moved to v-prediction with zero terminal SNR and trailing timesteps (Lin et al.
        # 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), testing
        # whether SD's schedule (its noisiest step still leaks 7 % of the image) kept the
        # model from deciding an unnamed colour from pure noise. It did not: colour-free
        # prompts 0.775 (v2_stage3: 0.835), two-object 0.925 (0.895); bench/README.md.
        _v2_diffusion(c, "runs/shapes_v2_stage3/export", seed=3, world="v2_terse",
                      steps=3000, lr=2e-4)
        c.scheduler_update = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing")
    elif variant == "v2_deep":
        # Model v2, fifth command: `v2_stage3`'s U-Net grown one layer deeper per block
        # (1.08 M -> 1.58 M params, same function at the start) and fine-tuned on a fresh
        # draw (seed 4) of world "v2_terse": more capacity for colour-free prompts.
        _v2_diffusion(c, "runs/shapes_v2_stage3/export", seed=4, world="v2_terse",
                      steps=2500, lr=2e-4)
        c.model.deepen = True
    elif variant == "v2_deep2":
        # Model v2, sixth command: continues `v2_deep`'s export on a fresh draw (seed 5) of
        # "v2_terse" at a lower peak learning rate.
        _v2_diffusion(c, "runs/shapes_v2_deep/export", seed=5, world="v2_terse",
                      steps=3000, lr=1.5e-4)
    elif variant == "v2_vae":
        # Model v2 (compact chain), first command: only model v1's VAE decoder fine-tuned
        # on world v2 (shades, anti-aliased edges); encoder, latent space, text encoder and
        # U-Net kept. The shipped v2 started from the shipped v1 (candidates/shapes_v1).
        _v2_decoder(c, "runs/shapes_ft/export")
    elif variant == "v2_grown":
        # Model v2 (compact chain), second command: `v2_vae`'s U-Net (model v1's) grown
        # one layer deeper per block (jaxdiff.training.grow: same function at the start,
        # 1.08 M -> 1.58 M params), then text encoder + U-Net trained on 40 000 scenes of
        # world "v2_terse" (colour word dropped for half of the objects, shape for a fifth),
        # data parallel over two XLA CPU devices as the later commands.
        _v2_diffusion(c, "runs/shapes_v2_vae/export", seed=10, world="v2_terse",
                      steps=9000, lr=3e-4)
        c.data.num_train = 40_000
        c.model.deepen = True
        c.cpu_devices = 2
    elif variant == "v2_grown2":
        # Model v2 (compact chain), the previous third command (candidate until v2_brief):
        # `v2_grown`'s export trained on for 5500 more steps on a fresh draw (seed 11) of
        # 40 000 "v2_terse" scenes, at half the peak learning rate (new warm-up + cosine).
        _v2_diffusion(c, "runs/shapes_v2_grown/export", seed=11, world="v2_terse",
                      steps=5500, lr=1.5e-4)
        c.data.num_train = 40_000
    elif variant == "v2_brief":
        # Model v2 (compact chain), third command: `v2_grown`'s export trained
        # on a fresh draw (seed 12) of 40 000 scenes of world "v2_brief" (v2_terse with size
        # and position said for half of the captions, so prompts as terse as "a square on a
        # white background" are ~6x more frequent), at half the peak learning rate, data
        # parallel over two XLA CPU devices (~1.2x the steps/s of one device on 2 cores).
        _v2_diffusion(c, "runs/shapes_v2_grown/export", seed=12, world="v2_brief",
                      steps=9000, lr=1.5e-4)
        c.data.num_train = 40_000
        c.cpu_devices = 2
    elif variant == "v2_focus":
        # Model v2 (compact chain), fourth command: `v2_brief`'s export trained on for 2500
        # steps (lr 1e-4) on a fresh draw (seed 13) of 20 000 "v2_brief" scenes with the
        # object-weighted loss (each latent pixel's error x (1 + 4 x object coverage), from
        # the ground-truth masks): the object is ~10 % of the latent, and the colour-free
        # prompts' failures were dropped objects. Two XLA CPU devices, no sample grids.
        _v2_diffusion(c, "runs/shapes_v2_brief/export", seed=13, world="v2_brief",
                      steps=2500, lr=1e-4)
        c.data.num_train = 20_000
        c.diffusion.object_weight = 4.0
        c.cpu_devices = 2
        c.sample_every = 0
    elif variant == "v2_sharp":
        # Model v2, last command: only the colour-mixup export's VAE decoder fine-tuned
        # on for 2000 steps at batch 32 on a fresh draw (seed 14) of world v2 (`v2_vae`
        # gave it 400 at batch 16): thin dark shapes (crosses) decoded in their colour, not
        # lighter, and 34.2 dB instead of 32.6. Encoder, latent space, text encoder and
        # U-Net kept; exported in float16. The object-weighted loss
        # (`--config.decoder.object_weight=3`) decodes dark colours 3-5 RGB units closer
        # but reads two-object generations' shapes worse (0.91 vs 0.94 at g5), so the
        # plain loss (bench/README.md, "The decoder command").
        _v2_decoder(c, "runs/shapes_v2_mixup_b/export")
        c.seed = 14
        c.decoder.update(steps=2000, batch_size=32, lr=5e-4, warmup=100)
        c.export_dtype = "float16"
    elif variant == "tiny":
        c.data.num_train, c.data.num_test = 64, 16
        c.model.text_encoder.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2)
        c.model.vae.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
        c.model.unet.update(block_out_channels=(16, 16), cross_attention_dim=16,
                            attention_head_dim=2, norm_num_groups=4)
        c.autoencoder.update(steps=4, batch_size=8, warmup=1)
        c.decoder.update(steps=2, batch_size=8, warmup=1)
        c.diffusion.update(steps=4, batch_size=8, warmup=1)
        c.log_every = c.checkpoint_every = 2
        c.sample_every = 4
        c.sample_prompts = ("a red circle",)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/shapes.py "
                         "(use '', 'finetune', 'dit', 'dit_v2', 'v2', 'v2_stage2', 'v2_decoder', "
                         "'v2_stage3', 'v2_zsnr', 'v2_deep', 'v2_deep2', 'v2_vae', 'v2_grown', "
                         "'v2_grown2', 'v2_brief', 'v2_focus', 'v2_sharp' or 'tiny').")
    return c


def _v2_decoder(c, init_from: str):
    """A model-v2 decoder stage: only ``init_from``'s VAE decoder fine-tuned on world v2."""
    c.init_from, c.stages = init_from, "decoder"
    c.data.world = "v2"


def _v2_diffusion(c, init_from: str, *, seed: int, world: str, steps: int, lr: float):
    """A model-v2 diffusion stage: ``init_from``'s diffusion stage fine-tuned on a draw
    (``seed``) of ``world`` (Min-SNR-5, 100 warm-up steps), VAE and tokenizer kept."""
    c.init_from, c.stages, c.seed = init_from, "diffusion", seed
    c.data.world = world
    c.diffusion.update(steps=steps, lr=lr, warmup=100, snr_gamma=5.0)
    c.sample_prompts = V2_SAMPLE_PROMPTS
