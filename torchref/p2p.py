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

The controller's *data* (token mapper, per-step word alphas, refine alignment,
equalizer) is taken from a jaxdiff ``P2PControl`` for one pair; the alignment code that
builds it is tested on its own (tests/test_prompt_to_prompt.py).
"""
from __future__ import annotations

import numpy as np

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
        self.control = None
        self.blend = None
        self.step = 0
        self.step_maps = []
        pipe.unet.set_attn_processor({name: self._processor(name)
                                      for name in pipe.unet.attn_processors})

    # -- the attention controller (AttentionControlEdit.forward on the cond half) --------
    def set_control(self, control, pair: int = 0):
        """Controller data of pair ``pair`` of a jaxdiff ``P2PControl`` (None: no edit)."""
        if control is None:
            self.control = None
            return
        f = lambda a: self.t.from_numpy(np.array(a)[pair])
        self.control = dict(
            mapper=f(control.cross_mapper), alpha=self.t.from_numpy(
                np.array(control.cross_alpha)[:, pair]), equalizer=f(control.equalizer),
            refine_index=f(control.refine_index).long(), refine_alpha=f(control.refine_alpha),
            self_steps=int(control.self_steps), refine=control.refine,
            self_max_tokens=control.self_max_tokens)

    def _replace_cross(self, base, tgt):
        c = self.control
        if c["refine"]:  # AttentionRefine: base[:, :, mapper] * alphas + tgt * (1 - alphas)
            mapped = base[:, :, c["refine_index"]] * c["refine_alpha"] \
                + tgt * (1 - c["refine_alpha"])
        else:  # AttentionReplace: einsum('hpw,bwn->bhpn', base, mapper)
            mapped = self.t.einsum("hqw,wk->hqk", base, c["mapper"])
        return mapped * c["equalizer"][None, None, :]  # AttentionReweight

    def set_blend(self, blend, pair: int = 0):
        """LocalBlend data of pair ``pair`` of a jaxdiff ``LocalBlend`` (None: no blend)."""
        if blend is None:
            self.blend = None
            return
        n = np.asarray(blend.words).shape[0] // 2
        words = np.array(blend.words)[[pair, n + pair]]
        self.blend = dict(words=self.t.from_numpy(words), threshold=float(blend.threshold),
                          start=int(blend.start), res=blend.res)

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
                elif outer.step < c["self_steps"] and p.shape[2] <= c["self_max_tokens"]:
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

    def text(self, prompts):
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
                z = self.next_step(self.pipe.unet(z, t, cond).sample, t, z)
                traj.append(z)
        return traj

    def guided(self, x, t, uncond, cond):
        with self.t.no_grad():
            eu, ec = self.pipe.unet(self.t.cat([x, x]), t, self.t.cat([uncond, cond])).sample.chunk(2)
        return eu + self.g * (ec - eu)

    def null_optimization(self, traj, cond, uncond, inner_steps=10, epsilon=1e-5):
        """Per-step null embeddings (each step starts from the previous step's result)."""
        torch, unet = self.t, self.pipe.unet
        nulls, x, taken = [], traj[-1], []
        u = uncond
        for i in range(self.steps):
            u = u.clone().detach().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            target, t = traj[len(traj) - i - 2], self.timesteps[i]
            with torch.no_grad():
                eps_c = unet(x, t, cond).sample
            j = 0
            for j in range(inner_steps):
                eps_u = unet(x, t, u).sample
                rec = self.prev_step(eps_u + self.g * (eps_c - eps_u), t, x)
                loss = torch.nn.functional.mse_loss(rec, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < epsilon + i * 2e-5:
                    break
            taken.append(j + 1)
            u = u.detach()
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
    def edit(self, z_T, nulls, cond, tgt, control, offsets=None, blend=None, pair=0):
        """Source and target branches sampled together under pair ``pair`` of the
        controller (and LocalBlend) data; returns their final latents."""
        torch = self.t
        x = torch.cat([z_T, z_T])
        self.set_control(control, pair)
        self.set_blend(blend, pair)
        acc, self.step_maps = 0.0, []
        try:
            for i, t in enumerate(self.timesteps):
                self.step = i
                eps = self.guided(x, t, torch.cat([nulls[i], nulls[i]]), torch.cat([cond, tgt]))
                x = self.scheduler.step(eps, t, x).prev_sample
                if offsets is not None:
                    x = torch.cat([x[:1] + offsets[i], x[1:]])
                if self.blend is not None:
                    x, acc = self._blend_step(x, acc)
        finally:
            self.set_control(None)
            self.set_blend(None)
        return x[:1], x[1:]

    def __call__(self, image_uint8, source, target, control, inversion="null_text",
                 inner_steps=10, blend=None, pair=0):
        """(source latent, target latent, inner Adam steps per timestep) of one edit, with
        pair ``pair`` of the controller / LocalBlend data."""
        if inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion {inversion!r}")
        cond, uncond, tgt = self.text([source]), self.text([""]), self.text([target])
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
        src, edit = self.edit(traj[-1], nulls, cond, tgt, control, offsets, blend, pair)
        return src, edit, taken
