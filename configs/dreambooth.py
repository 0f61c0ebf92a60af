"""DreamBooth (with prior preservation), full fine-tuning or LoRA.

    python train/dreambooth.py --config configs/dreambooth.py --workdir runs/db \
        --config.instance_dir=my_subject/ --config.instance_prompt="a sks circle" \
        --config.class_prompt="a circle"
    python train/dreambooth.py --config configs/dreambooth.py:lora --workdir runs/db_lora \
        --config.instance_dir=my_subject/
    python train/dreambooth.py --config configs/dreambooth.py:tiny --workdir /tmp/smoke \
        --config.instance_dir=my_subject/

Defaults suit the embedded shapes model (``model=""``). For Stable Diffusion use
diffusers' DreamBooth example settings (``--config.model=/path/to/sd15 --config.lr=5e-6
--config.steps=800 --config.num_class_images=200``). Unknown keys are an error. Tuple
fields take a Python tuple, quoted for the shell:
``--config.sample_prompts='("a sks circle", "a sks circle on the left")'``.

Memory plan for SD 1.5 at 512x512 (compile-only, ``bench/roofline.py --programs
train``, figures per device from XLA:CPU's buffer assignment, bench/README.md): a full
fine-tune step with prior preservation (B instance + B class rows), AdamW, donated state.
The state (fp32 UNet params + Adam moments) is 10.31 GB on one device, 2.58 / 1.29 GB per
device with FSDP over 4 / 8. Peak (state + temporaries): batch 1: 38.4 GB bf16 with remat,
38.4 GB bf16 without, 37.9 / 37.9 GB fp32 with / without; 23.7 / 23.6 GB bf16 + remat with
FSDP over 4 / 8; batch 4 bf16: 112.7 GB with remat, 112.6 GB without. So on XLA:CPU's
figures nothing fits 16 GB per device, batch 1 fits 80 GB in every variant (FSDP included)
and batch 4 does not. XLA:CPU's temporaries do not shrink with remat (they grow ~13 GB per
UNet row either way; an unchecked guess: XLA:CPU schedules without regard to memory), so
measure peak memory on the device with ``bench/train_step.py --remat``
(bench/accelerator.sh) before trusting the 16 GB verdict. The same compile for a TPU v5e
(``bench/roofline.py --target tpu_v5e:2x4``: libtpu's deviceless compiler, which schedules
for memory) is set up but not measured yet; with the TPU splash attention kernel a 64x64
self-attention's gradient needs 17.6 MB of temporaries instead of 1.6 GB at batch 2
(bench/roofline_attention.py), so expect the TPU peaks well below the CPU ones.
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ""                    # diffusers-layout pipeline directory; "" = embedded model
    c.export_dir = ""               # "" = <workdir>/export (pipeline dir, or LoRA file dir)

    c.instance_dir = ""             # folder of subject images (required)
    c.fit = "crop"                  # mixed sizes: crop | resize | reject
    c.instance_prompt = "a sks circle"
    c.class_prompt = "a circle"

    c.prior_preservation = True
    c.prior_loss_weight = 1.0       # lambda (traced: changing it does not recompile)
    c.num_class_images = 64
    c.class_cache_dir = ""          # "" = ~/.cache/jaxdiff/class_images (shared by runs)
    c.class_sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", steps=25, guidance_scale=5.0, seed=0))

    c.train_text_encoder = False
    c.lora_rank = 0                 # 0 = full UNet fine-tuning; r > 0 = LoRA adapters only
    c.lora_alpha = 0.0              # 0 = rank (scale 1)

    c.steps = 200
    c.batch_size = 4                # instance rows per step (+ as many class rows)
    c.lr = 1e-4
    c.warmup = 0
    c.dtype = "float32"             # UNet compute: float32 | bfloat16 (state stays float32)
    c.remat = False                 # recompute UNet blocks in the backward pass (memory plan)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1                 # devices sharing one FSDP-sharded state (1 = data parallel)

    c.log_every = 10
    c.checkpoint_every = 100
    c.sample_every = 100            # 0 disables sample grids
    c.sample_prompts = ()           # () = (instance_prompt, class_prompt)

    if variant == "lora":
        c.lora_rank = 4
        c.lr = 1e-3
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
