"""Null-text inversion + Prompt-to-Prompt edit: seconds per image, jaxdiff vs PyTorch.

    python bench/edit_speed.py [--steps 50] [--batch 4] [--torch-threads 1]

Both sides run on the same random diffusers weights (bench/sample.py's "tiny" pipeline):
VAE encode -> DDIM inversion (conditional) -> null-text optimisation (guidance 7.5, Adam
lr 1e-2 (1 - i/100), up to 10 inner steps, early stop at 1e-5 + i 2e-5) -> P2P replace
edit (cross 0.8 / self 0.4 replace steps) sampling source and target together -> VAE
decode. The PyTorch side is a straightforward re-implementation of google/prompt-to-prompt's
``NullInversion`` (``null_text_w_ptp.ipynb``: ``ddim_loop``, ``null_optimization``) and of
its ``AttentionReplace`` controller as a diffusers attention processor, one image at a
time as the reference runs. jaxdiff edits ``--batch`` images in one program
(``p2p_pipeline.p2p_edit``) and also one at a time. Reported: seconds per image (median of
``--repeats`` after a warm-up; jaxdiff compile time separately), ``speedup`` = torch s/img
/ jaxdiff s/img, the mean null-text inner steps of both sides (the early stop makes the
work data dependent), and the max uint8 difference of the edited images (a sanity check:
Adam amplifies float32 round-off, so they agree only roughly).
GPU (SD 1.5, 512 px): not measured here (no GPU was lent to this task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SOURCE, TARGET = "a red ball", "a blue ball"


class TorchP2P:
    """The reference algorithm in PyTorch (one image per call)."""

    def __init__(self, torch, pipe, control, steps, guidance):
        self.t, self.pipe, self.steps, self.g = torch, pipe, steps, guidance
        sch = pipe.scheduler
        sch.set_timesteps(steps)
        self.timesteps = sch.timesteps
        self.ac = sch.alphas_cumprod
        self.final = sch.final_alpha_cumprod
        self.mapper = torch.from_numpy(np.asarray(control.cross_mapper[0]))
        self.alpha = torch.from_numpy(np.asarray(control.cross_alpha[:, 0]))
        self.self_steps = int(control.self_steps)
        self.step = 0
        procs = {name: self._processor() for name in pipe.unet.attn_processors}
        pipe.unet.set_attn_processor(procs)
        self.editing = False

    def _processor(self):
        torch, outer = self.t, self

        def proc(attn, hidden_states, encoder_hidden_states=None, **kw):
            cross = encoder_hidden_states is not None
            ctx = encoder_hidden_states if cross else hidden_states
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
            probs = attn.get_attention_scores(q, k, None)
            if outer.editing:  # batch [uncond src, uncond tgt, cond src, cond tgt]
                b = hidden_states.shape[0]
                p = probs.view(b, attn.heads, *probs.shape[1:]).clone()
                base, tgt = p[2], p[3]
                if cross:
                    a = outer.alpha[outer.step][None, None, :]
                    p[3] = torch.einsum("hqw,wk->hqk", base, outer.mapper) * a + tgt * (1 - a)
                elif outer.step < outer.self_steps and p.shape[2] <= 32 ** 2:
                    p[3] = base
                probs = p.view(probs.shape)
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
            return attn.to_out[1](attn.to_out[0](out))
        return proc

    def _alpha(self, t):
        return self.ac[t] if t >= 0 else self.final

    def _prev(self, eps, t, x):
        a, ap = self._alpha(t), self._alpha(t - 1000 // self.steps)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps

    def _next(self, eps, t, x):
        t, t_next = min(t - 1000 // self.steps, 999), t
        a, an = self._alpha(t), self.ac[t_next]
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return an ** 0.5 * x0 + (1 - an) ** 0.5 * eps

    def _text(self, prompts):
        tok = self.pipe.tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length,
                                  return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids)[0]

    def __call__(self, image_uint8, inner_steps=10, epsilon=1e-5):
        torch, unet, vae = self.t, self.pipe.unet, self.pipe.vae
        with torch.no_grad():
            img = torch.from_numpy(image_uint8).float().permute(2, 0, 1)[None] / 127.5 - 1
            z = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
            uncond, cond = self._text([""]), self._text([SOURCE])
            tgt = self._text([TARGET])
            traj = [z]
            for i in range(self.steps):  # ddim_loop
                t = self.timesteps[len(self.timesteps) - i - 1]
                z = self._next(unet(z, t, cond).sample, t, z)
                traj.append(z)
        nulls, x, taken = [], traj[-1], 0
        for i in range(self.steps):  # null_optimization
            u = uncond.clone().detach().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            target, t = traj[len(traj) - i - 2], self.timesteps[i]
            with torch.no_grad():
                eps_c = unet(x, t, cond).sample
            for _ in range(inner_steps):
                eps_u = unet(x, t, u).sample
                rec = self._prev(eps_u + self.g * (eps_c - eps_u), t, x)
                loss = torch.nn.functional.mse_loss(rec, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                taken += 1
                if loss.item() < epsilon + i * 2e-5:
                    break
            nulls.append(u.detach())
            with torch.no_grad():
                eps = unet(torch.cat([x, x]), t, torch.cat([u.detach(), cond])).sample
                eu, ec = eps.chunk(2)
                x = self._prev(eu + self.g * (ec - eu), t, x)
        self.editing = True
        try:
            with torch.no_grad():  # text2image_ldm_stable with the replace controller
                x = torch.cat([traj[-1], traj[-1]])
                for i, t in enumerate(self.timesteps):
                    self.step = i
                    ctx = torch.cat([nulls[i], nulls[i], cond, tgt])
                    eps = unet(torch.cat([x, x]), t, ctx).sample
                    eu, ec = eps.chunk(2)
                    x = self._prev(eu + self.g * (ec - eu), t, x)
                out = vae.decode(x / vae.config.scaling_factor).sample
        finally:
            self.editing = False
        imgs = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return imgs[1], imgs[0], taken / self.steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()

    import torch
    import sample  # bench/sample.py
    import jax
    from diffusers import StableDiffusionPipeline

    import jaxdiff
    from jaxdiff.editing import p2p_pipeline as pp, prompt_to_prompt as p2p

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    folder = tempfile.mkdtemp(prefix="edit_speed_")
    sample.build_pipeline("tiny", folder)
    tpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe, params = jaxdiff.load_pipeline(folder)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
    settings = pp.P2PSettings(inversion="null_text", steps=args.steps, guidance=args.guidance)
    control = p2p.make_control(pipe, [SOURCE], [TARGET], args.steps)
    ref = TorchP2P(torch, tpipe, control, args.steps, args.guidance)

    def jx(n):
        out = pp.p2p_edit(pipe, params, images[:n], [SOURCE] * n, [TARGET] * n, settings)
        jax.block_until_ready(out.edited)
        return out

    result = {"bench": "null_text_p2p_edit_speed", "size": "tiny", "side": side,
              "steps": args.steps, "batch": args.batch, "torch_threads": args.torch_threads,
              "jax_devices": str(jax.devices()[0])}
    for n, key in [(1, "single"), (args.batch, "batched")]:
        t0 = time.perf_counter()
        jx(n)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jx(n)
            times.append(time.perf_counter() - t0)
        result[f"jaxdiff_{key}_s_per_image"] = round(float(np.median(times)) / n, 3)
        result[f"jaxdiff_{key}_compile_s"] = round(first - float(np.median(times)), 1)
        result[f"jaxdiff_{key}_inner_steps_mean"] = round(float(out.inner_steps.mean()), 2)
    ttimes, diffs, inner = [], [], []
    for r in range(args.repeats):
        for i in range(args.batch):
            t0 = time.perf_counter()
            edit, rec, taken = ref(images[i])
            ttimes.append(time.perf_counter() - t0)
            inner.append(taken)
            if r == 0:
                diffs.append(int(np.abs(edit.astype(int) - out.edited[i]).max()))
    torch_s = float(np.median(ttimes))
    result.update(torch_s_per_image=round(torch_s, 3),
                  torch_inner_steps_mean=round(float(np.mean(inner)), 2),
                  speedup_single=round(torch_s / result["jaxdiff_single_s_per_image"], 2),
                  speedup_batched=round(torch_s / result["jaxdiff_batched_s_per_image"], 2),
                  edited_max_abs_diff_uint8=max(diffs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
