"""Training pairs for InstructPix2Pix: the world's exact renderer, or the base model's own
images under Prompt-to-Prompt filtered by the evaluator (Brooks et al. 2023 generate
theirs the same way: P2P pairs kept by a CLIP filter; ours keeps what the evaluator reads
right).

* ``p2p_pairs``: each (caption, edited caption) of a triple sampled by the base model
  from one noise with cross/self-attention injection (``_p2p_program``, one jitted program
  per step count), kept (``keep_pair``) when ``read_pair`` finds both scenes right and the
  region the edit must preserve unchanged to >= ``min_psnr`` dB.
* ``fill_from_renderer``: the generated pairs with every rejected triple's pair replaced
  by the renderer's exact one (P2P cannot move an object or repaint the background, so
  those kinds come mostly from the renderer).
* ``make_pairs``: ``config.data`` of ``configs/instruct_pix2pix.py`` -> {"source",
  "edited", "masks", "instruction", ...}, what ``instruct_pix2pix.train_instruct`` reads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data import instructions, shapes
from jaxdiff.denoiser import denoise
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.eval import shapes_eval
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers.ddim import ddim_tables

SOURCES = ("renderer", "p2p", "p2p+renderer")

# ------------------------------------------------------------ generated (P2P) pairs

@functools.lru_cache(maxsize=8)
def _p2p_program(pipe: Pipeline, steps: int):
    """Samples source and edited captions from the same noise under P2P control."""
    def run(params, z_T, src_ids, tgt_ids, empty_ids, control, guidance):
        tab = ddim_tables(pipe.scheduler, steps)
        unet = lambda x, t, c, ctrl=None: denoise(pipe, params["unet"], x, t, c, control=ctrl)
        h, w = (n * pipe.vae_scale_factor for n in z_T.shape[1:3])
        uncond = pipe.condition(params, empty_ids, h, w, negative=True)
        nulls = jax.tree.map(lambda u: jnp.broadcast_to(u, (steps,) + u.shape), uncond)
        out = p2p.edit_loop(unet, tab, z_T, pipe.condition(params, src_ids, h, w),
                            pipe.condition(params, tgt_ids, h, w), nulls, guidance, control,
                            pipe.scheduler.prediction_type)
        return pipe.decode_latents(params, out.source), pipe.decode_latents(params, out.target)
    return jax.jit(run)


def psnr(a, b, region) -> float:
    """PSNR (dB) of two uint8 images [H, W, 3] over a bool region [H, W] (inf if equal)."""
    if not region.any():
        return float("inf")
    err = np.mean((a[region].astype(np.float64) - b[region].astype(np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0 ** 2 / err))


def read_pair(spec: shapes.WorldSpec, triple, source_image, edited_image) -> dict:
    """The evaluator's verdict on an (source, edited) image pair for ``triple``:
    {"source_ok", "edit_ok": the images read as the source / edited scene, "psnr": over
    the region the edit must preserve, located from the evaluator's masks (nan when an
    image has the wrong object count), "masks": bool [H, W], where it finds an object in
    either image (``object_masks``)}."""
    src = shapes_eval.attribute_accuracy(source_image, triple.objects, spec, triple.background)
    dst = shapes_eval.attribute_accuracy(edited_image, triple.edited_objects, spec,
                                         triple.edited_background)
    found_src = [o["mask"] for o in shapes_eval.evaluate(source_image, spec)["objects"]]
    found_dst = [o["mask"] for o in shapes_eval.evaluate(edited_image, spec)["objects"]]
    out = {"source_ok": src["all"], "edit_ok": dst["all"], "psnr": float("nan"),
           "masks": _union(found_src + found_dst, source_image.shape[:2])}
    if src["count"] and dst["count"]:
        region = instructions.preserved_region(triple, np.stack(found_src), np.stack(found_dst))
        out["psnr"] = psnr(source_image, edited_image, region)
    return out


def _union(masks, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    for m in masks:
        out |= m
    return out


def object_masks(spec: shapes.WorldSpec, source_image, edited_image) -> np.ndarray:
    """bool [H, W]: where the evaluator finds an object in either image of a pair."""
    found = (shapes_eval.evaluate(source_image, spec)["objects"]
             + shapes_eval.evaluate(edited_image, spec)["objects"])
    return _union([o["mask"] for o in found], source_image.shape[:2])


def keep_pair(reading: dict, min_psnr: float = 25.0) -> bool:
    """The filter of generated pairs on a ``read_pair`` result: both scenes read right and
    the preserved region at >= ``min_psnr`` dB (False when it could not be located)."""
    return bool(reading["source_ok"] and reading["edit_ok"] and reading["psnr"] >= min_psnr)


def p2p_pairs(pipe: Pipeline, params, triples, *, seed: int = 0, steps: int = 20,
              guidance: float = 7.5, cross_replace_steps: float = 0.8,
              self_replace_steps: float = 0.4, min_psnr: float = 25.0,
              batch_size: int = 64, world: str = "v1") -> dict:
    """Generated pairs for ``triples``: each (caption, edited caption) sampled by the base
    model from one noise with Prompt-to-Prompt (replace mode: the captions differ by
    swapped words), kept when ``read_pair`` finds both scenes right and the preserved
    region at >= ``min_psnr`` dB (the evaluator reads them as scenes of ``world``, the
    triples' world). Returns {"source", "edited": uint8 [K, H, W, 3], "instruction": list,
    "masks": bool [K, H, W] (the evaluator's objects of either image), "triples": the
    kept triples, "kept": bool [N]}."""
    spec = shapes.world(world, image_size=pipe.image_size)
    run = _p2p_program(pipe, steps)
    empty = pipe.tokenize([""], warn=False)
    h = pipe.latent_shape(pipe.image_size, pipe.image_size)
    src_all, dst_all, kept, masks = [], [], [], []
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        n = len(chunk)
        caps, edits = [t.caption for t in chunk], [t.edited_caption for t in chunk]
        control = p2p.make_control(pipe, caps, edits, steps, mode="replace",
                                   cross_replace_steps=cross_replace_steps,
                                   self_replace_steps=self_replace_steps)
        z = jax.random.normal(jax.random.fold_in(jax.random.key(seed), start), (n,) + h)
        src, dst = run(params, z, pipe.tokenize(caps, warn=False),
                       pipe.tokenize(edits, warn=False), np.repeat(empty, n, 0), control,
                       jnp.float32(guidance))
        src, dst = to_uint8(src), to_uint8(dst)
        for t, a, b in zip(chunk, src, dst):
            reading = read_pair(spec, t, a, b)
            kept.append(keep_pair(reading, min_psnr))
            if kept[-1]:
                masks.append(reading["masks"])
        src_all.append(src)
        dst_all.append(dst)
    kept = np.array(kept, bool)
    src_all, dst_all = np.concatenate(src_all)[kept], np.concatenate(dst_all)[kept]
    keep_t = [t for t, k in zip(triples, kept) if k]
    masks = np.stack(masks) if masks else np.zeros((0,) + src_all.shape[1:3], bool)
    return {"source": src_all, "edited": dst_all, "masks": masks,
            "instruction": [t.instruction for t in keep_t], "triples": keep_t, "kept": kept}


def make_pairs(config, pipe: Pipeline, params) -> dict:
    """The training pairs of ``config.data`` (``source``: "renderer", "p2p" or
    "p2p+renderer"; ``p_two_objects``: the share of two-object source scenes, default the
    world's own)."""
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"config.data.source={d.source!r}; use one of {list(SOURCES)}.")
    spec = shapes.world(d.world, image_size=pipe.image_size)
    spec = dataclasses.replace(spec, p_two_objects=d.get("p_two_objects",
                                                          spec.p_two_objects))
    if d.source == "renderer":
        return instructions.renderer_dataset(config.seed, spec, d.num_pairs)
    ts = instructions.triples(config.seed, spec, d.num_pairs, "train")
    pairs = p2p_pairs(pipe, params, ts, seed=config.seed, world=d.world,
                      **config.p2p.to_dict())
    if d.source == "p2p":
        return pairs
    return fill_from_renderer(spec, ts, pairs)


def fill_from_renderer(spec: shapes.WorldSpec, triples, pairs: dict) -> dict:
    """``p2p_pairs``' result for ``triples`` with every rejected triple's pair replaced by
    the renderer's exact one (same order as ``triples``; ``"kept"``: bool [N], which pairs
    are the model's)."""
    kept = np.asarray(pairs["kept"], bool)
    src, dst, masks, k = [], [], [], 0
    for t, ok in zip(triples, kept):
        if ok:
            src.append(pairs["source"][k])
            dst.append(pairs["edited"][k])
            masks.append(pairs["masks"][k])
            k += 1
        else:
            a, b, m_a, m_b = instructions.render_pair(spec, t)
            src.append(a)
            dst.append(b)
            masks.append(m_a.any(0) | m_b.any(0))
    return {"source": np.stack(src), "edited": np.stack(dst), "masks": np.stack(masks),
            "instruction": [t.instruction for t in triples], "triples": list(triples),
            "kept": kept}
