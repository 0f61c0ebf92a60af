"""The reference inversion + Prompt-to-Prompt algorithm in PyTorch, on a diffusers pipeline.

A line-by-line re-implementation of google/prompt-to-prompt's ``null_text_w_ptp.ipynb``
(``NullInversion.ddim_loop`` / ``null_optimization``, ``AttentionReplace`` /
``AttentionRefine`` / ``AttentionReweight`` applied to the conditional half of the batch,
``text2image_ldm_stable``, ``LocalBlend`` on the stored unedited maps), plus negative-prompt inversion (Miyake et al.: the source
prompt as every step's null) and direct inversion (Ju et al., PnP-Inversion's
``offset_calculate``: the source branch is put back on the inversion trajectory after
every step). One image per call, host-side loops and a stateful attention processor, as
the reference runs. Used by tests/test_p2p_reference.py (parity) and bench/edit_speed.py
(speed). Epsilon-prediction only, like the reference.

On a diffusers ``StableDiffusionXLPipeline`` a condition is the tuple (prompt embeddings,
pooled embeddings, time ids) from the pipeline's own ``encode_prompt`` and
``_get_add_time_ids`` (image size, crop (0, 0)); the empty prompt is zeros where the
pipeline's ``force_zeros_for_empty_prompt`` says so; null-text optimises the null's prompt
and pooled embeddings with one Adam (the time ids stay).

The controller's data (token mapper, per-step word alphas, refine alignment, equalizer,
self-replace steps, LocalBlend word masks) is built from the prompts by the reference's
own code, ported in ``torchref/p2p_control.py``; nothing is taken from jaxdiff.
"""
from __future__ import annotations

import numpy as np

from torchref import p2p_control as pc

INVERSIONS = ("ddim", "null_text", "negative_prompt", "direct")


