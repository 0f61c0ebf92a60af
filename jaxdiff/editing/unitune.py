"""UniTune (Valevski et al. 2022): fine-tune on one image with a rare-token prompt, then
edit by SDEdit from the noised image with a prompt that keeps the token.

Per image (independent rows, one compiled program for the batch):

  1. the model (LoRA adapters by default, or the full UNet) is fine-tuned to denoise the
     image under the embedding of the rare-token prompt alone (``token``, e.g. "sks"):
     DreamBooth's loss without prior preservation (``training.dreambooth``), the step of
     ``training.step`` in a ``lax.scan`` (``imagic.finetune``);
  2. the edit is SDEdit (``sdedit.sdedit_latents``) with the fine-tuned model from the
     image noised to ``strength``, toward "<token> <edit prompt>", with CFG;
  3. the paper's interpolation toward the input after sampling: the result is
     ``interpolation * z0 + (1 - interpolation) * edited`` in latent space (0 = none).

``strength`` and ``interpolation`` are traced and sweepable (one sample per variant from
the same fine-tuned model); the fine-tuning learning rate is traced too (0 = the base
model, in the same program). It runs on ``imagic.tuned_edit``'s program with the
embedding stage off (its learning rate 0).

References: Valevski et al., "UniTune: Text-Driven Image Editing by Fine Tuning a
Diffusion Model on a Single Image", SIGGRAPH 2023 (arXiv 2210.09477).
"""
from __future__ import annotations

from jaxdiff.editing import batch_inputs, imagic
from jaxdiff.sampling import prompt_list

DEFAULT_STAGES = imagic.Stages(embedding_steps=0)


def edit_prompt(token: str, prompt: str) -> str:
    """The edit prompt keeps the token: ``"<token> <prompt>"`` unless it already has it."""
    return prompt if token in prompt.split() else f"{token} {prompt}".strip()


def unitune(pipe, params, images, prompts, negative_prompts=None, *, token: str = "sks",
            strengths=0.6, interpolations=0.0, finetune_lr=1e-3,
            stages: imagic.Stages = DEFAULT_STAGES, steps: int = 50, guidance_scale=7.5,
            seed=0, mesh=None, sample_index=None):
    """UniTune on a batch of images (each fine-tuned on its own).

    Args:
      images: float [B, H, W, 3] in [-1, 1].
      prompts: the edit text, one or one per image (``token`` is prepended if absent).
      negative_prompts: CFG's unconditional prompt(s) (None = "").
      token: the rare token the image is fine-tuned under (the whole fine-tuning prompt).
      strengths, interpolations: a number or a sequence per variant (traced).
      finetune_lr: AdamW learning rate of the fine-tuning (traced, a number or one per
        image; 0 = the base model).
      stages: static sizes (``imagic.Stages``; its embedding stage runs with lr 0, so give
        ``embedding_steps=0`` unless sharing another program's shapes).
      steps, guidance_scale: SDEdit's DDIM steps and CFG scale.
      seed, sample_index: per-image keys (fine-tuning draws and SDEdit noise).
    Returns:
      ``imagic.tuned_edit``'s dict ("edited" [B, E, H, W, 3], one per variant).
    """
    batch_inputs.refuse_sdxl(pipe, "UniTune")
    imagic.refuse_caption_mask(pipe, "UniTune")
    if not token.strip():
        raise ValueError("UniTune needs a rare token (e.g. 'sks'), got an empty one.")
    b = batch_inputs.check_images(images, pipe).shape[0]
    targets = [edit_prompt(token, p) for p in prompt_list(prompts, b, "prompts", per="image")]
    return imagic.tuned_edit(pipe, params, images, token, targets, negative_prompts,
                             etas=1.0, strengths=strengths, blends=interpolations,
                             from_noise=False, embedding_lr=0.0, finetune_lr=finetune_lr,
                             stages=stages, steps=steps, guidance_scale=guidance_scale,
                             seed=seed, mesh=mesh, sample_index=sample_index)
