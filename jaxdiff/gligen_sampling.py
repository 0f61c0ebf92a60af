"""GLIGEN text-to-image sampling (boxes + phrases), one jitted program per shape.

As diffusers' ``StableDiffusionGLIGENPipeline`` (generation, no inpainting image): each
phrase is embedded by the text encoder's pooled output (the state at the end-of-text
token), every image has ``max_objs`` object slots (boxes, phrase embeddings, mask 1 for a
given object, 0 for an empty slot), the unconditional half of classifier-free guidance
sees only empty slots, and the gated fusers act for the first
``int(gligen_scheduled_sampling_beta * len(timesteps))`` evaluations, the plain UNet for
the rest. That count is a traced input: each fuser runs under ``lax.cond`` on it (the UNet's
``gligen["enabled"]``), so a new beta never recompiles and the fusers cost nothing after
the cut (the position net's few tokens are still computed).
Phrases, boxes, prompts, seeds and the guidance scale are traced too; a sequence of
guidance scales is one vmapped sweep. The initial noise is ``generate``'s
(``sampling.sample_keys`` / ``initial_noise``).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.guidance import cfg
from jaxdiff.models.clip_text import pool_at_eos
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers import make_sampler
from jaxdiff.sampling import check_request, initial_noise, prompt_list, sample_keys

MAX_OBJS = 30  # diffusers' pipeline pads every image to 30 object slots


def phrase_embeddings(pipe: Pipeline, params, phrase_ids):
    """Pooled text-encoder output of each phrase: ids [B, N, L] -> [B, N, D] (float32)."""
    b, n, length = phrase_ids.shape
    flat = phrase_ids.reshape(b * n, length)
    last = pipe.text_encoder.apply({"params": params["text_encoder"]}, flat)
    return pool_at_eos(last, flat, pipe.tokenizer.eos_token_id).reshape(b, n, -1)


def _program(pipe: Pipeline, sampler_name: str, steps: int, sweep: bool):
    unet = lambda p, x, t, c, **kw: pipe.unet.apply({"params": p}, x, t, c, **kw)

    def run(params, ids, neg_ids, phrase_ids, boxes, masks, noise, keys, scale, eta,
            n_ground):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        contexts = (pipe.encode_text(params, ids), pipe.encode_text(params, neg_ids))
        emb = phrase_embeddings(pipe, params, phrase_ids)
        gligen = dict(boxes=jnp.concatenate([boxes, boxes]),
                      positive_embeddings=jnp.concatenate([emb, emb]),
                      masks=jnp.concatenate([jnp.zeros_like(masks), masks]))

        def loop(s):
            # The step index decides the fusers (diffusers counts steps, not timesteps), so
            # not guided_sampling.scan_sampler, whose denoiser sees t only.
            def body(state, i):
                def denoise(x2, t, ctx):
                    return unet(params["unet"], x2, t, ctx,
                                gligen=dict(gligen, enabled=i < n_ground))
                out = cfg(denoise, s, None)(sampler.model_input(state, i),
                                            sampler.timesteps[i], contexts)
                eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                           noise.shape[1:]))(keys)
                return sampler.step(state, i, out, eps), None

            state = sampler.init(noise * sampler.init_noise_sigma)
            state, _ = jax.lax.scan(body, state, jnp.arange(len(sampler.timesteps)))
            return sampler.latents(state)

        latents = jax.vmap(loop)(scale) if sweep else loop(scale)
        flat = latents.reshape((-1,) + latents.shape[-3:])
        images = pipe.decode_latents(params, flat)
        return images.reshape(latents.shape[:-3] + images.shape[-3:]), latents

    return run


@functools.lru_cache(maxsize=16)
def _compiled(pipe: Pipeline, sampler_name: str, steps: int, sweep: bool, mesh):
    data, rep = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    out = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, parallel.DATA) if sweep else
        jax.sharding.PartitionSpec(parallel.DATA))
    return jax.jit(_program(pipe, sampler_name, steps, sweep),
                   in_shardings=(rep,) + (data,) * 7 + (rep,) * 3, out_shardings=(out, out))


def _coords(text: str):
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        return None
    return box if len(box) == 4 else None


def parse_box(text: str):
    """``"x0,y0,x1,y1:phrase"`` or ``"phrase:x0,y0,x1,y1"`` (fractions of the image) ->
    (phrase, box); one-line ValueError naming the text when it is malformed."""
    head, _, tail = text.partition(":")
    box, phrase = _coords(head), tail
    if box is None:
        head, _, tail = text.rpartition(":")
        box, phrase = _coords(tail), head
    if box is None or not phrase.strip():
        raise ValueError(f"--box {text!r}: expected 'x0,y0,x1,y1:phrase' (four fractions of "
                         "the image, then the phrase), e.g. '0.1,0.1,0.5,0.6:a red circle'.")
    check_box(box, repr(text))
    return phrase.strip(), box


def check_box(box, what: str) -> None:
    """One-line ValueError unless ``box`` is (x0, y0, x1, y1) inside [0, 1] with
    x0 < x1 and y0 < y1."""
    box = tuple(float(v) for v in box)
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"box {what}: {box} must be 4 fractions x0,y0,x1,y1 in [0, 1].")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"box {what}: {box} needs x0 < x1 and y0 < y1 (left, top, right, "
                         "bottom as fractions of the image).")


def grounding_inputs(pipe: Pipeline, phrases, boxes, b: int, max_objs: int = MAX_OBJS):
    """(phrase ids [b, max_objs, L], boxes [b, max_objs, 4], masks [b, max_objs]) from one
    list of phrases and boxes for every image, or one list per image; checked (one-line
    ValueError) before any compile."""
    per_image = len(phrases) > 0 and not isinstance(phrases[0], str)
    phrases = [list(p) for p in phrases] if per_image else [list(phrases)] * b
    boxes = [list(x) for x in boxes] if per_image else [list(boxes)] * b
    if len(phrases) != b or len(boxes) != b:
        raise ValueError(f"got phrases for {len(phrases)} and boxes for {len(boxes)} images "
                         f"for {b} prompts; give one list for all images or one per prompt.")
    empty = pipe.tokenize([""], warn=False)[0]
    ids = np.tile(empty, (b, max_objs, 1))
    xyxy = np.zeros((b, max_objs, 4), np.float32)
    masks = np.zeros((b, max_objs), np.float32)
    for k, (ps, bs) in enumerate(zip(phrases, boxes)):
        if len(ps) != len(bs):
            raise ValueError(f"image {k}: {len(ps)} phrases but {len(bs)} boxes; give one box "
                             "per phrase.")
        if len(ps) > max_objs:
            raise ValueError(f"image {k}: {len(ps)} objects; GLIGEN takes at most {max_objs}.")
        for j, box in enumerate(bs):
            check_box(box, f"{j} of image {k} ({ps[j]!r})")
        if ps:
            ids[k, :len(ps)] = pipe.tokenize(ps)
            xyxy[k, :len(ps)] = np.asarray(bs, np.float32)
            masks[k, :len(ps)] = 1.0
    return ids, xyxy, masks


def generate_gligen(pipe: Pipeline, params, prompts: Union[str, Sequence[str]],
                    phrases: Sequence, boxes: Sequence,
                    negative_prompts: Optional[Union[str, Sequence[str]]] = None,
                    sampler: str = "ddim", steps: int = 50,
                    guidance_scale: Union[float, Sequence[float]] = 7.5, seed: int = 0,
                    gligen_scheduled_sampling_beta: float = 0.3, latents=None,
                    height: Optional[int] = None, width: Optional[int] = None, eta: float = 0.0,
                    mesh=None, output: str = "uint8", max_objs: int = MAX_OBJS,
                    sample_offset: int = 0):
    """Generates images with GLIGEN grounding (the pipeline's UNet must be a GLIGEN UNet:
    ``attention_type="gated"``, e.g. ``weights.load_gligen_unet``).

    Args:
      phrases, boxes: one list for every image (``["a red circle"]``, ``[(x0, y0, x1,
        y1)]``: fractions of the image, as diffusers' ``gligen_phrases`` /
        ``gligen_boxes``), or one such list per prompt.
      gligen_scheduled_sampling_beta: fraction of the steps with the fusers on (traced).
      max_objs: object slots per image (static; diffusers' 30: other values change the
        result, the empty slots take part in the fusers' attention).
      Others as ``jaxdiff.generate`` (``latents``: initial noise [B, h, w, C], NHWC;
      ``sample_offset``: the first image's index in a job split into chunks).
    Returns:
      uint8 [B, H, W, 3] (a sweep: [S, B, H, W, 3]), or the final latents for
      ``output="latents"``.
    """
    attention_type = getattr(pipe.unet.config, "attention_type", None)
    if attention_type != "gated" or pipe.is_sdxl or pipe.is_transformer:
        raise ValueError(f"generate_gligen needs an SD 1.x/2.x GLIGEN UNet (attention_type="
                         f"'gated'); this pipeline's {type(pipe.unet).__name__} has "
                         f"attention_type={attention_type!r} (load one with --gligen).")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    negative = prompt_list(negative_prompts, b, "negative prompts")
    height = pipe.image_size if height is None else height
    width = pipe.image_size if width is None else width
    check_request(pipe, b, steps, height, width, sampler)
    beta = float(gligen_scheduled_sampling_beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gligen_scheduled_sampling_beta={beta} must be in [0, 1].")
    grounding = grounding_inputs(pipe, phrases, boxes, b, max_objs)
    mesh = mesh or parallel.make_mesh()
    n = parallel.padded_batch(b, mesh)
    sweep = not np.isscalar(guidance_scale) and np.ndim(guidance_scale) == 1
    shape = pipe.latent_shape(height, width)
    keys = sample_keys(seed, n, sample_offset)
    if latents is None:
        noise = initial_noise(keys, shape)
    else:
        noise = np.asarray(latents, np.float32)
        if noise.shape != (b,) + shape:
            raise ValueError(f"latents has shape {noise.shape}; expected {(b,) + shape} "
                             "(NHWC) for this batch and resolution.")
    evals = len(make_sampler(sampler, pipe.scheduler, int(steps)).timesteps)
    rows = parallel.pad_rows((pipe.tokenize(prompts), pipe.tokenize(negative)) + grounding
                             + (noise,), n)
    run = _compiled(pipe, sampler, int(steps), sweep, mesh)
    images, final = run(params, *rows, keys, jnp.asarray(guidance_scale, jnp.float32),
                        jnp.float32(eta), jnp.int32(int(beta * evals)))
    if output == "latents":
        return np.asarray(final)[..., :b, :, :, :]
    return to_uint8(np.asarray(images)[..., :b, :, :, :])
