"""The reference Imagic and UniTune in PyTorch, on a diffusers ``StableDiffusionPipeline``.

Written after the paper (Kawar et al. 2023) and diffusers' community pipeline
``examples/community/imagic_stable_diffusion.py`` (its loop: ``torch.randn`` noise and
``torch.randint`` timestep, ``scheduler.add_noise``, ``unet(...).sample``, MSE to the
noise, optimizer step), with the settings jaxdiff's ``editing/imagic.py`` chose where they
differ from that pipeline, so the two can be compared number for number:

* the image latent is the VAE posterior mean (the community pipeline draws a sample);
* every optimiser step is ``torch.nn.utils.clip_grad_norm_(1.0)`` then
  ``torch.optim.AdamW`` (diffusers' DreamBooth script: ``max_grad_norm=1``,
  ``adam_weight_decay=1e-2``; the embedding with weight decay 0); the community pipeline
  uses plain Adam without clipping;
* a step's loss averages ``draws`` (t, noise) pairs of the same image (community: 1);
* stage (b) trains LoRA adapters (alpha = rank, on the UNet attention ``to_q / to_k /
  to_v / to_out.0``) or, with ``lora=None``, the whole UNet (community: the whole UNet);
* stage (c) is DDIM with classifier-free guidance from the given start noise (Imagic:
  pure noise; UniTune: the image noised to ``strength``, then a blend toward the image's
  latent).

The random draws are inputs (timesteps [steps, draws], noise [steps, draws, C, h, w], the
LoRA ``down`` start, the start noise), so a caller can feed both implementations the same
ones. The LoRA update is applied functionally (``torch.func.functional_call`` with
``W + scale * up @ down``), nothing in the pipeline's modules is changed. One image per
call; epsilon prediction only. Used by tests/test_imagic_reference.py.
"""
from __future__ import annotations

import numpy as np


