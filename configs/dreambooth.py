"""DreamBooth (with prior preservation), full fine-tuning or LoRA.

    python train/dreambooth.py --config configs/dreambooth.py --workdir runs/db \
        --config.instance_dir=my_subject/ --config.instance_prompt="a sks circle" \
        --config.class_prompt="a circle"
    python train/dreambooth.py --config configs/dreambooth.py:lora --workdir runs/db_lora \
        --config.instance_dir=my_subject/
    python train/dreambooth.py --config configs/dreambooth.py:tiny --workdir /tmp/smoke \
        --config.instance_dir=my_subject/

Defaults suit the embedded shapes model v2 (``model=""``; measured on a subject it cannot
draw, bench/README.md "DreamBooth defaults"): full fine-tuning trains the text encoder
too, 400 steps at lr 3e-4; ``lora`` trains rank-4 adapters on the UNet and the text
encoder's attention, 800 steps at lr 2e-3.
For Stable Diffusion use diffusers' DreamBooth example settings (``--config.model=/path/to/sd15
--config.lr=5e-6 --config.steps=800 --config.num_class_images=200
--config.train_text_encoder=False``). Unknown keys are an error. Tuple
fields take a Python tuple, quoted for the shell:
``--config.sample_prompts='("a sks circle", "a sks circle on the left")'``.

Memory plan for SD 1.5 at 512x512 (full fine-tune, prior preservation: B instance + B
class rows, AdamW; compile-only, ``bench/roofline.py --programs train``, per device, from
XLA:CPU with remat kept; bench/README.md "Memory plan"): the fp32 UNet + Adam state is
10.3 GB (+3.7 GB gradients / update), split by ``mesh.fsdp``. Batch 1 peaks at 20.6 GB with
``remat=True`` and 38.4 GB without; with remat and ``mesh.fsdp=8`` 8.3 GB. So 16 GB per
device needs ``remat=True`` and FSDP: batch 1 over 4-8 devices (10.2 / 8.3 GB), batch 2
over 8 (14.9 GB); 80 GB takes batch 1-2 in any setting and batch 4 with remat (42.6 GB),
without it only in bf16 with FSDP 4-8, at the edge (78.9 / 78.7 GB; fp32 needs 90.8 /
94.0). With remat fp32 compute needs the same or up to 1.6 GB less than bf16 on XLA:CPU
(all 18 cells compiled in both); without remat at FSDP 4-8 fp32 needs 6-15 GB more. On a GPU / TPU
bf16 activations take half the bytes and a flash attention kernel drops the 64x64 attention scores, so there these are
upper bounds: for SD 1.5 on 16 GB devices
``--config.dtype=bfloat16 --config.remat=True --config.mesh.fsdp=N``. Not yet measured
on a device (``bench/train_step.py --remat``) nor compiled for a TPU.
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                    # diffusers-layout pipeline directory; "" = embedded model
    c.export_dir = ""               # "" = <workdir>/export (pipeline dir, or LoRA file dir)

    c.instance_dir = ""             # folder of subject images (required)
    c.fit = "crop"                  # mixed sizes: crop | resize | reject
    c.mask_dir = ""                 # masks, one per instance image (same name, white = subject)
    c.mask_weight = 0.0             # >0: masked loss, a pixel's error x (1 + w x mask coverage)
    c.instance_prompt = "a sks circle"
    c.class_prompt = "a circle"

    c.prior_preservation = True
    c.prior_loss_weight = 1.0       # lambda (traced: changing it does not recompile)
    c.num_class_images = 64
    c.class_cache_dir = ""          # "" = ~/.cache/jaxdiff/class_images (shared by runs)
    c.class_sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", steps=25, guidance_scale=5.0, seed=0))

    c.train_text_encoder = True     # (LoRA: rank-r adapters on its attention too)
    c.lora_rank = 0                 # 0 = full UNet fine-tuning; r > 0 = LoRA adapters only
    c.lora_alpha = 0.0              # 0 = rank (scale 1)

    c.steps = 400
    c.batch_size = 4                # instance rows per step (+ as many class rows)
    c.lr = 3e-4
    c.warmup = 0
    c.ema_decay = 0.0               # > 0: export the EMA of the trained weights (0 = last step)
    c.caption_dropout = 0.0         # share of instance rows trained under the empty prompt
    c.dtype = "float32"             # UNet compute: float32 | bfloat16 (state stays float32)
    c.remat = False                 # recompute UNet blocks in the backward pass (memory plan)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1                 # devices sharing one FSDP-sharded state (1 = data parallel)

    c.log_every = 10
    c.checkpoint_every = 100
    c.sample_every = 100            # 0 disables sample grids
    c.sample_prompts = ()           # () = (instance_prompt, class_prompt)

    if variant == "lora":
        # UNet + text-encoder adapters (diffusers' load_lora_weights reads both): on the
        # shipped model they beat UNet-only adapters on the subject and the class in three
        # seeds (bench/README.md, "DreamBooth defaults"; until 2026-12-05: UNet only, 1500).
        c.lora_rank = 4
        c.lr = 2e-3
        c.steps = 800
        c.train_text_encoder = True
    elif variant == "tiny":
        c.num_class_images = 2
        c.class_sampling.steps = 2
        c.steps = 2
        c.batch_size = 2
        c.log_every = 1
        c.checkpoint_every = 2
        c.sample_every = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/dreambooth.py "
                         "(use '', 'lora' or 'tiny').")
    return c
