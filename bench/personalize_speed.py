"""Train-step speed of personalization (the ``speed`` section of bench/personalize.py): one
DreamBooth step (batch 4 instance + 4 class, full UNet, AdamW) and one Textual Inversion
step (batch 4, one new row) in jaxdiff vs diffusers' PyTorch models on the same weights."""
from __future__ import annotations

import os
import time

import numpy as np


def step_speed(pipe, params, root, iters=10, torch_threads=1):
    """Seconds per DreamBooth train step: jaxdiff vs diffusers PyTorch (same weights)."""
    import jax
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(torch_threads)

    from jaxdiff.training import dreambooth as db
    from jaxdiff.training import state as state_lib
    from jaxdiff.training.optim import constant_adamw
    from jaxdiff.training.step import make_train_step
    b = 4
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(2 * b, 8, 8, 4)).astype(np.float32)
    ctx = np.asarray(pipe.encode_text(params, pipe.tokenize(["a sks circle", "a circle"])))
    batch = {"instance_latents": lat[:b], "instance_text": np.repeat(ctx[:1], b, 0),
             "class_latents": lat[b:], "class_text": np.repeat(ctx[1:], b, 0),
             "prior_weight": np.ones((b,), np.float32)}
    tr = db.make_trainable(params)
    opt = constant_adamw(1e-4)
    step = jax.jit(make_train_step(db.make_dreambooth_loss(
        pipe, tr.merge, train_text_encoder=False, prior_preservation=True), opt),
        donate_argnums=(0,))
    state = state_lib.create(jax.tree.map(np.array, tr.params), opt, ema=False)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(iters):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    jax_s = (time.perf_counter() - t) / iters

    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).train()
    topt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    x0 = torch.from_numpy(lat).permute(0, 3, 1, 2)
    c = torch.from_numpy(np.concatenate([batch["instance_text"], batch["class_text"]]))

    def tstep():
        noise = torch.randn_like(x0)
        tt = torch.randint(0, 1000, (2 * b,))
        a = alphas[tt].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, tt, c).sample
        inst, cls = pred.chunk(2)
        loss = (torch.nn.functional.mse_loss(inst, noise[:b])
                + torch.nn.functional.mse_loss(cls, noise[b:]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        topt.step()
        topt.zero_grad()

    torch_s = _seconds_per_call(tstep, iters)
    return dict(batch=f"{b} instance + {b} class, 8x8x4 latents", jax_step_s=jax_s,
                jax_compile_s=compile_s, torch_step_s=torch_s, torch_threads=torch.get_num_threads(),
                speed_ratio_jax_over_torch=torch_s / jax_s)


def _seconds_per_call(fn, iters):
    """Mean seconds of ``iters`` calls of ``fn()`` after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def ti_step_speed(pipe, params, root, iters=10, torch_threads=1):
    """Seconds per Textual Inversion step (batch 4, one new token): jaxdiff (grad w.r.t.
    the new row only, frozen encoder + UNet closed over) vs diffusers' textual_inversion
    example in PyTorch (the whole token-embedding matrix is the AdamW parameter, the other
    rows are restored after each step; text encoder and UNet frozen) on the same weights."""
    import dataclasses

    import jax
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    torch.set_num_threads(torch_threads)

    from jaxdiff.adapters import textual_inversion as ti
    from jaxdiff.training import state as state_lib
    from jaxdiff.training.optim import constant_adamw
    from jaxdiff.training.step import make_train_step
    from jaxdiff.training.textual_inversion import make_ti_loss
    b = 4
    tok = ti.add_tokens(pipe.tokenizer, "<s>", 1)
    ids = np.asarray(dataclasses.replace(pipe, tokenizer=tok).tokenize(["a <s>"] * b))
    lat = np.random.default_rng(0).normal(size=(b, 8, 8, 4)).astype(np.float32)
    rows0 = ti.init_embeddings(params, pipe.tokenizer, "circle", 1)
    opt = constant_adamw(5e-3)
    step = jax.jit(make_train_step(make_ti_loss(pipe, params, len(pipe.tokenizer)), opt),
                   donate_argnums=(0,))
    state = state_lib.create(np.asarray(rows0), opt, ema=False)
    t = time.perf_counter()
    state, m = step(state, (lat, ids))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(iters):
        state, m = step(state, (lat, ids))
    jax.block_until_ready(m)
    jax_s = (time.perf_counter() - t) / iters

    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"))
    text = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"),
                                         dtype=torch.float32)  # the folder may be float16
    text.resize_token_embeddings(len(tok))
    emb = text.get_input_embeddings().weight
    with torch.no_grad():
        emb[-1] = torch.tensor(np.array(rows0[0]))
    for p in list(unet.parameters()) + list(text.parameters()):
        p.requires_grad_(False)
    emb.requires_grad_(True)
    keep = emb.detach().clone()
    topt = torch.optim.AdamW([emb], lr=5e-3, weight_decay=1e-2)
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    x0, tids = torch.from_numpy(lat).permute(0, 3, 1, 2), torch.from_numpy(ids).long()

    def tstep():
        noise = torch.randn_like(x0)
        tt = torch.randint(0, 1000, (b,))
        a = alphas[tt].view(-1, 1, 1, 1)
        ctx = text(tids)[0]
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, tt, ctx).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        topt.step()
        topt.zero_grad()
        with torch.no_grad():  # only the new row may change
            emb[:-1] = keep[:-1]

    torch_s = _seconds_per_call(tstep, iters)
    return dict(batch=f"{b} prompts 'a <s>', 8x8x4 latents", jax_step_s=jax_s,
                jax_compile_s=compile_s, torch_step_s=torch_s,
                torch_threads=torch.get_num_threads(), speed_ratio_jax_over_torch=torch_s / jax_s)