class TorchTunedEdit:
    """Imagic / UniTune of one image with a diffusers ``StableDiffusionPipeline``."""

    def __init__(self, torch, pipe, steps: int, guidance: float):
        from diffusers import DDIMScheduler
        self.t, self.pipe, self.g = torch, pipe, guidance
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps
        self.ac = self.scheduler.alphas_cumprod
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
            m.eval()

    # -- inputs -------------------------------------------------------------------------
    def text(self, prompt: str):
        tok = self.pipe.tokenizer
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        with self.t.no_grad():
            return self.pipe.text_encoder(ids)[0]

    def encode(self, image):
        """float [H, W, 3] in [-1, 1] -> scaled posterior mean [1, C, h, w]."""
        x = self.t.tensor(np.asarray(image, np.float32)).permute(2, 0, 1)[None]
        with self.t.no_grad():
            z = self.pipe.vae.encode(x).latent_dist.mean
        return z * self.pipe.vae.config.scaling_factor

    # -- the denoising loss and the optimiser loop --------------------------------------
    def _unet(self, weights, x, t, context):
        if not weights:
            return self.pipe.unet(x, t, context).sample
        return self.t.func.functional_call(self.pipe.unet, weights, (x, t, context)).sample

    def _loss(self, weights, z0, t, noise, context):
        """Mean over the draws of each draw's mean squared error to the noise."""
        t = self.t.tensor(np.asarray(t), dtype=self.t.long)
        noise = self.t.tensor(np.asarray(noise, np.float32))
        x0 = z0.expand(noise.shape[0], -1, -1, -1)
        x_t = self.scheduler.add_noise(x0, noise, t)
        pred = self._unet(weights, x_t, t, context.expand(noise.shape[0], -1, -1))
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean()

    def _fit(self, tensors, loss_of, timesteps, noises, lr, weight_decay):
        opt = self.t.optim.AdamW(tensors, lr=lr, weight_decay=weight_decay)
        curve = []
        for t, noise in zip(timesteps, noises):
            loss = loss_of(t, noise)
            opt.zero_grad()
            loss.backward()
            self.t.nn.utils.clip_grad_norm_(tensors, 1.0)
            opt.step()
            curve.append(float(loss.detach()))
        return np.asarray(curve, np.float32)

    def optimize_embedding(self, z0, e_tgt, timesteps, noises, lr):
        """Stage (a): the embedding that reconstructs z0, the model frozen.
        Returns (e_opt [1, L, D], losses [steps])."""
        e = e_tgt.clone().requires_grad_(True)
        curve = self._fit([e], lambda t, n: self._loss(None, z0, t, n, e), timesteps, noises,
                          lr, 0.0)
        return e.detach(), curve

    def lora_weights(self, lora, scale: float = 1.0):
        """{module.weight: W + scale * up @ down} for ``lora`` {module: (down [r, in],
        up [out, r])} (peft's ``lora_A`` / ``lora_B``)."""
        mods = dict(self.pipe.unet.named_modules())
        return {f"{m}.weight": mods[m].weight + scale * (up @ down)
                for m, (down, up) in lora.items()}

    def finetune(self, z0, context, timesteps, noises, lr, lora=None, scale: float = 1.0):
        """Stage (b): the LoRA adapters ``lora`` {module: (down, up)} (numpy start values),
        or the whole UNet when None (jaxdiff's ``lora_rank=0``; not exercised by
        tests/test_imagic_reference.py, which compares LoRA), trained to denoise z0 under
        ``context``.
        Returns (trained {module: (down, up)} or {name: tensor}, losses [steps])."""
        if lora is None:
            trained = {k: v.detach().clone().requires_grad_(True)
                       for k, v in self.pipe.unet.named_parameters()}
            weights = lambda: trained
        else:
            trained = {m: tuple(self.t.tensor(np.asarray(a, np.float32), requires_grad=True)
                                for a in pair) for m, pair in lora.items()}
            weights = lambda: self.lora_weights(trained, scale)
        tensors = [v for pair in trained.values()
                   for v in (pair if isinstance(pair, tuple) else (pair,))]
        curve = self._fit(tensors, lambda t, n: self._loss(weights(), z0, t, n, context),
                          timesteps, noises, lr, 1e-2)
        with self.t.no_grad():
            out = {k: (tuple(a.detach() for a in v) if isinstance(v, tuple) else v.detach())
                   for k, v in trained.items()}
        return out, curve

    # -- sampling -----------------------------------------------------------------------
    def sample(self, weights, z0, noise, cond, uncond, strength: float = 1.0,
               from_noise: bool = True, blend: float = 0.0):
        """DDIM with CFG over the last ``int(S * strength)`` steps: from ``noise`` itself
        (``from_noise``, text-to-image) or from z0 noised to the first step's level
        (img2img), then ``blend * z0 + (1 - blend) * result``."""
        steps = len(self.timesteps)
        start = steps - min(int(steps * strength), steps)
        noise = self.t.tensor(np.asarray(noise, np.float32))
        if from_noise:
            x = noise * self.scheduler.init_noise_sigma
        else:
            x = self.scheduler.add_noise(z0, noise, self.timesteps[start:start + 1])
        context = self.t.cat([uncond, cond])
        with self.t.no_grad():
            for t in self.timesteps[start:]:
                out = self._unet(weights, self.t.cat([x, x]), t, context)
                u, c = out.chunk(2)
                x = self.scheduler.step(u + self.g * (c - u), t, x).prev_sample
        return blend * z0 + (1.0 - blend) * x

    # -- the methods ----------------------------------------------------------------------
    def imagic(self, image, prompt: str, draws_a, draws_b, noise, etas, *, embedding_lr,
               finetune_lr, lora=None, negative_prompt: str = ""):
        """Imagic of one image: ``draws_a`` / ``draws_b`` = (timesteps, noises) of stages
        (a) / (b); ``noise`` [1, C, h, w] the start noise of every eta.
        Returns {"e_opt" [L, D], "embedding_loss", "finetune_loss" [steps], "trained"
        (``finetune``'s), "latents" [E, C, h, w]} (numpy but "trained")."""
        z0 = self.encode(image)
        e_tgt, uncond = self.text(prompt), self.text(negative_prompt)
        e_opt, curve_a = self.optimize_embedding(z0, e_tgt, *draws_a, embedding_lr)
        trained, curve_b = self.finetune(z0, e_opt, *draws_b, finetune_lr, lora)
        with self.t.no_grad():
            weights = trained if lora is None else self.lora_weights(trained)
            lat = self.t.cat([self.sample(weights, z0, noise, eta * e_tgt + (1 - eta) * e_opt,
                                          uncond) for eta in etas])
            return dict(e_opt=e_opt[0].numpy(), embedding_loss=curve_a, finetune_loss=curve_b,
                        trained=trained, latents=lat.numpy())

    def unitune(self, image, token: str, prompt: str, draws_b, noise, strengths, blends, *,
                finetune_lr, lora=None, negative_prompt: str = ""):
        """UniTune of one image: fine-tune under ``token`` alone, then img2img toward
        ``prompt`` (which should hold the token) at each (strength, blend)."""
        z0 = self.encode(image)
        e_tok, cond, uncond = self.text(token), self.text(prompt), self.text(negative_prompt)
        trained, curve_b = self.finetune(z0, e_tok, *draws_b, finetune_lr, lora)
        with self.t.no_grad():
            weights = trained if lora is None else self.lora_weights(trained)
            lat = self.t.cat([self.sample(weights, z0, noise, cond, uncond, s, False, b)
                              for s, b in zip(strengths, blends)])
            return dict(finetune_loss=curve_b, trained=trained, latents=lat.numpy())
