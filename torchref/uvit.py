"""A small PyTorch U-ViT (Bao et al. 2023), the reference for jaxdiff/models/uvit.py.

Written from the paper's reference code (github.com/baofff/U-ViT, ``libs/uvit_t2i.py`` and
``libs/uvit.py``): the same module names and token order, plain PyTorch math (no einops,
no xformers), so the reference checkpoints' keys load here with ``load_state_dict``.
Nothing is taken from jaxdiff. Used by tests/test_uvit.py.
"""
from __future__ import annotations

import math


def build(torch, *, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0,
          qkv_bias=False, mlp_time_embed=False, clip_dim=None, num_clip_token=77,
          num_classes=-1, conv=True, skip=True):
    """Returns a U-ViT ``torch.nn.Module``: ``forward(x NCHW, t [B], context=None, y=None)``."""
    nn = torch.nn

    def time_features(t, dim):  # cos first, frequencies exp(-ln(1e4) i / half)
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
            self.proj = nn.Linear(embed_dim, embed_dim)

        def forward(self, x):
            b, l, d = x.shape
            hd = d // num_heads
            q, k, v = self.qkv(x).reshape(b, l, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
            return self.proj((w @ v).transpose(1, 2).reshape(b, l, d))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(embed_dim, int(embed_dim * mlp_ratio))
            self.act = nn.GELU()
            self.fc2 = nn.Linear(int(embed_dim * mlp_ratio), embed_dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, with_skip=False):
            super().__init__()
            self.norm1 = nn.LayerNorm(embed_dim)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(embed_dim)
            self.mlp = Mlp()
            self.skip_linear = nn.Linear(2 * embed_dim, embed_dim) if with_skip else None

        def forward(self, x, skip_x=None):
            if self.skip_linear is not None:
                x = self.skip_linear(torch.cat([x, skip_x], dim=-1))
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class UViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                             nn.Linear(4 * embed_dim, embed_dim))
                               if mlp_time_embed else nn.Identity())
            if clip_dim is not None:
                self.context_embed = nn.Linear(clip_dim, embed_dim)
                self.extras = 1 + num_clip_token
            elif num_classes > 0:
                self.label_emb = nn.Embedding(num_classes, embed_dim)
                self.extras = 2
            else:
                self.extras = 1
            n = (img_size // patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.randn(1, self.extras + n, embed_dim) * 0.02)
            self.in_blocks = nn.ModuleList([Block() for _ in range(depth // 2)])
            self.mid_block = Block()
            self.out_blocks = nn.ModuleList([Block(skip) for _ in range(depth // 2)])
            self.norm = nn.LayerNorm(embed_dim)
            self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
            self.final_layer = (nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv
                                else nn.Identity())

        def forward(self, x, t, context=None, y=None):
            b, _, hh, ww = x.shape
            tokens = self.patch_embed(x)
            time = self.time_embed(time_features(t, embed_dim))[:, None]
            if clip_dim is not None:
                x = torch.cat([time, self.context_embed(context), tokens], dim=1)
            elif num_classes > 0:
                x = torch.cat([self.label_emb(y)[:, None], time, tokens], dim=1)
            else:
                x = torch.cat([time, tokens], dim=1)
            x = x + self.pos_embed
            skips = []
            for blk in self.in_blocks:
                x = blk(x)
                skips.append(x)
            x = self.mid_block(x)
            for blk in self.out_blocks:
                x = blk(x, skips.pop())
            x = self.decoder_pred(self.norm(x))[:, self.extras:]
            h, w, p = hh // patch_size, ww // patch_size, patch_size
            x = x.reshape(b, h, w, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
            return self.final_layer(x.reshape(b, in_chans, h * p, w * p))

    return UViT().eval()
