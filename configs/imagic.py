"""Imagic stage sizes (``edit/imagic.py --config configs/imagic.py[:sd]``).

The default variant suits the embedded shapes model (32 px images, 8x8 latents, a 1.6 M
parameter UNet); every edit optimises its own embedding and trains its own LoRA
adapters. Measured on 100 held-out triples per kind (bench/README.md, "All four methods
on the same triples"): at these sizes the fine-tuned model holds the input so firmly that
Imagic seldom edits (size 0.03, position 0.01 at eta 1); the reduced run there (25 / 50
steps, 2 draws, DDIM 10) edits more (size 0.15), still far below Prompt-to-Prompt (0.95).
The ``sd`` variant holds the paper's Stable Diffusion values (Kawar et al. 2023,
Sec. 4 / App. B): embedding 100 Adam steps at lr 1e-3, then the full UNet fine-tuned 1500
steps at lr 5e-7, one (t, noise) draw per step; eta around 0.7 (DDIM 50 steps and
guidance 7.5, the entrypoint's defaults). Full fine-tuning keeps one UNet copy per image of a batch (3.4 GB fp32 each
for SD 1.5): give ``--max-batch 1`` there, or ``--lora-rank 4`` with a LoRA learning rate
(~1e-4). Flags given on the command line override these values.
"""
import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.embedding_steps = 100         # (a) Adam steps on the target text embedding
    c.embedding_lr = 1e-3
    c.finetune_steps = 200          # (b) steps on the model with e_opt frozen
    c.finetune_lr = 1e-3
    c.lora_rank = 4                 # 0 = full UNet fine-tuning
    c.draws = 4                     # (t, noise) draws of the image per step
    c.eta = 0.7                     # (c) e = eta * e_tgt + (1 - eta) * e_opt
    if variant == "sd":
        c.finetune_steps, c.finetune_lr, c.lora_rank, c.draws = 1500, 5e-7, 0, 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/imagic.py (use '' or 'sd').")
    return c