class TorchP2P:
    """Inversion + P2P edit of one image with a diffusers ``StableDiffusionPipeline``."""

    def __init__(self, torch, pipe, steps: int, guidance: float):
        from diffusers import DDIMScheduler
        self.t, self.pipe, self.steps, self.g = torch, pipe, steps, guidance
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps
        self.ac = self.scheduler.alphas_cumprod
        self.final = self.scheduler.final_alpha_cumprod
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.control = None
        self.blend = None
        self.step = 0
        self.step_maps = []
        pipe.unet.set_attn_processor({name: self._processor(name)
                                      for name in pipe.unet.attn_processors})

    # -- the attention controller (AttentionControlEdit.forward on the cond half) --------
    def set_control(self, source: str, target: str, *, mode: str = "replace",
                    cross_replace_steps=0.8, self_replace_steps=0.4, reweight=None,
                    self_max_tokens: int = 32 * 32, tail: str = "reference"):
        """AttentionReplace / AttentionRefine (+ AttentionReweight) for one prompt pair,
        built from the prompts by the reference's own code (``torchref.p2p_control``).

        Args:
          cross_replace_steps: a fraction, a (start, end) pair, or a dict of them with
            "default_" and per-target-word entries (the reference's argument).
          reweight: {word of the target: factor} (``get_equalizer``), or None.
          self_max_tokens: self-attention is replaced in layers with <= this many tokens
            (null_text_w_ptp.ipynb: 32 ** 2).
          tail: "reference", or "aligned" to map the tokens after a swap that changes
            the token count the way jaxdiff does (``p2p_control.replacement_mapper``).
        """
        tok, n = self.pipe.tokenizer, self.pipe.tokenizer.model_max_length
        words = list((reweight or {}).items())
        control = dict(
            refine=mode == "refine", self_max_tokens=self_max_tokens,
            self_range=pc.self_replace_range(self.steps, self_replace_steps),
            alpha=pc.time_words_alpha(target, self.steps, cross_replace_steps, tok, n),
            equalizer=pc.equalizer(target, [w for w, _ in words], [v for _, v in words],
                                   tok, n))
        if mode == "refine":
            control["refine_index"], control["refine_alpha"] = pc.refinement_mapper(
                source, target, tok, n)
        elif mode in ("replace", "reweight"):
            control["mapper"] = pc.replacement_mapper(source, target, tok, n, tail)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        self.control = {k: self.t.from_numpy(v) if isinstance(v, np.ndarray) else v
                        for k, v in control.items()}

    def _replace_cross(self, base, tgt):
        c = self.control
        if c["refine"]:  # AttentionRefine: base[:, :, mapper] * alphas + tgt * (1 - alphas)
            mapped = base[:, :, c["refine_index"]] * c["refine_alpha"] \
                + tgt * (1 - c["refine_alpha"])
        else:  # AttentionReplace: einsum('hpw,bwn->bhpn', base, mapper)
            mapped = self.t.einsum("hqw,wk->hqk", base, c["mapper"])
        return mapped * c["equalizer"][None, None, :]  # AttentionReweight

    def set_blend(self, source: str, target: str, words, *, threshold: float = 0.3,
                  start_fraction: float = 0.2, res: int = 16):
        """LocalBlend of one pair: ``words = (source words, target words)``; word maps at
        ``res`` x ``res`` (the reference: 16 for SD at 512 px)."""
        tok, n = self.pipe.tokenizer, self.pipe.tokenizer.model_max_length
        masks = np.stack([pc.blend_word_mask(source, words[0], tok, n),
                          pc.blend_word_mask(target, words[1], tok, n)])
        self.blend = dict(words=self.t.from_numpy(masks), threshold=float(threshold),
                          start=int(start_fraction * self.steps), res=res)

    def _blend_step(self, x, acc):
        """LocalBlend.__call__: word maps summed over steps, 3x3 max-pool, nearest
        up-sampling, / per-image max, > threshold, source mask OR target mask."""
        torch, b = self.t, self.blend
        acc = acc + torch.stack(self.step_maps).mean(0)  # [2, res, res, L]
        self.step_maps = []
        maps = (acc * b["words"][:, None, None, :]).sum(-1)[:, None]  # [2, 1, res, res]
        maps = torch.nn.functional.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = torch.nn.functional.interpolate(maps, size=x.shape[2:])
        mask = mask / mask.amax(dim=(2, 3), keepdim=True)
        mask = mask.gt(b["threshold"])
        mask = (mask[:1] | mask[1:]).float()
        if self.step >= b["start"]:
            x = torch.cat([x[:1], x[:1] + mask * (x[1:] - x[:1])])
        return x, acc

    def _processor(self, name):
        torch, outer = self.t, self
        records = name.endswith("attn2.processor") and not name.startswith("mid_block")

        def proc(attn, hidden_states, encoder_hidden_states=None, **kw):
            cross = encoder_hidden_states is not None
            ctx = encoder_hidden_states if cross else hidden_states
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
            probs = attn.get_attention_scores(q, k, None)
            c = outer.control
            if c is not None:  # batch [uncond src, uncond tgt, cond src, cond tgt]
                b = hidden_states.shape[0]
                p = probs.view(b, attn.heads, *probs.shape[1:]).clone()
                bl = outer.blend
                if records and bl is not None and p.shape[2] == bl["res"] ** 2:
                    # AttentionStore keeps the unedited conditional maps.
                    outer.step_maps.append(p[2:].mean(1).reshape(2, bl["res"], bl["res"], -1))
                base, tgt = p[2], p[3]
                if cross:
                    a = c["alpha"][outer.step][None, None, :]
                    p[3] = outer._replace_cross(base, tgt) * a + tgt * (1 - a)
                elif (c["self_range"][0] <= outer.step < c["self_range"][1]
                      and p.shape[2] <= c["self_max_tokens"]):
                    p[3] = base
                probs = p.view(probs.shape)
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
            return attn.to_out[1](attn.to_out[0](out))
        return proc

    # -- NullInversion -------------------------------------------------------------------
    def _alpha(self, t):
        return self.ac[t] if t >= 0 else self.final

    def prev_step(self, eps, t, x):
        a, ap = self._alpha(t), self._alpha(t - 1000 // self.steps)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps

    def next_step(self, eps, t, x):
        t, t_next = min(t - 1000 // self.steps, 999), t
        a, an = self._alpha(t), self.ac[t_next]
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return an ** 0.5 * x0 + (1 - an) ** 0.5 * eps

    def unet(self, x, t, cond):
        """The UNet's output; ``cond``: embeddings, or SDXL's (context, pooled, time ids)."""
        if not self.xl:
            return self.pipe.unet(x, t, cond).sample
        return self.pipe.unet(x, t, cond[0], added_cond_kwargs={
            "text_embeds": cond[1], "time_ids": cond[2]}).sample

    def cat(self, a, b):
        if not self.xl:
            return self.t.cat([a, b])
        return tuple(self.t.cat([u, v]) for u, v in zip(a, b))

    def text_xl(self, prompts, side):
        pipe = self.pipe
        with self.t.no_grad():
            ctx, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        if prompts == [""] and pipe.config.force_zeros_for_empty_prompt:
            ctx, pooled = self.t.zeros_like(ctx), self.t.zeros_like(pooled)
        ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), ctx.dtype,
                                     pipe.text_encoder_2.config.projection_dim)
        return ctx, pooled, ids

    def text(self, prompts, side=None):
        if self.xl:
            return self.text_xl(prompts, side)
        tok = self.pipe.tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length,
                                  return_tensors="pt")
        with self.t.no_grad():
            return self.pipe.text_encoder(tok.input_ids)[0]

    def encode(self, image_uint8):
        vae = self.pipe.vae
        img = self.t.from_numpy(image_uint8).float().permute(2, 0, 1)[None] / 127.5 - 1
        with self.t.no_grad():
            return vae.encode(img).latent_dist.mean * vae.config.scaling_factor

    def decode(self, x):
        vae = self.pipe.vae
        with self.t.no_grad():
            out = vae.decode(x / vae.config.scaling_factor).sample
        return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def ddim_loop(self, z, cond):
        """[z0, ..., z_T]: conditional DDIM inversion."""
        traj = [z]
        with self.t.no_grad():
            for i in range(self.steps):
                t = self.timesteps[len(self.timesteps) - i - 1]
                z = self.next_step(self.unet(z, t, cond), t, z)
                traj.append(z)
        return traj

    def guided(self, x, t, uncond, cond):
        with self.t.no_grad():
            eu, ec = self.unet(self.t.cat([x, x]), t, self.cat(uncond, cond)).chunk(2)
        return eu + self.g * (ec - eu)

    def null_optimization(self, traj, cond, uncond, inner_steps=10, epsilon=1e-5):
        """Per-step null embeddings (each step starts from the previous step's result)."""
        torch, unet = self.t, self.unet
        nulls, x, taken = [], traj[-1], []
        u = uncond
        for i in range(self.steps):
            if self.xl:  # prompt and pooled embeddings trained, time ids kept
                u = tuple(v.clone().detach().requires_grad_(k < 2) for k, v in enumerate(u))
                opt = torch.optim.Adam(list(u[:2]), lr=1e-2 * (1.0 - i / 100.0))
            else:
                u = u.clone().detach().requires_grad_(True)
                opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            target, t = traj[len(traj) - i - 2], self.timesteps[i]
            with torch.no_grad():
                eps_c = unet(x, t, cond)
            j = 0
            for j in range(inner_steps):
                eps_u = unet(x, t, u)
                rec = self.prev_step(eps_u + self.g * (eps_c - eps_u), t, x)
                loss = torch.nn.functional.mse_loss(rec, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < epsilon + i * 2e-5:
                    break
            taken.append(j + 1)
            u = tuple(v.detach() for v in u) if self.xl else u.detach()
            nulls.append(u)
            x = self.prev_step(self.guided(x, t, u, cond), t, x)
        return nulls, taken

    def direct_offsets(self, traj, cond, uncond):
        """PnP-Inversion's ``offset_calculate`` for the source branch."""
        offsets = []
        for i in range(self.steps):
            t, x = self.timesteps[i], traj[len(traj) - i - 1]
            rec = self.prev_step(self.guided(x, t, uncond, cond), t, x)
            offsets.append(traj[len(traj) - i - 2] - rec)
        return offsets

    # -- text2image_ldm_stable with the controller -----------------------------------------
    def edit(self, z_T, nulls, cond, tgt, offsets=None):
        """Source and target branches sampled together under the controller and LocalBlend
        set by ``set_control`` / ``set_blend``; returns their final latents."""
        torch = self.t
        x = torch.cat([z_T, z_T])
        acc, self.step_maps = 0.0, []
        for i, t in enumerate(self.timesteps):
            self.step = i
            eps = self.guided(x, t, self.cat(nulls[i], nulls[i]), self.cat(cond, tgt))
            x = self.scheduler.step(eps, t, x).prev_sample
            if offsets is not None:
                x = torch.cat([x[:1] + offsets[i], x[1:]])
            if self.blend is not None:
                x, acc = self._blend_step(x, acc)
        return x[:1], x[1:]

    def __call__(self, image_uint8, source, target, inversion="null_text", inner_steps=10,
                 control=None, blend=None):
        """(source latent, target latent, inner Adam steps per timestep) of one edit.

        Args:
          control: keyword arguments of ``set_control`` (mode, cross/self replace steps,
            reweight), built into the controller from the two prompts.
          blend: keyword arguments of ``set_blend`` (words, threshold, ...) or None.
        """
        if inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion {inversion!r}")
        side = image_uint8.shape[0]
        cond, uncond, tgt = (self.text([p], side) for p in (source, "", target))
        traj = self.ddim_loop(self.encode(image_uint8), cond)
        taken, offsets = [0] * self.steps, None
        if inversion == "null_text":
            nulls, taken = self.null_optimization(traj, cond, uncond, inner_steps)
        elif inversion == "negative_prompt":
            nulls = [cond] * self.steps
        else:
            nulls = [uncond] * self.steps
            if inversion == "direct":
                offsets = self.direct_offsets(traj, cond, uncond)
        self.set_control(source, target, **(control or {}))
        if blend is not None:
            self.set_blend(source, target, **blend)
        try:
            src, edit = self.edit(traj[-1], nulls, cond, tgt, offsets)
        finally:
            self.control = self.blend = None
        return src, edit, taken
