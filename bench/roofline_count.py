"""bench/roofline.py's hand counts: FLOPs (2 per multiply-add) of the convolutions and
matmuls of one denoiser call, from the architecture alone, to check XLA's cost analysis.

``unet_flops``: diffusers' SD 1.x / 2.x / SDXL UNet; ``transformer_flops``: DiT (adaLN-Zero)
and PixArt (adaLN-single, cross-attention, caption projection) transformers. Elementwise
work (norms, activations, softmax, modulation) is not counted.
"""
from __future__ import annotations

from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig

# --- The hand count (convolutions and matmuls only; elementwise work not counted). ---


def _conv(b, taps, cin, cout):
    """FLOPs of a convolution with ``taps`` (output pixel, kernel tap) pairs per image."""
    return 2 * b * taps * cin * cout


def _taps(n, kind, padded):
    """(output pixel, kernel tap) pairs along one axis of input length ``n``: "same" 3x3,
    "down" (stride 2), "up" (3x3 after nearest 2x) or "subpixel" (XLA:CPU's 2x2 phases);
    ``padded=False`` leaves out taps on zero padding (XLA's cost analysis does)."""
    full, pad = {"same": (3 * n, 2), "down": (3 * (n // 2), 1), "up": (6 * n, 2),
                 "subpixel": (4 * n, 2)}[kind]
    return full if padded else full - pad


def _resnet(b, h, w, cin, cout, temb, padded):
    t = _taps(h, "same", padded) * _taps(w, "same", padded)
    f = _conv(b, t, cin, cout) + _conv(b, t, cout, cout) + 2 * b * temb * cout
    return f + (_conv(b, h * w, cin, cout) if cin != cout else 0)


def _transformer(b, hw, c, heads, dh, layers, ctx_len, ctx_dim):
    inner = heads * dh
    f = _conv(b, hw, c, inner) + _conv(b, hw, inner, c)                 # proj_in / proj_out
    per = (4 * _conv(b, hw, inner, inner) + 4 * b * hw * hw * inner      # self-attention
           + 2 * _conv(b, hw, inner, inner) + 2 * _conv(b, ctx_len, ctx_dim, inner)
           + 4 * b * hw * ctx_len * inner                                # cross-attention
           + _conv(b, hw, inner, 8 * inner) + _conv(b, hw, 4 * inner, inner))  # GEGLU
    return f + layers * per


def unet_flops(cfg: UNetConfig, b: int, h: int, w: int, ctx_len: int,
               subpixel_upsample: bool = False, padded: bool = True) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and matmuls of one UNet call on
    latents [b, h, w, in_channels] and a context of ``ctx_len`` tokens, counted from the
    architecture (diffusers' SD 1.x / 2.x / SDXL UNet). ``subpixel_upsample``: count the 2x
    upsampling convolutions as XLA:CPU runs them (4 taps per output pixel, not 9);
    ``padded=False``: leave out kernel taps that fall on zero padding, as XLA counts."""
    boc, temb = cfg.block_out_channels, 4 * cfg.block_out_channels[0]
    conv3 = lambda kind, y, x: _taps(y, kind, padded) * _taps(x, kind, padded)
    f = 2 * b * (boc[0] * temb + temb * temb)                            # time embedding
    if getattr(cfg, "text_time", False):                                 # SDXL add_embedding
        f += 2 * b * (cfg.projection_class_embeddings_input_dim * temb + temb * temb)
    f += _conv(b, conv3("same", h, w), cfg.in_channels, boc[0])          # conv_in
    c, skips = boc[0], [boc[0]]
    model = UNet2DConditionModel(cfg)
    for st in model.plan():
        out = st["out_channels"]
        tr = lambda ch: _transformer(b, h * w, ch, st["heads"], ch // st["heads"],
                                     st["transformer_layers"], ctx_len, cfg.cross_attention_dim)
        if st["resample"] == "mid":
            f += 2 * _resnet(b, h, w, c, c, temb, padded) + tr(c)
            continue
        for _ in range(st["num_resnets"]):
            cin = c + (skips.pop() if st["name"].startswith("up") else 0)
            f += _resnet(b, h, w, cin, out, temb, padded) + (tr(out) if st["cross"] else 0)
            c = out
            if st["name"].startswith("down"):
                skips.append(c)
        if st["resample"] == "down":
            f += _conv(b, conv3("down", h, w), c, c)
            h, w = h // 2, w // 2
            skips.append(c)
        elif st["resample"] == "up":
            f += _conv(b, conv3("subpixel" if subpixel_upsample else "up", h, w), c, c)
            h, w = 2 * h, 2 * w
    return f + _conv(b, conv3("same", h, w), boc[0], cfg.out_channels)  # conv_out


def upsample_extra_flops(cfg: UNetConfig, b: int, h: int, w: int) -> int:
    """FLOPs an accelerator's 9-tap 2x upsampling convolutions add over XLA:CPU's 4-tap
    sub-pixel form, for one UNet call, counted as XLA does (no padding taps)."""
    return (unet_flops(cfg, b, h, w, 1, padded=False)
            - unet_flops(cfg, b, h, w, 1, subpixel_upsample=True, padded=False))



def transformer_flops(cfg, b: int, h: int, w: int, ctx_len: int = 0) -> int:
    """FLOPs of one DiT / PixArt transformer call on latents [b, h, w, in_channels] (and,
    for PixArt, ``ctx_len`` caption tokens of ``caption_channels``), matmuls and the patch
    convolution only. Per block on n = (h/p)(w/p) tokens of width d: q, k, v, out
    (4 n d²), scores and probs @ v (2 n² d), MLP (2 x 4 n d²); DiT: its own adaLN-Zero
    embedding per block (timestep MLP 256 -> d -> d, modulation d -> 6d, per image);
    PixArt: a cross-attention (q, out on n tokens, k, v on the caption: 2 n d² + 2 L d²,
    n L d twice) and one shared adaLN-single embedding."""
    p, d, cin, cout = cfg.patch_size, cfg.inner_dim, cfg.in_channels, cfg.output_channels
    n = (h // p) * (w // p)
    mm = lambda rows, k, m: 2 * b * rows * k * m      # [b, rows, k] @ [k, m]
    per = 4 * mm(n, d, d) + 2 * mm(n, n, d) + mm(n, d, 4 * d) + mm(n, 4 * d, d)
    f = mm(n, p * p * cin, d) + mm(n, d, p * p * cout)          # patch embed, proj_out
    temb = mm(1, 256, d) + mm(1, d, d)                             # timestep MLP
    if hasattr(cfg, "caption_channels"):                           # PixArt
        per += 2 * mm(n, d, d) + 2 * mm(ctx_len, d, d) + 2 * mm(n, ctx_len, d)
        f += temb + mm(1, d, 6 * d)                                # adaLN-single
        if getattr(cfg, "micro_conditions", False):
            f += mm(3, 256, d // 3) + mm(3, d // 3, d // 3)      # resolution (2), aspect
        if cfg.caption_channels is not None:
            f += mm(ctx_len, cfg.caption_channels, d) + mm(ctx_len, d, d)
    else:                                                          # DiT: per-block adaLN-Zero
        per += temb + mm(1, d, 6 * d)
        f += mm(1, d, 2 * d)                                       # proj_out_1
    return f + cfg.num_layers * per
