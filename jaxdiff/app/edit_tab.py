"""The Edit tab: uploads -> one of the edit methods the ``edit/`` commands run -> one
panel per image (input | reconstruction | edit, and the mask where one is used).

Uploads are ``gr.File`` (the browser sends bytes; nothing is decoded before
``limits.decode_uploads`` checks size and pixel count). All uploads of a request are one
batch through the method's compiled program. Masks for blended / RePaint (optional for
DiffEdit) are drawn with ``gr.ImageEditor`` over the first upload: every brush stroke
marks the region to edit, and the same mask is used for every image. The model list is
the Generate tab's (the server's model and finished Personalize jobs). The progress bar
counts UNet evaluations (``app.progress``); their total for a request of the same method,
settings and batch size is the count of the last such request (the warm-up's for the
defaults), since inversions and null-text optimisation (early stop) vary.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import gradio as gr
import numpy as np
from PIL import Image

from jaxdiff.app.limits import decode_uploads, editor_mask
from jaxdiff.app.progress import run_with_progress
from jaxdiff.app.state import AppState
from jaxdiff.data.images import InputError, make_panel
from jaxdiff.editing import blended, diffedit, ilvr, p2p_pipeline, repaint, sdedit
from jaxdiff.editing.p2p_pipeline import INVERSIONS, P2PSettings
from jaxdiff.pipeline import from_uint8, to_uint8

METHODS = {  # name -> (label, mask: "none" | "optional" | "required")
    "p2p": ("Prompt-to-Prompt (after inversion)", "none"),
    "diffedit": ("DiffEdit (automatic mask)", "optional"),
    "sdedit": ("SDEdit / img2img", "none"),
    "blended": ("Blended latent diffusion (drawn mask)", "required"),
    "repaint": ("RePaint (drawn mask)", "required"),
    "ilvr": ("ILVR (low-pass guidance)", "none"),
}
# Which option controls each method shows (the rest are hidden).
OPTIONS = {
    "p2p": ("inversion", "mode", "cross", "self_", "blend_words"),
    "diffedit": ("strength",),
    "sdedit": ("strength",),
    "blended": ("blending",),
    "repaint": ("jump_length", "jump_n"),
    "ilvr": ("factor",),
}
EDITOR_SIDE = 256  # the mask canvas: the first upload shown at least this large


@dataclasses.dataclass
class EditRequest:
    method: str
    source: str
    target: str
    negative: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    inversion: str = "null_text"
    mode: str = "replace"
    cross: float = 0.8
    self_: float = 0.4
    blend_words: str = ""
    strength: float = 0.8
    blending: float = 0.25
    jump_length: int = 5
    jump_n: int = 2
    factor: int = 2


def run_method(state: AppState, images: np.ndarray, mask: Optional[np.ndarray],
               r: EditRequest, model: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The library call of one method on a batch with ``model`` (a name from
    ``state.model_choices()``; None: the server's): {"edited", "reconstruction": uint8
    [B, H, W, 3], "mask": bool [B, H, W] or absent}."""
    pipe, params, expand = state.resolve_model(model)
    b = images.shape[0]
    r = dataclasses.replace(r, source=expand(r.source), target=expand(r.target),
                            negative=expand(r.negative))
    x = from_uint8(images)
    masks = None if mask is None else np.broadcast_to(mask, (b,) + mask.shape)
    common = dict(steps=r.steps, guidance_scale=r.guidance, seed=r.seed)
    if r.method == "p2p":
        words = r.blend_words.split() or None
        settings = P2PSettings(inversion=r.inversion, mode=r.mode, steps=r.steps,
                               guidance=r.guidance, cross_replace_steps=r.cross,
                               self_replace_steps=r.self_, blend_words=words)
        res = p2p_pipeline.p2p_edit(pipe, params, images, [r.source] * b, [r.target] * b,
                                    settings)
        out = dict(edited=res.edited, reconstruction=res.reconstruction)
        if words:
            out["latent_mask"] = res.mask
    elif r.method == "diffedit":
        out = diffedit.diffedit(pipe, params, x, r.source, r.target, r.negative or None,
                                masks=masks, strength=r.strength, **common)
    elif r.method == "sdedit":
        out = sdedit.sdedit(pipe, params, x, r.target, r.negative or None,
                            strength=r.strength, **common)
    elif r.method == "blended":
        out = blended.blended(pipe, params, x, masks, r.target, r.negative or None,
                              blending_percentage=r.blending, **common)
    elif r.method == "repaint":
        out = repaint.repaint(pipe, params, x, masks, r.target, r.negative or None,
                              jump_length=r.jump_length, jump_n_sample=r.jump_n, **common)
    elif r.method == "ilvr":
        out = ilvr.ilvr(pipe, params, x, r.target, r.negative or None, factor=r.factor,
                        **common)
    else:
        raise InputError(f"unknown edit method {r.method!r}; pick one from the list.")
    result = {k: _uint8(out[k]) for k in ("edited", "reconstruction")}
    if "latent_mask" in out:
        lm = np.asarray(out["latent_mask"]) > 0.5
        up = images.shape[1] // lm.shape[1]
        result["mask"] = lm.repeat(up, 1).repeat(up, 2)
    return result


