"""Cost of one gradient-guided denoising step vs a CFG step: jaxdiff vs PyTorch, same weights.

    python bench/guided_step.py [--batch 4] [--repeats 5] [--t 500] [--out results.json]

On the embedded shapes model (``jaxdiff/assets/shapes``, read by diffusers' PyTorch
``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers' ``CLIPTextModel`` from the
same files), the shipped noisy classifier (``jaxdiff/assets/shapes_classifier``, ported to
PyTorch below with diffusers' blocks and its weights) and the shipped CLIP
(``jaxdiff/assets/clip_shapes``, transformers' ``CLIPModel``), one step's model output at
the same x_t, t and prompts, three ways in each library:

* ``cfg``: classifier-free guidance, one UNet call on the [uncond; cond] batch;
* ``classifier``: the unconditional model (empty prompt), one UNet call plus the gradient
  of the classifier's log p(colour, shape | x_t) (Dhariwal & Nichol): ``eps - s sqrt(1 -
  abar) grad``;
* ``clip_x0``: semantic guidance on the predicted x0 (the UNet call, x0, VAE decode, CLIP
  image embedding, cosine with a text embedding, and the gradient of all that w.r.t. x_t).

jaxdiff runs ``guidance.cfg`` / ``guidance.classifier`` / ``clip_guidance.clip_guided`` each
as one jitted function; PyTorch the same algebra with ``torch.autograd.grad`` (no_grad for
the CFG step). Prints one JSON object: seconds per step (median of ``--repeats`` interleaved
calls after a warm-up), ``*_vs_cfg`` ratios in each library, ``jaxdiff_vs_torch`` per step
kind (torch seconds / jaxdiff seconds: > 1 means jaxdiff is faster), the max |jaxdiff - torch|
of each step's guided output (the implementations agree) and ``effect_*``, the max
|guided - unguided| of the output (the guidance is not negligible, so the agreement says
something).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np

CLIP_TEXT = "a red star"
LABELS = {"colour": 0, "shape": 4}   # red, star
PROMPT = "a red star"


# --- jaxdiff: the library's wrappers, one jitted program per step kind -------------------

@functools.lru_cache(maxsize=4)
def _jax_steps(pipe, clf, clip):
    import jax

    from jaxdiff import guidance, schedules
    from jaxdiff.clip_guidance import clip_guided, similarity_x0
    from jaxdiff.guided_sampling import label_log_prob
    from jaxdiff.denoiser import denoise

    ac = schedules.alphas_cumprod(pipe.scheduler)
    pt = pipe.scheduler.prediction_type

    def cfg_step(params, x, t, cond, uncond, scale):
        unet = lambda x, t, c: denoise(pipe, params["unet"], x, t, c)
        return guidance.cfg(unet, scale)(x, t, (cond, uncond))

    def classifier_step(params, clf_params, x, t, uncond, labels, scale):
        unet = lambda x, t, c: denoise(pipe, params["unet"], x, t, c)
        grad = guidance.classifier_grad(label_log_prob(clf, clf_params, labels))
        return guidance.classifier(unet, grad, scale, ac, pt)(x, t, uncond)

    def clip_step(params, clip_params, x, t, uncond, target, scale):
        unet = lambda x, t, c: denoise(pipe, params["unet"], x, t, c)
        log_p = similarity_x0(clip, clip_params, target, lambda x, t: unet(x, t, uncond),
                              lambda z: pipe.decode_latents(params, z), ac, pt)
        return clip_guided(unet, log_p, scale, ac, pt)(x, t, uncond)

    return jax.jit(cfg_step), jax.jit(classifier_step), jax.jit(clip_step)


# --- PyTorch: the same steps ---------------------------------------------------------------

def torch_classifier(clf, clf_params):
    """The shipped ``NoisyClassifier`` as a PyTorch module (diffusers' blocks), its weights."""
    import torch
    from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D
    from flax import traverse_util

    cfg = clf.config
    width, last = cfg.block_out_channels[0], len(cfg.block_out_channels) - 1

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.time_embedding = TimestepEmbedding(width, 4 * width)
            self.conv_in = torch.nn.Conv2d(cfg.in_channels, width, 3, padding=1)
            blocks, prev = {}, width
            for i, ch in enumerate(cfg.block_out_channels):
                for j in range(cfg.layers_per_block):
                    blocks[f"down_{i}_resnet_{j}"] = ResnetBlock2D(
                        in_channels=prev, out_channels=ch, temb_channels=4 * width,
                        groups=cfg.norm_num_groups, eps=1e-5)
                    prev = ch
                if i < last:
                    blocks[f"down_{i}_downsample"] = Downsample2D(ch, use_conv=True,
                                                                  out_channels=ch, padding=1)
            blocks["mid_resnet"] = ResnetBlock2D(in_channels=prev, out_channels=prev,
                                                 temb_channels=4 * width,
                                                 groups=cfg.norm_num_groups, eps=1e-5)
            self.blocks = torch.nn.ModuleDict(blocks)
            self.norm_out = torch.nn.GroupNorm(cfg.norm_num_groups, prev, eps=1e-6)
            self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(prev, k) for n, k in cfg.heads})

        def forward(self, x, t):   # x NCHW
            temb = get_timestep_embedding(t, width, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)
            temb = self.time_embedding(temb)
            h = self.conv_in(x)
            for name, block in self.blocks.items():
                h = block(h) if "downsample" in name else block(h, temb)
            h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
            return {n: head(h) for n, head in self.heads.items()}

    model = Classifier()
    state = {}
    for path, v in traverse_util.flatten_dict(clf_params).items():
        v = np.asarray(v, np.float32)
        top = path[0]
        if top.startswith(("down_", "mid_")):
            name = "blocks." + top + "." + ".".join(path[1:-1])
        elif top.startswith("head_"):
            name = "heads." + top[len("head_"):]
        else:
            name = ".".join(path[:-1])
        leaf = path[-1]
        if leaf == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            leaf = "weight"
        elif leaf == "scale":
            leaf = "weight"
        state[f"{name}.{leaf}"] = torch.from_numpy(np.ascontiguousarray(v))
        if name.endswith("_downsample.conv"):   # diffusers keeps an alias of the same conv
            state[f"{name[:-len('conv')]}Conv2d_0.{leaf}"] = state[f"{name}.{leaf}"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"classifier port: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _features(out):
    """transformers' get_*_features: a tensor, or (newer versions) an output whose
    ``pooler_output`` holds the projected features."""
    return out if hasattr(out, "norm") else out.pooler_output


def torch_steps(folder, clip_folder, tclf):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    clip = CLIPModel.from_pretrained(clip_folder, dtype=torch.float32).eval()
    for m in (unet, vae, clip, tclf):
        m.requires_grad_(False)
    sf = vae.config.scaling_factor

    def cfg_step(x, t, cond, uncond, scale):
        with torch.no_grad():
            out = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
            u, c = out.chunk(2)
            return u + scale * (c - u)

    def classifier_step(x, t, uncond, labels, scale, a):
        x = x.detach().requires_grad_(True)
        logits = tclf(x, t.expand(x.shape[0]))
        log_p = sum(torch.log_softmax(logits[h], -1)[:, y].sum() for h, y in labels.items())
        (grad,) = torch.autograd.grad(log_p, x)
        with torch.no_grad():
            eps = unet(x.detach(), t, uncond).sample
            return eps - scale * (1 - a) ** 0.5 * grad

    def clip_step(x, t, uncond, target, scale, a, mean, std):
        x = x.detach().requires_grad_(True)
        eps = unet(x, t, uncond).sample
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        image = vae.decode(x0 / sf).sample.clamp(-1, 1)
        emb = _features(clip.get_image_features(pixel_values=((image + 1) / 2 - mean) / std))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        (grad,) = torch.autograd.grad((emb * target).sum(), x)
        return eps.detach() - scale * (1 - a) ** 0.5 * grad

    def text_target(ids):
        with torch.no_grad():
            e = _features(clip.get_text_features(input_ids=ids))
            return e / e.norm(dim=-1, keepdim=True)

    return cfg_step, classifier_step, clip_step, text_target


def _interleaved(fns, repeats):
    times = {name: [] for name in fns}
    last = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}, last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per step kind")
    p.add_argument("--t", type=int, default=500, help="timestep of the step (default 500)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5)")
    p.add_argument("--classifier-scale", type=float, default=10.0)
    p.add_argument("--clip-scale", type=float, default=100.0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    import jaxdiff
    from jaxdiff import schedules
    from jaxdiff.clip_guidance import text_target
    from jaxdiff.data.images import write_json
    from jaxdiff.models.noisy_classifier import load_classifier
    from jaxdiff.weights import DEFAULT_MODEL
    from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pipe, params = jaxdiff.load_pipeline(None)
    clf, clf_params = load_classifier(None)
    clip, clip_params = load_clip(SHAPES_CLIP)
    tclf = torch_classifier(clf, clf_params)
    t_cfg, t_clf, t_clip, t_text = torch_steps(DEFAULT_MODEL, SHAPES_CLIP, tclf)
    j_cfg, j_clf, j_clip = _jax_steps(pipe, clf, clip)

    b = args.batch
    x = np.random.default_rng(0).standard_normal((b,) + pipe.latent_shape(
        pipe.image_size, pipe.image_size)).astype(np.float32)
    a = float(schedules.alphas_cumprod(pipe.scheduler)[args.t])
    ids, neg = pipe.tokenize([PROMPT] * b), pipe.tokenize([""] * b)
    cond, uncond = pipe.encode_text(params, ids), pipe.encode_text(params, neg)
    clip_ids = clip.tokenize([CLIP_TEXT] * b)
    target = text_target(clip, clip_params, jnp.asarray(clip_ids))
    labels = {h: jnp.full((b,), y, jnp.int32) for h, y in LABELS.items()}
    xj, tj = jnp.asarray(x), jnp.int32(args.t)   # one timestep, as in the sampler loop
    s_cfg, s_clf, s_clip = (jnp.float32(v) for v in (args.guidance, args.classifier_scale,
                                                     args.clip_scale))

    def nchw(v):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(v).transpose(0, 3, 1, 2)))
    from transformers import CLIPTextModel
    tenc = CLIPTextModel.from_pretrained(DEFAULT_MODEL, subfolder="text_encoder",
                                         dtype=torch.float32).eval()  # stored in float16
    with torch.no_grad():
        tcond = tenc(torch.from_numpy(np.asarray(ids)).long()).last_hidden_state
        tuncond = tenc(torch.from_numpy(np.asarray(neg)).long()).last_hidden_state
    xt, tt = nchw(x), torch.tensor(args.t)
    ttarget = t_text(torch.from_numpy(np.asarray(clip_ids)).long())
    tlabels = dict(LABELS)
    mean = torch.tensor(clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std).view(1, 3, 1, 1)

    fns = {
        "jaxdiff_cfg": lambda: j_cfg(params, xj, tj, cond, uncond, s_cfg).block_until_ready(),
        "torch_cfg": lambda: t_cfg(xt, tt, tcond, tuncond, args.guidance),
        "jaxdiff_classifier": lambda: j_clf(params, clf_params, xj, tj, uncond, labels,
                                            s_clf).block_until_ready(),
        "torch_classifier": lambda: t_clf(xt, tt, tuncond, tlabels, args.classifier_scale, a),
        "jaxdiff_clip_x0": lambda: j_clip(params, clip_params, xj, tj, uncond, target,
                                          s_clip).block_until_ready(),
        "torch_clip_x0": lambda: t_clip(xt, tt, tuncond, ttarget, args.clip_scale, a, mean,
                                        std),
    }
    t0 = time.perf_counter()
    first = {k: f() for k, f in fns.items()}   # warm-up (jaxdiff: compiles)
    warm_s = time.perf_counter() - t0
    med, last = _interleaved(fns, args.repeats)
    row = dict(bench="guided_step", model="embedded:shapes", batch=b, t=args.t,
               guidance=args.guidance, classifier_scale=args.classifier_scale,
               clip_scale=args.clip_scale, device=jax.devices()[0].platform,
               torch_threads=torch.get_num_threads(), repeats=args.repeats)
    with torch.no_grad():   # the unguided output: how far each guidance moves it
        plain = t_cfg(xt, tt, tuncond, tuncond, 1.0).numpy().transpose(0, 2, 3, 1)
    for kind in ("cfg", "classifier", "clip_x0"):
        j, t = med[f"jaxdiff_{kind}"], med[f"torch_{kind}"]
        want = last[f"torch_{kind}"].numpy().transpose(0, 2, 3, 1)
        got = np.asarray(first[f"jaxdiff_{kind}"])
        row.update({f"jaxdiff_{kind}_s": round(j, 5), f"torch_{kind}_s": round(t, 5),
                    f"jaxdiff_vs_torch_{kind}": round(t / j, 3),
                    f"max_abs_diff_{kind}": float(f"{np.abs(got - want).max():.3g}"),
                    f"effect_{kind}": float(f"{np.abs(want - plain).max():.3g}")})
    for kind in ("classifier", "clip_x0"):
        for lib in ("jaxdiff", "torch"):
            row[f"{lib}_{kind}_vs_cfg"] = round(med[f"{lib}_{kind}"] / med[f"{lib}_cfg"], 3)
    row["warmup_s"] = round(warm_s, 1)
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row, indent=1))
    if args.out:
        write_json(args.out, row)
    return row


if __name__ == "__main__":
    main()