def _uint8(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.uint8 else to_uint8(x)


def check_request(r: EditRequest, mask: Optional[np.ndarray]):
    """One-line InputError for a request that cannot run (before anything compiles)."""
    if r.method not in METHODS:
        raise InputError(f"unknown edit method {r.method!r}; pick one from the list.")
    if not r.target.strip() and not (r.method == "p2p" and r.mode == "reweight"):
        raise InputError("the target prompt is empty; describe the edited image.")
    if r.method in ("p2p", "diffedit") and not r.source.strip():
        raise InputError(f"{r.method} needs a source prompt (a caption of the upload).")
    if METHODS[r.method][1] == "required" and mask is None:
        raise InputError(f"{r.method} needs a mask: paint the region to edit on the mask "
                         "canvas.")
    if r.steps < 1:
        raise InputError(f"steps must be >= 1, got {r.steps}.")


def evals_key(r: EditRequest, batch: int, model: Optional[str]):
    """What fixes a request's number of UNet evaluations (not prompts, guidance, seed)."""
    fixed = {k: v for k, v in dataclasses.asdict(r).items()
             if k not in ("source", "target", "negative", "guidance", "seed", "blend_words")}
    return (model, batch, bool(r.blend_words.split())) + tuple(sorted(fixed.items()))


def run_edit(state: AppState, files, editor, *values, model=None, progress=None):
    """One Edit request: returns ([(panel path, caption)], status line). ``model``: a name
    from ``state.model_choices()``; ``progress``: as ``generate_tab.run_generate``'s."""
    r = EditRequest(*values)
    r = dataclasses.replace(r, steps=int(r.steps), seed=int(r.seed),
                            jump_length=int(r.jump_length), jump_n=int(r.jump_n),
                            factor=int(r.factor))
    paths = [f if isinstance(f, str) else getattr(f, "name", None) for f in (files or [])]
    side = state.image_size
    images = decode_uploads(paths, (side, side), state.limits)
    mask = editor_mask(editor, side) if METHODS.get(r.method, ("", "none"))[1] != "none" else None
    check_request(r, mask)
    call = lambda: state.timed(f"edit {r.method}", run_method, state, images, mask, r, model)
    with state.device:
        if progress is None:
            out, info = call()
        else:
            key = evals_key(r, images.shape[0], model or state.model_name)
            (out, info), evals = run_with_progress(call, progress, state.totals.get(key))
            state.totals.put(key, evals)
    files_out, captions = [], []
    for i in range(images.shape[0]):
        parts = [images[i], out["reconstruction"][i], out["edited"][i]]
        if "mask" in out:
            parts.append(np.repeat(out["mask"][i][..., None] * 255, 3, -1).astype(np.uint8))
        files_out.append((f"panel_{i:02d}.png", make_panel(parts), dict(index=i)))
        captions.append("input | reconstruction | edit" + (" | mask" if "mask" in out else ""))
    record = dict(dataclasses.asdict(r), model=model or state.model_name)
    paths = state.write_results("edit", files_out, record)
    status = (f"{r.method}: {images.shape[0]} image(s) in {info['seconds']:.2f} s; "
              f"{info['compiled']} program(s) compiled"
              f"{' (cached)' if not info['compiled'] else ''}")
    return list(zip(paths, captions)), status


def show_upload(state: AppState, files):
    """The first upload, checked and decoded, as the mask canvas background."""
    paths = [f if isinstance(f, str) else getattr(f, "name", None) for f in (files or [])]
    if not paths:
        return None
    image = decode_uploads(paths[:1], (state.image_size, state.image_size), state.limits)[0]
    up = max(1, EDITOR_SIDE // image.shape[0])
    big = image.repeat(up, 0).repeat(up, 1)
    return dict(background=big, layers=[], composite=big)


def build(state: AppState, report_errors):
    """The tab's components and events (inside an open ``gr.Blocks``); returns its model
    list (refreshed when a Personalize job finishes)."""
    d = EditRequest("p2p", "a red circle", "a blue circle")
    with gr.Tab("Edit", id="edit"):
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(file_count="multiple", label="Images (one or several)",
                                elem_id="edit-files")
                model = gr.Dropdown(state.model_choices(), value=state.model_name,
                                    label="Model (the server's, or a finished Personalize job)",
                                    elem_id="edit-model")
                method = gr.Dropdown([(label, name) for name, (label, _) in METHODS.items()],
                                     value=d.method, label="Method", elem_id="edit-method")
                source = gr.Textbox(d.source, label="Source prompt (caption of the upload)",
                                    elem_id="edit-source")
                target = gr.Textbox(d.target, label="Target prompt", elem_id="edit-target")
                negative = gr.Textbox("", label="Negative prompt", visible=False)
                with gr.Row():
                    steps = gr.Slider(1, 100, d.steps, step=1, label="Steps", elem_id="edit-steps")
                    guidance = gr.Slider(0, 15, d.guidance, step=0.5, label="Guidance")
                    seed = gr.Number(d.seed, precision=0, label="Seed")
                hidden = dict(visible=False)
                opts = dict(
                    inversion=gr.Dropdown(list(INVERSIONS), value=d.inversion,
                                          label="Inversion"),
                    mode=gr.Dropdown(list(p2p_pipeline.MODES), value=d.mode, label="P2P mode"),
                    cross=gr.Slider(0, 1, d.cross, step=0.05, label="Cross-attention steps"),
                    self_=gr.Slider(0, 1, d.self_, step=0.05, label="Self-attention steps"),
                    blend_words=gr.Textbox("", label="LocalBlend words (empty = off)"),
                    strength=gr.Slider(0, 1, d.strength, step=0.05, label="Strength", **hidden),
                    blending=gr.Slider(0, 0.95, d.blending, step=0.05,
                                       label="Blending percentage", **hidden),
                    jump_length=gr.Slider(1, 20, d.jump_length, step=1, label="Jump length",
                                          **hidden),
                    jump_n=gr.Slider(1, 20, d.jump_n, step=1, label="Resamplings per jump",
                                     **hidden),
                    factor=gr.Slider(1, 8, d.factor, step=1,
                                     label="Low-pass factor (latent cells)", **hidden))
                for name, component in opts.items():  # #edit-inversion, #edit-jump-length ...
                    component.elem_id = "edit-" + name.rstrip("_").replace("_", "-")
                mask = gr.ImageEditor(label="Mask: paint the region to edit (blended, RePaint; "
                                      "optional for DiffEdit)", type="numpy",
                                      brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                      sources=(), transforms=(),  # a canvas over our upload
                                      visible=False, elem_id="edit-mask")
                button = gr.Button("Edit", variant="primary", elem_id="edit-run")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="input | reconstruction | edit (| mask)", columns=1,
                                     format="png", elem_id="edit-gallery", object_fit="contain")
                status = gr.Markdown(elem_id="edit-status")

        def on_method(name):
            shown = OPTIONS.get(name, ())
            return ([gr.update(visible=k in shown) for k in opts]
                    + [gr.update(visible=METHODS[name][1] != "none"),
                       gr.update(visible=name in ("p2p", "diffedit"))])

        method.change(on_method, [method], list(opts.values()) + [mask, source])
        files.upload(report_errors(lambda f: show_upload(state, f), outputs=1), [files], [mask])
        names = [f.name for f in dataclasses.fields(EditRequest)]
        inputs = dict(method=method, source=source, target=target, negative=negative,
                      steps=steps, guidance=guidance, seed=seed, **opts)
        def edit(files, editor, model, method, source, target, negative, steps, guidance,
                 seed, inversion, mode, cross, self_, blend_words, strength, blending,
                 jump_length, jump_n, factor, progress=gr.Progress()):  # EditRequest's order
            return run_edit(state, files, editor, method, source, target, negative, steps,
                            guidance, seed, inversion, mode, cross, self_, blend_words,
                            strength, blending, jump_length, jump_n, factor, model=model,
                            progress=progress)

        button.click(report_errors(edit), [files, mask, model] + [inputs[n] for n in names],
                     [gallery, status], concurrency_id="device", api_name="edit")
        return model
