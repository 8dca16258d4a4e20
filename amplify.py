"""AMPLIFY: Actionless Motion Priors for Robot Learning from Videos, in one file.

Collins et al., CoRL 2025, arXiv 2506.14198. A visuomotor policy split into three separately
trained stages:

  1. motion tokenizer   point tracks -> discrete motion codes (FSQ) -> tracks again
  2. forward dynamics   image(s) + task text -> motion codes      (any video, no actions needed)
  3. inverse dynamics   image(s) + proprio + motion codes -> action chunk   (any action data)

At test time the forward model predicts the codes, the inverse model turns them into an action
chunk, and chunks are blended with ACT-style temporal ensembling (`Policy`).

Everything the method needs is here, importing only torch, numpy and einops: FSQ, the local-window
track codec, the three transformers as published (pairlab/AMPLIFY, layer for layer), their losses,
the track metrics, a memory-mapped dataset reader, one training loop (resumable, bf16, torchrun),
the composed policy. Around it: preprocess.py makes datasets, import_official.py converts published
checkpoints, bench.py measures speed, eval_libero.py and real_robot.py run policies, and
amplify_extras.py holds optional parts (other action heads, pictures, --log-to).

  python amplify.py --stage tokenizer --data data.npz --out DIR
  python amplify.py --stage forward   --data data.npz --out DIR       # uses DIR/tokenizer.pt
  python amplify.py --stage inverse   --data data.npz --out DIR       # codes of the true tracks
  python amplify.py --stage inverse   --data data.npz --out DIR --predicted-codes   # fine-tune
  python amplify.py --stage all       --data data.npz --out DIR       # all of it -> DIR/policy.pt
  python amplify.py --stage forward --preset paper --count-params
  torchrun --nproc_per_node=4 amplify.py --stage all --data D --out DIR   # data-parallel, GPUs or CPU

Shape legend (einops names in lower case)
  B batch, V camera views, T horizon (frames in a track window, 16), N points (400 = 20x20 grid),
  L motion codes per window (T-1), D model width, A action dim, P proprio dim,
  H x W_img image height and width (einops: h w), C image or feature-map channels,
  W local-window side (15), Cw local-window classes (W*W = 225), K codebook size,
  xy the (x, y) coordinate axis of a track point (size 2), nh attention heads, hs head size (D / nh).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# -----------------------------------------------------------------------------
# Errors and small helpers


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits 2."""


class DataError(UserError, ValueError):
    """A dataset or checkpoint that does not match what was expected."""


def size_hw(img_size):
    """`img_size` is an int (square) or (height, width); returns (H, W) as ints."""
    if isinstance(img_size, (int, np.integer)):
        return int(img_size), int(img_size)
    h, w = img_size
    return int(h), int(w)


def as_tensor(x, dtype=None):
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=dtype)


def atomic_write(path, write_fn, directory=False):
    """Call write_fn(tmp) on a temporary file (or directory) next to `path`, then rename it over
    `path`: readers see the old version or the new one, never half of one. The temporary name keeps
    the file's extension, for writers that go by it (np.savez, imageio). Every file this project
    writes (checkpoints, datasets, results, videos) goes through here."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    prefix, suffix = f".{name}.", ".tmp" + os.path.splitext(name)[1]
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp would make it private
    old = None
    try:
        write_fn(tmp)
        if directory and os.path.exists(path):  # a directory cannot be renamed over: move the old aside
            old = f"{path}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not os.path.exists(path):
            os.replace(old, path)  # put the old version back
            old = None
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover is not None and os.path.exists(leftover):
                os.remove(leftover)


@functools.cache  # looked up once: the tokenizer's loss asks on every step
def extras():
    """amplify_extras.py, the optional helpers beside this file (pictures, --log-to, the chunked
    cross-entropy), or None where it was left out."""
    try:
        import amplify_extras
    except ImportError:
        return None
    return amplify_extras


def write_png(path, image):
    """Write uint8 (H, W_img, 3) as a PNG; atomic."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG"))


def resize_images(images, size):
    """uint8 (..., H, W_img, 3) -> uint8 (..., h, w, 3), size = (h, w) or an int: antialiased bilinear.

    The project's one image resize: preprocessing (preprocess.fit_square), the real robot's cameras
    and Policy.act all call it, so a policy sees pixels exactly as its training data had them.
    numpy in, numpy out; tensors stay on their device.
    """
    h, w = size_hw(size)
    if tuple(images.shape[-3:-1]) == (h, w):
        return images
    x = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
    lead = x.shape[:-3]
    x = rearrange(x.reshape(-1, *x.shape[-3:]), "b h w c -> b c h w").float()  # (B', 3, H, W_img)
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    x = rearrange(x.round().clamp(0, 255).to(torch.uint8), "b c h w -> b h w c").reshape(*lead, h, w, 3)
    return x if torch.is_tensor(images) else x.numpy()


def grid_points(grid=20):
    """(N, 2) float32 normalized (x, y) of a uniform grid; point n = row * grid + col."""
    ticks = np.linspace(-1 + 1 / grid, 1 - 1 / grid, grid, dtype=np.float32)
    ys, xs = np.meshgrid(ticks, ticks, indexing="ij")  # row-major: y outer, x inner
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


# -----------------------------------------------------------------------------
# Configs: one dataclass per model; a preset is just values of these


@dataclass
class ModelConfig:
    """What every model has: transformer sizes, and the data shape (filled in from the data, so a
    checkpoint alone rebuilds the model)."""
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    dropout: float = 0.0
    codebook_size: int = 512  # FSQ target size, the tokenizer's; the real size is prod(fsq_levels(...))
    views: int = 2
    img_size: tuple = (128, 128)
    T: int = 16  # frames in a track window; also the length of an action chunk


@dataclass
class TokenizerConfig(ModelConfig):
    """n_layer encoder layers, half as many decoder layers (at least one), as published."""
    window: int = 15  # W: the decoder classifies each step into W x W pixel moves
    head_hidden: int = 128  # hidden width of the decoder's per-(view, step, point) MLP (published code: 256)
    grid: int = 20
    view_weights: tuple = ()  # loss weight per view, data order; () = alike (published: 0.9 third-person, 0.1 wrist)
    readout: str = "argmax"  # decoded moves: "argmax" (published) or "mean", which keeps sub-pixel motion


@dataclass
class VisionConfig:
    """A ResNet with torchvision's module names: ResNet-18 is widths (64, 128, 256, 512) x blocks (2, 2, 2, 2);
    the cpu preset's is the same design, thinner."""
    widths: tuple = (16, 32, 64, 128)
    blocks: tuple = (1, 1, 1, 1)
    upsample: int = 0  # resize images to this before the CNN (published code: 128 -> 224, a 7x7 map); 0 = off
    weights: str = ""  # "" (train from scratch), "torchvision", "timm", or a path to a ResNet-18 state dict
    frozen: bool = False  # not trained (the published default): features are computed once and cached


@dataclass
class ForwardConfig(ModelConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text_encoder: str = "hash"  # "hash": fixed random vectors of the words; else a Hugging Face model (t5-small)
    text_buckets: int = 4096
    text_dim: int = 512  # width of the frozen text embedding (T5-small's 512; a Hugging Face model's own width)


@dataclass
class InverseConfig(ModelConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)
    gamma: float = 0.99  # discount over the action chunk, of whichever head's loss
    use_codes: bool = True  # False: the "inverse only" behaviour-cloning baseline (no motion codes)
    goal: bool = False  # the task text as one more memory token: with use_codes False, goal-conditioned BC
    # A LayerNorm over the memory (not published; ours before #24): measured better few-shot,
    # 0.0305 vs 0.0367 held-out action error with true codes (docs/EXPERIMENT.md)
    memory_ln: bool = False
    head: str = "gaussian"  # action head: gaussian | diffusion | flow (the paper's Table 13 compares the three)
    gaussian_std: float = 0.1  # fixed, in normalized action units (published; a learned one measured 4x worse)
    diffusion_train_steps: int = 100  # noise levels in training, and DDIM steps per chunk, as Diffusion Policy's
    diffusion_sample_steps: int = 16
    unet_dims: tuple = (32, 64, 128)  # U-Net channels per level (Diffusion Policy's: 256, 512, 1024)
    flow_steps: int = 10  # flow matching: midpoint steps per chunk (the paper's 10)
    dit_layers: int = 2  # flow matching: DiT blocks, D wide
    action_dim: int = 7
    proprio_dim: int = 9

    def __post_init__(self):  # checked once, wherever the config comes from: flags, Python or a checkpoint
        if self.head not in ("gaussian", "diffusion", "flow"):
            raise DataError(f"inverse config: expected head gaussian, diffusion or flow, found {self.head!r}")
        if not 1 <= self.diffusion_sample_steps <= self.diffusion_train_steps:
            raise UserError(f"--diffusion-sample-steps: expected 1 to {self.diffusion_train_steps} DDIM steps (the "
                            f"training noise levels), found {self.diffusion_sample_steps}")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8  # the tokenizer's (B*V*N*L, 225) logits dominate a CPU step: keep B small
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 100
    eval_samples: int = 64  # held-out windows scored per evaluation


RESNET18 = dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))
PAPER_VISION = VisionConfig(**RESNET18, upsample=224)
PRESETS = {
    # Trains each stage in minutes on 2 CPU cores; big enough to overfit the built-in data.
    "cpu": {
        "tokenizer": TokenizerConfig(),
        "forward": ForwardConfig(),
        "inverse": InverseConfig(),
        "train": TrainConfig(),
    },
    # Table 10 of the paper: widths, depths, heads, dropout, batch, learning rate, codebook.
    "paper": {
        "tokenizer": TokenizerConfig(d_model=768, n_layer=2, n_head=8, dropout=0.1, codebook_size=2048,
                                     head_hidden=256),
        "forward": ForwardConfig(d_model=768, n_layer=8, n_head=8, dropout=0.1, codebook_size=2048, vision=PAPER_VISION),
        "inverse": InverseConfig(d_model=768, n_layer=4, n_head=8, dropout=0.1, codebook_size=2048, vision=PAPER_VISION,
                                 unet_dims=(256, 512, 1024), dit_layers=4),  # the published heads' sizes
        "train": TrainConfig(steps=100_000, batch_size=256, lr=1e-4, warmup=1000, log_every=100, eval_every=5000,
                             eval_samples=1024),
    },
}
CONFIG_CLASSES = {"tokenizer": TokenizerConfig, "forward": ForwardConfig, "inverse": InverseConfig}


def config_from_dict(cls, d):
    """Rebuild a config dataclass from a checkpoint's plain dict; unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise DataError(f"checkpoint config: unknown keys {sorted(unknown)} for {cls.__name__}")
    d = dict(d)
    if "vision" in d:
        d["vision"] = config_from_dict(VisionConfig, d["vision"])
    for key in ("img_size", "widths", "blocks", "unet_dims", "view_weights"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


# -----------------------------------------------------------------------------
# FSQ: finite scalar quantization (Mentzer et al. 2023)

FSQ_LEVELS = {256: [8, 6, 5], 512: [8, 8, 8], 1024: [8, 5, 5, 5], 2048: [8, 8, 6, 5], 4096: [7, 5, 5, 5, 5]}


def fsq_levels(codebook_size):
    """Levels the FSQ paper recommends for a target codebook size (their product is the real size)."""
    if codebook_size not in FSQ_LEVELS:
        raise UserError(f"codebook size: expected one of {sorted(FSQ_LEVELS)}, found {codebook_size}")
    return list(FSQ_LEVELS[codebook_size])


class FSQ(nn.Module):
    """Each latent channel is squashed to L_i levels and rounded; the code is the tuple of levels.

    No codebook to learn or collapse: the number of codes is prod(levels).
    forward(z (..., len(levels))) -> (codes in [-1, 1] (..., len(levels)), indices (...,) long)
    """

    def __init__(self, levels):
        super().__init__()
        levels = torch.tensor(levels, dtype=torch.long)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)  # first level least significant
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_size = int(levels.prod())

    def bound(self, z):
        # tanh squashes z into (-half_l, half_l); even L gets an offset of 0.5 so rounding yields
        # exactly L values, and the shift keeps z = 0 at 0 (the paper's tan formula misses this).
        eps = 1e-3
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z):
        bounded = self.bound(z)
        quantized = bounded + (bounded.round() - bounded).detach()  # straight-through estimator
        half_width = (self.levels // 2).to(z.dtype)
        codes = quantized / half_width
        indices = ((quantized.round().long() + self.levels // 2) * self.basis).sum(-1)
        return codes, indices

    def indices_to_codes(self, indices):
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels  # (..., len(levels))
        return (digits - self.levels // 2).float() / (self.levels // 2).float()


class CodeInput(nn.Module):
    """Motion-code indices (..., L) -> model inputs (..., L, D): the FSQ code vectors through the
    tokenizer's `code_out` (FSQ's project_out), frozen, as the published code reads them: codes one
    level apart are nearby inputs, and every model reads a code as the tokenizer's decoder does."""

    def __init__(self, codebook_size, d):
        super().__init__()
        self.fsq = FSQ(fsq_levels(codebook_size))
        self.proj = nn.Linear(len(self.fsq.levels), d).requires_grad_(False)

    def forward(self, indices):
        return self.proj(self.fsq.indices_to_codes(indices))


# -----------------------------------------------------------------------------
# Local-window track codec: each step of each point is one class of a W x W window of pixel moves


def tracks_to_classes(tracks, img_size, window=15):
    """(..., T, N, 2) normalized (x, y) tracks -> (..., T-1, N) long window classes."""
    tracks = as_tensor(tracks).float()
    h, w = size_hw(img_size)
    size = tracks.new_tensor([w, h])  # x is the column axis
    pixels = ((tracks + 1) * size / 2).clamp(min=torch.zeros_like(size), max=size - 1).round()
    delta = (pixels[..., 1:, :, :] - pixels[..., :-1, :, :]).long()  # (..., T-1, N, 2)
    half = window // 2
    delta = delta.clamp(-half, half)
    return (delta[..., 1] + half) * window + (delta[..., 0] + half)


def window_moves(window=15):
    """(W*W, 2) the pixel move (dx, dy) of each window class: the inverse of tracks_to_classes' layout."""
    half, c = window // 2, torch.arange(window * window)
    return torch.stack([c % window - half, c // window - half], dim=-1).float()


def moves_to_tracks(start, moves, img_size):
    """start (..., N, 2) normalized, moves (..., T-1, N, 2) in pixels -> (..., T, N, 2) normalized tracks."""
    start = as_tensor(start).float()
    h, w = size_hw(img_size)
    steps = torch.cumsum(moves * 2 / start.new_tensor([w, h]), dim=-3)
    return torch.cat([start.unsqueeze(-3), start.unsqueeze(-3) + steps], dim=-3)


def classes_to_tracks(start, classes, img_size, window=15):
    """start (..., N, 2) normalized, classes (..., T-1, N) -> (..., T, N, 2) normalized tracks."""
    classes = as_tensor(classes).long()
    return moves_to_tracks(start, window_moves(window).to(classes.device)[classes], img_size)


# -----------------------------------------------------------------------------
# Transformer parts shared by the three models, as the published code builds them (nanoGPT-style:
# pre-LayerNorm, no biases in any attention, MLP or LayerNorm, scaled_dot_product_attention)


class Attention(nn.Module):
    """Multi-head attention. Self-attention projects q, k, v with one matrix (`qkv`); cross-attention
    projects the queries (`q`) and the memory's keys and values (`kv`)."""

    def __init__(self, d, n_head, dropout, cross=False):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        if cross:
            self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context=None, mask=None, cache=None):
        """x (B, Lq, D) attends to context (B, S, D) (cross-attention) or to itself.

        mask: bool (Lq, S), True = may attend. cache: a dict that keeps this layer's keys and values
        across calls, so during sampling each new token costs one row instead of the whole prefix.
        """
        if context is None:
            q, k, v = rearrange(self.qkv(x), "b l (three nh hs) -> three b nh l hs", three=3, nh=self.n_head)
        else:
            q = rearrange(self.q(x), "b l (nh hs) -> b nh l hs", nh=self.n_head)  # (B, nh, Lq, hs)
            k, v = rearrange(self.kv(context), "b s (two nh hs) -> two b nh s hs", two=2, nh=self.n_head)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.out(rearrange(y, "b nh l hs -> b l (nh hs)")))


def mlp(d, dropout):
    return nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False), nn.Dropout(dropout))


class Block(nn.Module):
    """Encoder block: self-attention, MLP. Decoder block (cross=True): self-attention, MLP,
    cross-attention to a memory, a second MLP. Each sublayer pre-normed and residual."""

    def __init__(self, d, n_head, dropout, cross=False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d, bias=False), Attention(d, n_head, dropout)
        self.ln2, self.mlp = nn.LayerNorm(d, bias=False), mlp(d, dropout)
        if cross:
            self.ln3, self.cross = nn.LayerNorm(d, bias=False), Attention(d, n_head, dropout, cross=True)
            self.ln4, self.mlp2 = nn.LayerNorm(d, bias=False), mlp(d, dropout)
        self.is_decoder = cross

    def forward(self, x, mask=None, context=None, cache=None):
        x = x + self.attn(self.ln1(x), mask=mask, cache=cache)
        x = x + self.mlp(self.ln2(x))
        if self.is_decoder:
            x = x + self.cross(self.ln3(x), context=context)
            x = x + self.mlp2(self.ln4(x))
        return x


class Transformer(nn.Module):
    """Learned positions added to the input sequence (never to a cross-attention memory), dropout,
    n_layer blocks, a final LayerNorm: the published TransformerEncoder (cross=False) and
    TransformerDecoder (cross=True). Weights start as nanoGPT's: N(0, 0.02), the output matrix of
    every residual branch N(0, 0.02 / sqrt(2 n_layer))."""

    def __init__(self, seq_len, d, n_layer, n_head, dropout, cross=False):
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, n_head, dropout, cross) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                residual_out = name.endswith(("out.weight", "mlp.2.weight", "mlp2.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if residual_out else 0.02)

    def forward(self, x, mask=None, context=None, caches=None, start=0):
        """x (B, S, D) at positions start..start+S-1 -> (B, S, D). caches: one dict per block (sampling)."""
        x = self.drop(x + self.pos[start:start + x.shape[1]])
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, context=context, cache=None if caches is None else caches[i])
        return self.ln_f(x)


# -----------------------------------------------------------------------------
# Motion tokenizer: tracks -> velocities -> causal encoder -> FSQ codes -> step decoder -> windows


class MotionTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        V, N, L, D = cfg.views, cfg.grid ** 2, cfg.T - 1, cfg.d_model
        if cfg.view_weights and len(cfg.view_weights) != V:
            raise UserError(f"tokenizer view weights: expected one per view ({V}), found {list(cfg.view_weights)}")
        if cfg.readout not in ("argmax", "mean"):
            raise UserError(f"tokenizer readout: expected 'argmax' or 'mean', found {cfg.readout!r}")
        self.fsq = FSQ(fsq_levels(cfg.codebook_size))
        n_levels = len(self.fsq.levels)
        # Encoder: one token per time step holding every point of every view, so the views are
        # tokenized together into one code sequence of length L = T-1.
        self.vel_in = nn.Linear(V * N * 2, D)
        with torch.no_grad():  # not published: scaled for velocities of 2 / size per pixel, which the
            # default init hardly passes on to the codes (docs/PUBLISHED_ARCHITECTURE.md)
            self.vel_in.weight.mul_(torch.tensor(cfg.img_size[::-1], dtype=torch.float).repeat(V * N) / 2)
        self.encoder = Transformer(L, D, cfg.n_layer, cfg.n_head, cfg.dropout)
        self.register_buffer("causal", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        # FSQ's project_in and project_out: D -> one value per level, and a code back to D. The
        # forward and inverse models read codes through a frozen copy of code_out (CodeInput).
        self.to_latent = nn.Linear(D, n_levels)
        self.code_out = nn.Linear(n_levels, D)
        # Decoder: L step queries (their positions alone) attend to each other and to the codes,
        # giving one D-wide feature per step. It has half the encoder's layers, and the codes carry no
        # positions: the decoder tells them apart by value. A small MLP per (view, step, point) then
        # reads that point's move out of its step's feature, its point embedding and its view
        # embedding, added to the step feature, and a head shared by all classifies the move.
        self.decoder = Transformer(L, D, max(1, cfg.n_layer // 2), cfg.n_head, cfg.dropout, cross=True)
        self.point_emb = nn.Parameter(torch.randn(N, D))
        self.view_emb = nn.Parameter(torch.randn(V, D))
        # The MLP's first layer on [step feature, point embedding, view embedding] is computed as a
        # sum of three linear maps (the same function), so no (B, V, L, N, 3D) tensor is built.
        self.mlp_step = nn.Linear(D, cfg.head_hidden)
        self.mlp_point = nn.Linear(D, cfg.head_hidden, bias=False)
        self.mlp_view = nn.Linear(D, cfg.head_hidden, bias=False)
        self.mlp_out = nn.Linear(cfg.head_hidden, D)
        self.head = nn.Linear(D, cfg.window ** 2)

    def encode(self, tracks):
        """tracks (B, V, T, N, 2) normalized -> codes (B, L, n_levels) in [-1, 1], indices (B, L)."""
        vel = tracks[:, :, 1:] - tracks[:, :, :-1]  # (B, V, L, N, 2), in normalized units as published
        x = self.encoder(self.vel_in(rearrange(vel, "b v l n xy -> b l (v n xy)")), mask=self.causal)  # (B, L, D)
        return self.fsq(self.to_latent(x))  # causal: code l summarizes motion up to step l only

    def decode_features(self, codes):
        """codes (B, L, n_levels) in [-1, 1] -> (B, V, L, N, D) features, one row per view, step and point."""
        memory = self.code_out(codes)  # (B, L, D)
        x = self.decoder(torch.zeros_like(memory), context=memory)  # queries: zeros + step positions
        x = rearrange(x, "b l d -> b 1 l 1 d")
        hidden = (self.mlp_step(x) + rearrange(self.mlp_view(self.view_emb), "v e -> 1 v 1 1 e")
                  + rearrange(self.mlp_point(self.point_emb), "n e -> 1 1 1 n e"))  # (B, V, L, N, head_hidden)
        return x + self.mlp_out(F.relu(hidden))  # (B, V, L, N, D)

    def decode_logits(self, codes):
        """codes (B, L, n_levels) in [-1, 1] -> window logits (B, V, L, N, Cw)."""
        return self.head(self.decode_features(codes))

    def forward(self, tracks):
        codes, indices = self.encode(tracks)
        return self.decode_logits(codes), indices

    def loss(self, tracks):
        """Cross-entropy of every point's every step against its true local-window class, averaged per
        view and weighted by `view_weights` -> (loss, {})."""
        features = self.decode_features(self.encode(tracks)[0])  # (B, V, L, N, D)
        target = tracks_to_classes(tracks, self.cfg.img_size, self.cfg.window)  # (B, V, L, N)
        weights = self.cfg.view_weights or [1 / self.cfg.views] * self.cfg.views  # views alike: the mean of all rows
        return sum(w * ce for w, ce in zip(weights, self.view_cross_entropy(features, target))), {}

    def view_cross_entropy(self, features, target):
        """Each view's mean cross-entropy of the head on features (B, V, L, N, D) against window
        classes (B, V, L, N): V losses. Features narrower than the Cw classes (the cpu preset) would
        make the logits the step's biggest tensor: amplify_extras computes them in chunks (3x faster
        there, the same loss and gradients; docs/SCALE.md)."""
        if features.shape[-1] < self.head.out_features and extras() is not None:
            return [extras().chunked_linear_cross_entropy(rearrange(features[:, v], "b ... d -> (b ...) d"),
                                                          self.head.weight, self.head.bias, target[:, v].flatten())
                    for v in range(features.shape[1])]
        logits = self.head(features).float()  # (B, V, L, N, Cw)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return ce.view(target.shape).mean((0, 2, 3))  # (V,)

    def decode(self, indices, start, readout=None):
        """indices (B, L), start (B, V, N, 2) -> tracks (B, V, T, N, 2), each step's move summed up.

        readout (default: cfg.readout) "argmax": the most likely move, as published; "mean": the
        expected move, so sub-pixel motion survives argmax's "stay" (docs/MOTION_CODES.md)."""
        readout = readout or self.cfg.readout
        probs = self.decode_logits(self.fsq.indices_to_codes(indices)).float().softmax(-1)  # (B, V, L, N, W*W)
        moves = window_moves(self.cfg.window).to(probs.device)
        if readout == "mean":
            moves = probs @ moves
        elif readout == "argmax":
            moves = moves[probs.argmax(-1)]
        else:
            raise UserError(f"tokenizer readout: expected 'argmax' or 'mean', found {readout!r}")
        return moves_to_tracks(start, moves, self.cfg.img_size)

    def start_points(self, batch, device=None):
        """The 20x20 grid every window starts from, (B, V, N, 2)."""
        pts = torch.as_tensor(grid_points(self.cfg.grid), device=device)
        return repeat(pts, "n xy -> b v n xy", b=batch, v=self.cfg.views)


# -----------------------------------------------------------------------------
# Vision and text encoders for the forward and inverse models


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet feature extractor (no pooling, no fc) with torchvision's parameter names."""

    def __init__(self, widths, blocks):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layer = [BasicBlock(c_in if j == 0 else width, width, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = width
        self.out_channels = c_in

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_resnet18_weights(resnet, source):
    """Copy pretrained ResNet-18 weights into `resnet` (imported lazily; needs the weights locally)."""
    if tuple(resnet.layer1[0].conv1.weight.shape[:1]) != (64,) or len(resnet.layer1) != 2:
        raise UserError("vision weights: ResNet-18 weights need widths (64, 128, 256, 512) and blocks (2, 2, 2, 2) "
                        "(the paper preset)")
    if source == "torchvision":
        import torchvision
        state = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
    elif source == "timm":
        import timm
        state = timm.create_model("resnet18", pretrained=True).state_dict()
    elif os.path.exists(source):
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"vision weights: expected 'torchvision', 'timm' or an existing file, found '{source}'")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"vision weights: expected ResNet-18 keys, missing {missing[:4]}, unexpected {unexpected[:4]}")


class VisionEncoder(nn.Module):
    """uint8 images (B, V, H, W, 3) -> ResNet feature maps (B, V, C, h, w), as published: frames in [0, 1],
    resized (bilinear) to `upsample` when set, no ImageNet normalization. Float input is taken to be
    these features already (a frozen encoder's, computed once: cached, or shared inside a Policy)."""

    def __init__(self, cfg: VisionConfig, views, img_size):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            if cfg.frozen:  # without weights, a fixed random ResNet: the same in the forward and inverse model
                torch.manual_seed(0)
            self.resnet = ResNet(cfg.widths, cfg.blocks)
        if cfg.weights:
            load_resnet18_weights(self.resnet, cfg.weights)
        self.resnet.requires_grad_(not cfg.frozen)
        with torch.no_grad():
            h, w = self.resnet.eval()(torch.zeros(1, 3, *self._input_size(img_size))).shape[-2:]
        self.resnet.train(not cfg.frozen)
        self.feature_shape = (views, self.resnet.out_channels, h, w)  # (V, C, h, w)

    def train(self, mode=True):
        super().train(mode)
        if self.cfg.frozen:  # frozen BatchNorm keeps its statistics: features depend on the frame alone
            self.resnet.eval()
        return self

    def _input_size(self, img_size):
        return (self.cfg.upsample, self.cfg.upsample) if self.cfg.upsample else tuple(img_size)

    def features(self, images):
        """uint8 images (B, V, H, W, 3) -> ResNet features (B, V, C, h, w)."""
        B = images.shape[0]
        x = rearrange(images, "b v h w c -> (b v) c h w").float() / 255
        if self.cfg.upsample:
            x = F.interpolate(x, size=(self.cfg.upsample,) * 2, mode="bilinear", align_corners=False)
        return rearrange(self.resnet(x), "(b v) c h w -> b v c h w", b=B)  # (B, V, C, h, w)

    def forward(self, images):
        return self.features(images) if images.dtype == torch.uint8 else images


def task_words(task):
    return re.findall(r"[a-z0-9]+", task.lower())


class TextEncoder(nn.Module):
    """Task text -> one (B, D) token: a frozen text embedding (text_dim wide) and a trained projection,
    as the published code projects T5-small's first token. "hash" (default): the mean of fixed random
    vectors of the words (nothing to download; shared words share vectors). Otherwise a frozen Hugging
    Face encoder ("t5-small" as published) embeds each task once; the cache is saved in the checkpoint."""

    def __init__(self, d_model, name="hash", buckets=4096, text_dim=512):
        super().__init__()
        self.name, self.buckets = name, buckets
        self.cache = {}  # task -> embedding; for a pretrained encoder, saved in the checkpoint
        self._hf = None
        if name == "hash":  # fixed by the seed, so it is not saved
            table = torch.randn(buckets, text_dim, generator=torch.Generator().manual_seed(0))
            self.register_buffer("table", table, persistent=False)
        self.proj = nn.Linear(text_dim, d_model)

    def _hf_embed(self, tasks):
        if self._hf is None:
            from transformers import AutoModel, AutoTokenizer
            model = AutoModel.from_pretrained(self.name)
            if getattr(model.config, "is_encoder_decoder", False):  # T5: only its encoder embeds text
                model = model.get_encoder()
            self._hf = (AutoTokenizer.from_pretrained(self.name), model.eval())
        tokenizer, model = self._hf
        with torch.no_grad():
            batch = tokenizer(list(tasks), return_tensors="pt", padding=True, truncation=True, max_length=32)
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            return hidden[:, 0]  # the first token's state, as published

    def forward(self, tasks):
        device = self.proj.weight.device
        if self.name == "hash":
            ids, offsets = [], []
            for task in tasks:
                offsets.append(len(ids))
                ids.extend(zlib.crc32(wd.encode()) % self.buckets for wd in (task_words(task) or [""]))
            emb = F.embedding_bag(torch.tensor(ids, device=device), self.table, torch.tensor(offsets, device=device),
                                  mode="mean")  # (B, text_dim): the mean of each task's word vectors
        else:
            missing = sorted({t for t in tasks if t not in self.cache})
            if missing:
                for task, e in zip(missing, self._hf_embed(missing)):
                    self.cache[task] = e.float().cpu()
            emb = torch.stack([self.cache[t] for t in tasks]).to(device)
        return self.proj(emb.to(self.proj.weight.dtype))


def pretrained_text_dim(name):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(name)
    return int(getattr(config, "d_model", None) or config.hidden_size)


# -----------------------------------------------------------------------------
# Forward dynamics: [vision tokens, text token | start, code_1 .. code_{L-1}] -> next code


def block_causal_mask(n_cond, n_seq, device=None):
    """bool (S, S), True = may attend: condition tokens see each other fully, the sequence is causal."""
    S = n_cond + n_seq
    mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    mask[:n_cond, :n_cond] = True
    return mask


def sample_logits(logits, temperature=0.0, top_k=None, generator=None):
    """(B, K) -> (B,) codes: greedy at temperature 0, else top-k / temperature sampling."""
    logits = logits.float()  # bf16 logits (autocast) would tie and round the softmax
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)


class ForwardDynamics(nn.Module):
    def __init__(self, cfg: ForwardConfig):
        super().__init__()
        self.cfg = cfg
        D, L = cfg.d_model, cfg.T - 1
        self.vision = VisionEncoder(cfg.vision, cfg.views, cfg.img_size)
        V, C, h, w = self.vision.feature_shape
        self.img_proj = nn.Linear(C, D)  # one token per view and feature-map cell
        self.text = TextEncoder(D, cfg.text_encoder, cfg.text_buckets, cfg.text_dim)
        self.n_cond = V * h * w + 1
        self.code_in = CodeInput(cfg.codebook_size, D)  # the tokenizer's code_out, frozen
        self.sos = nn.Parameter(torch.randn(D))  # the token before the first code
        self.trunk = Transformer(self.n_cond + L, D, cfg.n_layer, cfg.n_head, cfg.dropout)  # positions on every token
        # One class per FSQ index up to the codebook size, as published: 2048 for levels (8, 8, 6, 5),
        # whose 1920 codes leave 128 classes that no target uses (a sampled one wraps, FSQ.indices_to_codes).
        self.K, self.L = cfg.codebook_size, L
        self.head = nn.Linear(D, self.K)
        self.register_buffer("mask", block_causal_mask(self.n_cond, L), persistent=False)

    def condition(self, images, tasks):
        """(B, n_cond, D): vision tokens (view by view, each map row-major) then one text token."""
        tokens = self.img_proj(rearrange(self.vision(images), "b v c h w -> b (v h w) c").to(self.img_proj.weight.dtype))
        return torch.cat([tokens, self.text(tasks).unsqueeze(1)], dim=1)

    def logits(self, cond, prefix):
        """cond (B, n_cond, D), prefix codes (B, j), j < L -> logits for codes 1..j+1, (B, j+1, K)."""
        x = torch.cat([cond, self.sos.expand(cond.shape[0], 1, -1), self.code_in(prefix)], dim=1)  # (B, n_cond+j+1, D)
        S = x.shape[1]
        return self.head(self.trunk(x, mask=self.mask[:S, :S])[:, self.n_cond:])

    def loss(self, images, tasks, codes):
        """Teacher-forced cross-entropy on the frozen tokenizer's codes (B, L) -> (loss, {"code_acc"})."""
        logits = self.logits(self.condition(images, tasks), codes[:, :-1])  # (B, L, K)
        loss = F.cross_entropy(rearrange(logits, "b l k -> (b l) k"), codes.reshape(-1))
        return loss, {"code_acc": (logits.argmax(-1) == codes).float().mean().detach()}

    @torch.no_grad()
    def generate(self, images, tasks, temperature=0.0, top_k=None, use_cache=True, generator=None):
        """Sample codes (B, L). With the cache, each new code costs one token, not the whole prefix."""
        cond = self.condition(images, tasks)
        B = cond.shape[0]
        codes = torch.zeros(B, 0, dtype=torch.long, device=cond.device)
        if not use_cache:
            for _ in range(self.L):
                nxt = sample_logits(self.logits(cond, codes)[:, -1], temperature, top_k, generator)
                codes = torch.cat([codes, nxt[:, None]], dim=1)
            return codes
        caches = [{} for _ in self.trunk.blocks]
        x = torch.cat([cond, self.sos.expand(B, 1, -1)], dim=1)
        S, mask = x.shape[1], self.mask[: x.shape[1], : x.shape[1]]  # the prefix keeps its block-causal mask
        for i in range(self.L):
            y = self.trunk(x, mask=mask, caches=caches, start=S - x.shape[1])
            nxt = sample_logits(self.head(y[:, -1]), temperature, top_k, generator)
            codes = torch.cat([codes, nxt[:, None]], dim=1)
            x, S, mask = self.code_in(nxt[:, None]), S + 1, None  # (B, 1, D): one new token, it sees all cached
        return codes


# -----------------------------------------------------------------------------
# Inverse dynamics: T action queries cross-attend to [vision, proprio, motion codes] -> an action head


class InverseDynamics(nn.Module):
    def __init__(self, cfg: InverseConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.vision = VisionEncoder(cfg.vision, cfg.views, cfg.img_size)
        V, C, h, w = self.vision.feature_shape
        self.img_proj = nn.Linear(V * C, D)  # one token per feature-map cell, the views side by side in it
        if cfg.goal:
            self.text = TextEncoder(D)
        self.proprio_proj = nn.Linear(cfg.proprio_dim, D)
        if cfg.use_codes:
            self.code_in = CodeInput(cfg.codebook_size, D)  # the tokenizer's code_out, frozen
        self.latents = nn.Parameter(torch.randn(cfg.T, D))  # one query per step of the chunk
        if cfg.memory_ln:
            self.memory_ln = nn.LayerNorm(D)
        self.decoder = Transformer(cfg.T, D, cfg.n_layer, cfg.n_head, cfg.dropout, cross=True)
        self.head = build_head(cfg)

    def tokens(self, images, proprio, codes=None, tasks=None):
        """images (B, V, H, W_img, 3) uint8, proprio (B, P) normalized, codes (B, L), tasks (B strings,
        read only with cfg.goal) -> one token per step (B, T, D).

        The memory holds no positions and no LayerNorm, as published: [image cells, (task), proprio, codes]."""
        cells = rearrange(self.vision(images), "b v c h w -> b (h w) (v c)").to(self.img_proj.weight.dtype)
        memory = [self.img_proj(cells)]  # (B, h*w, D)
        if self.cfg.goal:
            memory.append(self.text(tasks).unsqueeze(1))
        memory.append(self.proprio_proj(proprio).unsqueeze(1))
        if self.cfg.use_codes:
            memory.append(self.code_in(codes))  # (B, L, D)
        memory = torch.cat(memory, dim=1)  # (B, S, D)
        if self.cfg.memory_ln:
            memory = self.memory_ln(memory)
        return self.decoder(self.latents.expand(images.shape[0], -1, -1), context=memory)

    def forward(self, images, proprio, codes=None, generator=None, tasks=None):
        """-> an action chunk (B, T, A), normalized: the Gaussian's mean, or a sample of the other heads."""
        return self.head.sample(self.tokens(images, proprio, codes, tasks), generator)

    def loss(self, images, proprio, codes, actions, valid, tasks=None):
        """sum_k gamma^k l(a_{t+k}) as the head weighs it -> (loss, metrics). valid (B, T) masks steps
        past the episode end."""
        discount = self.cfg.gamma ** torch.arange(self.cfg.T, device=actions.device, dtype=actions.dtype)
        return self.head.loss(self.tokens(images, proprio, codes, tasks), actions, discount * valid)


# -----------------------------------------------------------------------------
# Action heads: the inverse transformer's T output tokens (B, T, D) -> action chunk (B, T, A)
#
# Appendix E of the paper compares three heads (Table 13). Each is a module with two methods:
#   loss(tokens, actions, weights) -> (loss, metrics)   weights (B, T) = gamma^k * valid_k
#   sample(tokens, generator) -> chunk (B, T, A)         reproducible with a torch.Generator
# The Gaussian head, the published default, is below. Our diffusion (1-D U-Net, DDPM training, DDIM
# sampling) and flow-matching (DiT, midpoint rule) heads are not the published ones (a transformer
# and a cross-attention DiT): they live in amplify_extras.py, imported when a config asks for them.


def build_head(cfg: InverseConfig):
    if cfg.head == "gaussian":
        return GaussianHead(cfg.d_model, cfg.action_dim, cfg.gaussian_std)
    if extras() is None:
        raise UserError(f"{cfg.head} head: expected amplify_extras.py (where it lives) beside amplify.py, found none")
    return extras().DiffusionHead(cfg) if cfg.head == "diffusion" else extras().FlowHead(cfg, Attention)


# -----------------------------------------------------------------------------
# Gaussian head (the default, as published): a_k ~ N(tanh(W x_k), 0.1^2) truncated to [-1, 1]; acts on the mean


class GaussianHead(nn.Linear):
    """One linear map to each action dimension's mean, squashed by tanh into [-1, 1] (actions are
    scaled to [-1, 1], `Normalizer`); the std is fixed. The loss is the negative log-likelihood of
    the normal truncated to [-1, 1], weighted per step, averaged over batch, steps and dimensions."""

    def __init__(self, d, action_dim, std=0.1):
        super().__init__(d, action_dim)
        if std <= 0:
            raise UserError(f"gaussian head: expected a std > 0, found {std}")
        self.std = std

    def loss(self, tokens, actions, weights):
        mean, s = self.sample(tokens), self.std
        mass = torch.special.ndtr((1 - mean) / s) - torch.special.ndtr((-1 - mean) / s)  # inside [-1, 1]
        nll = -torch.distributions.Normal(mean, s).log_prob(actions) + torch.log(mass + 1e-6)  # (B, T, A)
        valid = (weights > 0).float()
        mse = (((mean - actions) ** 2).mean(-1) * valid).sum() / valid.sum().clamp(min=1)  # the mean's error
        return (nll * weights[..., None]).mean(), {"action_mse_norm": mse.detach()}

    def sample(self, tokens, generator=None):
        """The mean: the policy acts on the mode, so the generator goes unused."""
        return torch.tanh(super().forward(tokens))


# -----------------------------------------------------------------------------
# Data: a directory of .npy files + meta.json (memory-mapped), or one .npz (SPEC section 6)

REQUIRED_KEYS = ("images", "tracks", "episode_ends", "tasks")
OPTIONAL_KEYS = ("vis", "actions", "proprio")
META_KEYS = ("views", "img_size", "T", "grid")
CHUNK_BYTES = 64 << 20  # validate big arrays this many bytes at a time: never all in memory


def row_blocks(a):
    """(first row, rows) of `a` in blocks of about CHUNK_BYTES, each a private copy. A memmap is read from
    its file: pages touched through the mapping would stay resident, and a scan would pull in the whole file."""
    row_size = int(np.prod(a.shape[1:], dtype=np.int64))
    step = max(1, CHUNK_BYTES // max(1, a.itemsize * row_size))
    for i in range(0, len(a), step):
        n = min(len(a) - i, step)
        if isinstance(a, np.memmap) and a.filename:
            yield i, np.fromfile(a.filename, dtype=a.dtype, count=n * row_size,
                                 offset=a.offset + i * row_size * a.itemsize).reshape((n,) + a.shape[1:])
        else:
            yield i, np.asarray(a[i:i + n])


def validate_dataset(arrays, meta):
    """Raise DataError naming the key and expected vs found; big arrays are checked in chunks."""
    for key in REQUIRED_KEYS:
        if key not in arrays:
            raise DataError(f"dataset: missing key '{key}' (expected keys {list(REQUIRED_KEYS)}, found {sorted(arrays)})")
    for key in META_KEYS:
        if key not in meta:
            raise DataError(f"dataset meta: missing key '{key}' (expected keys {list(META_KEYS)}, found {sorted(meta)})")
    images, tracks, ends = arrays["images"], arrays["tracks"], arrays["episode_ends"]
    views, (h, w), T, grid = list(meta["views"]), size_hw(meta["img_size"]), int(meta["T"]), int(meta["grid"])
    V, N = len(views), grid * grid

    def check(key, ok, expected, found):
        if not ok:
            raise DataError(f"dataset: '{key}' expected {expected}, found {found}")

    check("images", images.dtype == np.uint8, "dtype uint8", images.dtype)
    check("images", images.ndim == 5 and images.shape[1:] == (V, h, w, 3),
          f"shape (F, {V}, {h}, {w}, 3) from meta views/img_size", images.shape)
    F_ = images.shape[0]
    check("tracks", tracks.dtype in (np.float16, np.float32), "dtype float16 or float32", tracks.dtype)
    check("tracks", tracks.shape == (F_, V, T, N, 2), f"shape ({F_}, {V}, {T}, {N}, 2)", tracks.shape)
    check("episode_ends", ends.ndim == 1 and np.issubdtype(ends.dtype, np.integer), "1-d integer array",
          f"{ends.ndim}-d {ends.dtype}")
    check("episode_ends", len(ends) > 0, "at least one episode", "none")
    check("episode_ends", bool(np.all(np.diff(ends) > 0)) and ends[0] > 0, "strictly increasing, first > 0",
          np.asarray(ends[:8]).tolist())
    check("episode_ends", int(ends[-1]) == F_, f"last end == number of frames {F_}", int(ends[-1]))
    tasks = arrays["tasks"]
    check("tasks", tasks.dtype.kind == "U" and tasks.shape == (len(ends),), f"str array of shape ({len(ends)},)",
          f"{tasks.dtype} {tasks.shape}")
    if "vis" in arrays:
        check("vis", arrays["vis"].dtype == np.bool_ and arrays["vis"].shape == (F_, V, T, N),
              f"bool ({F_}, {V}, {T}, {N})", f"{arrays['vis'].dtype} {arrays['vis'].shape}")
    for key in ("actions", "proprio"):
        if key in arrays:
            a = arrays[key]
            check(key, a.dtype == np.float32 and a.ndim == 2 and a.shape[0] == F_, f"float32 ({F_}, dim)",
                  f"{a.dtype} {a.shape}")
    for first, rows in row_blocks(tracks):
        bad = ~np.isfinite(rows)
        if bad.any():
            frame = first + int(np.argwhere(bad)[0][0])
            raise DataError(f"dataset: 'tracks' expected finite values, found NaN/inf at frame {frame}")
    if "proprio" in arrays:
        if not np.isfinite(arrays["proprio"]).all():
            raise DataError("dataset: 'proprio' expected finite values, found NaN/inf")
    if "actions" in arrays:
        a = arrays["actions"]
        nan_rows = np.isnan(a).all(axis=1)
        if not (np.isfinite(a) | nan_rows[:, None]).all():
            raise DataError("dataset: 'actions' expected finite rows or all-NaN rows (no actions), found a partial NaN/inf row")


def array_stats(a):
    """Mean, std, min, max per column over rows without NaN (rows of NaN mean 'no actions')."""
    a = np.asarray(a, dtype=np.float64)
    a = a[~np.isnan(a).any(axis=1)]
    if len(a) == 0:
        return None
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist()}


class Dataset:
    """One dataset on disk. `arrays` are memory-mapped for directories, so size is not bounded by RAM."""

    def __init__(self, arrays, meta, path):
        self.arrays, self.meta, self.path = arrays, meta, path
        self.episode_ends = np.asarray(arrays["episode_ends"], dtype=np.int64)
        self.tasks = [str(t) for t in arrays["tasks"]]
        self.num_episodes = len(self.episode_ends)
        self.num_frames = int(self.episode_ends[-1])
        self.views = list(meta["views"])
        self.img_size = size_hw(meta["img_size"])
        self.episode_starts = np.concatenate([[0], self.episode_ends[:-1]])

    def episode_range(self, e):
        return int(self.episode_starts[e]), int(self.episode_ends[e])

    def has_actions(self, e):
        if "actions" not in self.arrays:
            return False
        start, end = self.episode_range(e)
        return bool(np.isfinite(self.arrays["actions"][start:end]).all())


def load_dataset(path):
    """Open a dataset directory (memory-mapped .npy + meta.json) or .npz; validate it."""
    if not os.path.exists(path):
        raise UserError(f"dataset: path does not exist: {path}")
    if os.path.isdir(path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(f"dataset: expected {meta_path}, found no meta.json in {path}")
        with open(meta_path) as f:
            meta = json.load(f)
        arrays = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".npy"):
                arrays[name[:-4]] = np.load(os.path.join(path, name), mmap_mode="r", allow_pickle=False)
    else:
        import zipfile

        if not zipfile.is_zipfile(path):  # an .npz is a zip archive; anything else would get numpy's pickle hint
            raise DataError(f"dataset: expected a directory (.npy files + meta.json) or a .npz file, "
                            f"found {path}, which is neither")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, zlib.error) as e:
            raise DataError(f"dataset: expected a .npz file or a directory, could not read {path}: {e}") from None
        if "meta_json" not in arrays:
            raise DataError(f"dataset: missing key 'meta_json' in {path} (expected the meta dict as JSON)")
        meta = json.loads(str(arrays.pop("meta_json")))
    validate_dataset(arrays, meta)
    return Dataset(arrays, meta, path)


# -----------------------------------------------------------------------------
# Training data: datasets seen as one frame axis; batches drawn from (seed, step)


def read_rows(array, rows):
    """array[rows] for an index array in any order, read in file order (cheap on a memory map)."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    out = np.empty((len(rows),) + array.shape[1:], dtype=array.dtype)
    out[order] = array[rows[order]]
    return out


class Corpus:
    """One or more datasets (e.g. robot demos + action-free human video) as one list of episodes.

    They must agree on views, image size, T and grid. Nothing is read until a batch asks for it,
    and then only the rows it needs (memory-mapped directories stay on disk).
    """

    def __init__(self, datasets):
        first = datasets[0]
        for ds in datasets[1:]:
            for key in META_KEYS:
                a, b = first.meta[key], ds.meta[key]
                if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                    raise DataError(f"datasets disagree on '{key}': {first.path} has {a}, {ds.path} has {b}")
        self.datasets = datasets
        self.views, self.img_size = first.views, first.img_size
        self.T, self.grid = int(first.meta["T"]), int(first.meta["grid"])
        offsets = np.cumsum([0] + [ds.num_frames for ds in datasets])
        rows = []  # one row per episode: dataset, global start, global end
        self.tasks, self.has_actions = [], []
        for d, ds in enumerate(datasets):
            for e in range(ds.num_episodes):
                start, end = ds.episode_range(e)
                rows.append((d, offsets[d] + start, offsets[d] + end))
                self.tasks.append(ds.tasks[e])
                self.has_actions.append(ds.has_actions(e))
        self.ep_dataset, self.ep_start, self.ep_end = (np.array(c, dtype=np.int64) for c in zip(*rows))
        self.offsets = offsets
        self.has_actions = np.array(self.has_actions)

    @property
    def num_episodes(self):
        return len(self.ep_start)

    def dim(self, key):
        arrays = [ds.arrays[key] for ds in self.datasets if key in ds.arrays]
        dims = {a.shape[1] for a in arrays}
        if len(dims) > 1:
            raise DataError(f"datasets disagree on the width of '{key}': {sorted(dims)}")
        return dims.pop() if dims else 0

    def frames(self, episodes):
        """Global frame indices of the given episodes, (F,)."""
        if len(episodes) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(self.ep_start[e], self.ep_end[e]) for e in episodes])

    def episode_of(self, frames):
        return np.searchsorted(self.ep_end, frames, side="right")

    def tasks_of(self, frames):
        """Task text of each frame, as Python strings (they end up as checkpoint dict keys)."""
        return [self.tasks[e] for e in self.episode_of(frames)]

    def gather(self, key, frames):
        """Rows `frames` (any shape) of array `key` across datasets, stacked in that shape."""
        frames = np.asarray(frames)
        flat = frames.reshape(-1)
        d = np.searchsorted(self.offsets, flat, side="right") - 1
        parts = {i: read_rows(self.datasets[i].arrays[key], flat[d == i] - self.offsets[i]) for i in np.unique(d)}
        out = np.empty((len(flat),) + parts[d[0]].shape[1:], dtype=parts[d[0]].dtype)
        for i, rows in parts.items():
            out[d == i] = rows
        return out.reshape(frames.shape + out.shape[1:])

    def action_layout(self, episodes):
        """meta["action_layout"] of the datasets the given episodes come from (None if none records
        one); datasets that record different layouts cannot train one policy."""
        layouts = {self.datasets[d].meta.get("action_layout") for d in set(self.ep_dataset[list(episodes)].tolist())}
        if len(layouts - {None}) > 1:
            raise DataError(f"datasets disagree on meta 'action_layout': {sorted(layouts - {None})}")
        return next(iter(layouts - {None}), None)

    def action_chunks(self, frames, T):
        """actions (B, T, A) from each frame on, and valid (B, T): False past the episode's end."""
        ends = self.ep_end[self.episode_of(frames)]
        idx = frames[:, None] + np.arange(T)[None]
        valid = idx < ends[:, None]
        return self.gather("actions", np.minimum(idx, ends[:, None] - 1)), valid


def load_corpus(paths):
    return Corpus([load_dataset(p) for p in paths])


def split_episodes(corpus, val_episodes):
    """Hold out the last `val_episodes` episodes of each task (whole episodes: no leakage of frames)."""
    train, val = [], []
    for task in dict.fromkeys(corpus.tasks):
        eps = [e for e in range(corpus.num_episodes) if corpus.tasks[e] == task]
        n_val = min(val_episodes, len(eps) - 1) if len(eps) > 1 else 0
        train += eps[: len(eps) - n_val]
        val += eps[len(eps) - n_val:]
    return sorted(train), sorted(val)


def select_episodes(corpus, episodes, need_actions=False, shots=0, only_tasks=(), exclude_tasks=()):
    """The paper's data protocols: action episodes only, the first K per task (few-shot), task filters."""
    out, per_task = [], {}
    for e in episodes:
        task = corpus.tasks[e]
        if need_actions and not corpus.has_actions[e]:
            continue
        if (only_tasks and task not in only_tasks) or task in exclude_tasks:
            continue
        if shots and per_task.get(task, 0) >= shots:
            continue
        per_task[task] = per_task.get(task, 0) + 1
        out.append(e)
    return out


class Normalizer:
    """Per-dimension affine scaling fitted on the training rows, kept in the checkpoint (as stats)."""

    def __init__(self, center, scale):
        self.center = np.asarray(center, dtype=np.float32)
        self.scale = np.maximum(np.asarray(scale, dtype=np.float32), 1e-3)  # constant dims stay finite

    @classmethod
    def from_stats(cls, stats, to="std"):
        """to="std": zero mean, unit std; to="range": the rows' [min, max] onto [-1, 1]."""
        if stats is None:
            raise DataError("normalizer: expected at least one row without NaN, found none")
        if to == "range":
            lo, hi = np.asarray(stats["min"]), np.asarray(stats["max"])
            return cls((lo + hi) / 2, (hi - lo) / 2)
        return cls(stats["mean"], stats["std"])

    def __call__(self, x):
        return (x - self.center) / self.scale

    def inverse(self, x):
        return x * self.scale + self.center


def normalizers(stats):
    """(actions, proprio) normalizers of an inverse checkpoint's stats. Actions go onto [-1, 1], where
    the Gaussian head's tanh mean lives (the published code trains on LIBERO's actions, which span
    it already; Diffusion Policy scales to it too); proprio to zero mean and unit std."""
    return Normalizer.from_stats(stats["actions"], to="range"), Normalizer.from_stats(stats["proprio"])


# -----------------------------------------------------------------------------
# Track metrics (as the published numbers were computed: per coordinate, t = 0 included)


def track_metrics(pred, gt, img_size):
    """pred, gt (..., T, N, 2) normalized. Returns floats.

    mse, pixel_acc, delta_auc follow the published evaluation, which thresholds each coordinate
    separately; the *_euclid variants threshold the Euclidean pixel distance (TAP-Vid style).
    Static background dominates all of these, so two more look at the motion itself: moving_px,
    the median endpoint error in pixels over points that move (> 1 px from their start within the
    window, in gt; NaN when none does), and moving_frac, the share of such points. Report them
    beside the same metrics of `no_motion(gt)`.
    """
    pred, gt = as_tensor(pred).float(), as_tensor(gt).float()
    if pred.shape != gt.shape:
        raise UserError(f"track_metrics: pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    h, w = size_hw(img_size)
    pixel = pred.new_tensor([2 / w, 2 / h])
    err = (pred - gt).abs()
    err_px = err / pixel  # per-coordinate error in pixels
    dist_px = err_px.norm(dim=-1)
    taus = range(1, 11)
    moving = ((gt - gt[..., :1, :, :]) / pixel).norm(dim=-1).amax(dim=-2) > 1.0  # (..., N)
    end_px = dist_px[..., -1, :]  # (..., N) error at the window's last frame
    return {
        "moving_px": float(end_px[moving].median()) if moving.any() else float("nan"),
        "moving_frac": float(moving.float().mean()),
        "mse": float(((pred - gt) ** 2).mean()),
        "pixel_acc": float((err_px < 0.5).float().mean()),
        "delta_auc": float(np.mean([(err_px < tau).float().mean().item() for tau in taus])),
        "pixel_acc_euclid": float((dist_px < 0.5).float().mean()),
        "delta_auc_euclid": float(np.mean([(dist_px < tau).float().mean().item() for tau in taus])),
    }


def no_motion(tracks):
    """The "nothing moves" prediction for tracks (..., T, N, 2): every point stays at its start."""
    tracks = as_tensor(tracks)
    return tracks[..., :1, :, :].expand_as(tracks)


def track_report(pred, gt, img_size):
    """track_metrics of `pred`, and those of "nothing moves" on the same windows as still_*."""
    still = track_metrics(no_motion(gt), gt, img_size)
    return {**track_metrics(pred, gt, img_size),
            **{f"still_{k}": still[k] for k in ("moving_px", "mse", "pixel_acc", "delta_auc")}}


# -----------------------------------------------------------------------------
# Checkpoints: weights + config + stats + step, plain types only, written atomically

# Bumped when a model's parameters change meaning, so an old file is refused instead of misread.
CHECKPOINT_FORMAT = 3
FORMAT_CHANGES = {1: "motion codes read through an nn.Embedding of indices, tokenizer decoder of one query per point",
                  2: "the models before they became the published architecture, layer for layer"}


def save_checkpoint(path, payload):
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, stage=None):
    """Load with weights_only=True (a checkpoint never runs code); check its stage and format."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint: path does not exist: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise DataError(f"checkpoint: could not read {path} as a torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise DataError(f"checkpoint: expected an amplify checkpoint dict with a 'stage', found {type(ckpt).__name__} in {path}")
    if stage is not None and ckpt["stage"] != stage:
        raise DataError(f"checkpoint {path}: expected stage '{stage}', found '{ckpt['stage']}'")
    parts = [(f" ({k})", ckpt[k]) for k in CONFIG_CLASSES if k in ckpt] if ckpt["stage"] == "policy" else [("", ckpt)]
    for where, part in parts:
        found = part.get("format", 1)  # format 1 files predate the key
        if found != CHECKPOINT_FORMAT:
            why = f" ({FORMAT_CHANGES[found]})" if found in FORMAT_CHANGES else ""
            raise DataError(f"checkpoint {path}{where}: expected format {CHECKPOINT_FORMAT}, found format {found}{why}; "
                            f"retrain the {part.get('stage', 'model')} stage with this amplify.py")
    return ckpt


def data_shape(corpus):
    return {"views": corpus.views, "img_size": list(corpus.img_size), "T": corpus.T, "grid": corpus.grid}


def check_data_matches(ckpt, corpus, path):
    """A checkpoint trained on other views / image size / horizon cannot be used on this data."""
    want = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in ckpt["data"].items()}
    for key, found in data_shape(corpus).items():
        if want[key] != found:
            raise DataError(f"checkpoint {path}: trained with {key}={want[key]}, but the data has {key}={found}")


def build_model(stage, config, state=None):
    cls = {"tokenizer": MotionTokenizer, "forward": ForwardDynamics, "inverse": InverseDynamics}[stage]
    if isinstance(config, dict):
        config = config_from_dict(CONFIG_CLASSES[stage], config)
    if state is not None and stage != "tokenizer":
        config = replace(config, vision=replace(config.vision, weights=""))  # the weights come from `state`
    model = cls(config)
    if state is not None:
        model.load_state_dict(state)
    return model


def model_from_checkpoint(ckpt):
    model = build_model(ckpt["stage"], ckpt["config"], ckpt["model"])
    if ckpt.get("text_cache"):
        model.text.cache = {k: torch.tensor(v) for k, v in ckpt["text_cache"].items()}
    return model.eval()


def weights_hash(ckpt):
    """A short content hash of a checkpoint's weights (not its optimizer state or step, so a policy
    bundle's stripped copy hashes the same as the training checkpoint)."""
    h = hashlib.sha256()
    for name in sorted(ckpt["model"]):
        t = ckpt["model"][name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(ckpt['model'][name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def check_trained_with(ckpt, name, others, fix):
    """Provenance: every checkpoint records the weights hash of each model it learned from
    (`trained_with`: the tokenizer whose codes it reads, the forward model that predicted them, the
    checkpoint it fine-tuned). Refuse to combine it with `others` = {stage: (hash, "where it comes from")}
    that differ: its codes would mean something else. Older checkpoints without the record pass unchecked."""
    for stage, (found, what) in others.items():
        recorded = ckpt.get("trained_with", {}).get(stage)
        if recorded is not None and found is not None and recorded != found:
            raise DataError(f"{name} was trained with {stage} {recorded}, but {what} {stage} {found}: {fix}")


# -----------------------------------------------------------------------------
# Training: one flat loop (`fit`) shared by the stages, and one function per stage


def pick_device(name="auto"):
    if isinstance(name, torch.device) or name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16():
    """True where this CPU multiplies bf16 natively (AVX-512 BF16 or AMX; Linux flags): there, CPU
    autocast is a real speed-up; elsewhere bf16 is emulated and slower than fp32."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):  # torch's kernels cannot use it
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision, device):
    """Whether training runs under bf16 autocast: "auto" = on CUDA and on CPUs with native bf16."""
    if precision not in PRECISIONS:
        raise UserError(f"precision: expected one of {list(PRECISIONS)}, found '{precision}'")
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return precision == "bf16"


@dataclass
class RunConfig:
    """How a stage is run, beside its model config and TrainConfig (the CLI builds it from its flags)."""
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps (or a torch.device)
    seed: int = 0  # the batch order is drawn from (seed, step)
    resume: bool = False  # continue from the stage's checkpoint in `out`
    overwrite: bool = False  # replace the stage's checkpoint in `out`, and remove what was trained on it
    compile: bool = False  # torch.compile the training step (long GPU runs; the first steps pay for it)
    precision: str = "auto"  # bf16 autocast on CUDA and on CPUs with native bf16 (see use_bf16); "fp32" turns it off
    vis: bool = False  # write PNGs of predicted vs true tracks at each evaluation
    log_to: str = ""  # also log to "tensorboard" (OUT/tensorboard/<label>) or "wandb" (offline unless WANDB_MODE says)
    # Data protocols (paper section 5): held-out, few-shot, zero-shot by task filters.
    val_episodes: int = 1  # held out per task for evaluation
    shots: int = 0  # inverse: only the first K action episodes of each task (0: all)
    only_tasks: tuple = ()
    exclude_tasks: tuple = ()
    rank: int = 0  # this process in a torchrun job of `world` processes (set by init_distributed)
    world: int = 1


def init_distributed(run: RunConfig):
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPU); the device is decided here."""
    device, world = pick_device(run.device), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return replace(run, device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return replace(run, device=device, rank=torch.distributed.get_rank(), world=world)


def in_distributed_group():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def leave_distributed():
    """Close the process group before the interpreter exits: left to the exit handlers, gloo's threads
    can be torn down while running, and a rank dies with SIGABRT after its work is done (CI saw it once)."""
    if in_distributed_group():
        torch.distributed.destroy_process_group()


def resolve(train, run):
    """Defaults for a stage function's optional configs; the device name becomes a torch.device."""
    run = run or RunConfig()
    if run.vis and importlib.util.find_spec("PIL") is None:
        raise UserError("--vis draws PNGs with Pillow: expected it installed (pip install pillow), found none")
    if run.log_to not in ("", "tensorboard", "wandb"):
        raise UserError(f"--log-to: expected tensorboard or wandb, found '{run.log_to}'")
    if (run.vis or run.log_to) and extras() is None:
        raise UserError("--vis and --log-to: expected amplify_extras.py beside amplify.py, found none")
    if run.resume and run.overwrite:
        raise UserError("--resume continues the checkpoints in --out and --overwrite replaces them: "
                        "expected one, found both")
    return train or TrainConfig(), replace(run, device=pick_device(run.device))


def get_lr(step, cfg: TrainConfig):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warmup = min(cfg.warmup, max(1, cfg.steps // 10))  # short runs (smoke tests, fine-tuning) still decay
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_device(batch, device):
    return {k: (torch.as_tensor(v).to(device, non_blocking=True) if isinstance(v, (np.ndarray, torch.Tensor)) else v)
            for k, v in batch.items()}


class Prefetcher:
    """make(step) for each of `steps`, prepared up to `depth` steps ahead in a background thread, so
    the model does not wait on memory-mapped reads (numpy and torch release the GIL while they copy).
    On CUDA the arrays go into pinned memory there, so the copy to the GPU is asynchronous. `wait` is
    the seconds the training thread has spent blocked on it."""

    def __init__(self, make, steps, device, depth=2):
        from concurrent.futures import ThreadPoolExecutor
        pin = device.type == "cuda"
        self.make = lambda step: {k: torch.as_tensor(v).pin_memory() if pin and isinstance(v, np.ndarray) else v
                                  for k, v in make(step).items()}
        self.steps, self.wait = iter(steps), 0.0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = [self.pool.submit(self.make, s) for s in itertools.islice(self.steps, depth)]

    def next(self):
        t0 = time.perf_counter()
        try:
            item = self.pending.pop(0).result()  # an error of the worker is raised here
        finally:
            self.wait += time.perf_counter() - t0
        self.pending += [self.pool.submit(self.make, s) for s in itertools.islice(self.steps, 1)]
        return item

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)


def log(msg):
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(msg, flush=True)


def clock(seconds):
    """Seconds as h:mm:ss or m:ss, for progress lines."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# Which stages are trained on a stage's output (`label`: the stage, or inverse_ft for the fine-tuned
# inverse model): replacing a tokenizer makes the models trained on its codes meaningless.
DOWNSTREAM = {"tokenizer": ("forward", "inverse", "inverse_ft"), "forward": ("inverse_ft",),
              "inverse": ("inverse_ft",), "inverse_ft": ()}


def check_outputs(out, labels, run):
    """Refuse, before any work, to train a stage into a directory that holds its checkpoint unless
    the user said what to do with it: --resume continues it, --overwrite replaces it."""
    if run.resume or run.overwrite:
        return
    for path in (os.path.join(out, label + ".pt") for label in labels):
        if os.path.exists(path):
            raise UserError(f"{path} exists: expected --resume to continue it or --overwrite to replace it "
                            f"(and remove what was trained on it); nothing was changed")


def clear_outputs(out, label, run):
    """--overwrite: remove stage `label`'s files (checkpoint, metrics, log, curves, pictures), those of
    every stage trained on it, and policy.pt, so nothing trained on the old model stays beside the new."""
    check_outputs(out, [label], run)
    if not run.overwrite or run.rank != 0 or not os.path.exists(os.path.join(out, label + ".pt")):
        return
    labels = (label,) + DOWNSTREAM[label]
    stale = sorted(n for n in os.listdir(out) if n == "policy.pt" or any(
        n in (f"{lab}.pt", f"{lab}_metrics.jsonl", f"{lab}_log.jsonl", f"{lab}_curves.png")
        or re.fullmatch(rf"vis_{lab}_\d+\.png", n) for lab in labels))
    for name in stale:
        os.remove(os.path.join(out, name))
    log(f"{label} | --overwrite: removed {', '.join(stale)}")


def start_jsonl(path, resumed_step):
    """A metrics file holds one run: a fresh run starts it empty; a resumed run keeps the rows up to
    the step it resumed from (rows written after that checkpoint are replaced by the rerun)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= resumed_step] if resumed_step else []
    atomic_write(path, lambda tmp: open(tmp, "w").writelines(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class StageLoss(nn.Module):
    """The loss as forward(): DistributedDataParallel syncs the gradients of what runs through forward()."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def fit(model, *, stage, train: TrainConfig, run: RunConfig, frames, val, make_batch, loss_fn, evaluate, out_path,
        extra, label=None, reference=None, resumed=None):
    """The training loop: step, periodic eval, one log line, atomic checkpoint. Resumable: step s trains
    on frames drawn with an RNG seeded by (run.seed, s), so a resumed run replays exactly and every
    torchrun rank draws the same batch and trains on its slice of it.

    make_batch(frames) -> dict of arrays (in a background thread); loss_fn(model, batch) -> (loss, metrics);
    evaluate(model, step) -> {name: float} on the held-out frames `val`; `extra` goes into the checkpoint;
    `reference` = (name, {metric: value}), a trivial prediction's score. Writes <label>_metrics.jsonl,
    <label>_log.jsonl and <label>_curves.png beside `out_path`."""
    label, device = label or stage, run.device
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=train.lr,
                            fused=device.type in ("cpu", "cuda"))  # one kernel, no parameter-sized temporaries
    step = 0
    if resumed is not None:
        ckpt = resumed
        check_trained_with(ckpt, out_path, {k: (v, "this run uses") for k, v in extra["trained_with"].items()},
                           "--overwrite to retrain it on the new one")  # its inputs must not have changed since
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:  # an imported checkpoint (import_official.py) starts with a fresh optimizer
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"])  # dropout continues the same random stream
        step = int(ckpt["step"])
        log(f"{label} | resumed from {out_path} at step {step}")
    out_dir = os.path.dirname(out_path)
    metrics_path, log_path = (os.path.join(out_dir, f"{label}_{kind}.jsonl") for kind in ("metrics", "log"))
    if run.rank == 0:
        os.makedirs(out_dir or ".", exist_ok=True)  # a stage called from Python may name a new directory
        for path in (metrics_path, log_path):
            start_jsonl(path, step)
    tracker = None  # --log-to
    if run.log_to and run.rank == 0:
        tracker = extras().Tracker(run.log_to, out_dir or ".", label, {**extra.get("config", {}), "train": asdict(train)})
    net = StageLoss(model, loss_fn)
    if run.world > 1:
        if train.batch_size % run.world:
            raise UserError(f"--batch-size: expected a multiple of the {run.world} ranks, found {train.batch_size}")
        if device.type == "cuda":  # batch statistics over the global batch, as in a single-process run
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if run.compile:
        net = torch.compile(net)

    def save(step):
        payload = {"stage": stage, "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": step,
                   "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "train": asdict(train), **extra}
        if getattr(model, "text", None) is not None and model.text.cache:
            payload["text_cache"] = {k: v.tolist() for k, v in model.text.cache.items()}
        save_checkpoint(out_path, payload)

    def draw(step):  # this rank's slice of the step's global batch
        return make_batch(np.random.default_rng([run.seed, step]).choice(frames, train.batch_size)[run.rank::run.world])

    use_amp, start, first_step, metrics = use_bf16(run.precision, device), time.time(), step, None
    with Prefetcher(draw, range(step, train.steps), device) as loader:
        t0, seen, wait0 = time.time(), 0, 0.0
        while step < train.steps:
            net.train()
            for group in opt.param_groups:
                group["lr"] = get_lr(step, train)
            batch = to_device(loader.next(), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, info = net(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP, gradients are averaged across ranks here
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            step += 1
            seen += train.batch_size
            if step % train.log_every == 0 or step == train.steps:
                loss_value = loss.detach().float()
                if run.world > 1:
                    torch.distributed.all_reduce(loss_value)
                    loss_value /= run.world
                now = time.time()
                window, elapsed = max(1e-9, now - t0), now - start
                row = {"step": step, "loss": loss_value.item(), **{k: float(v) for k, v in info.items()},
                       "lr": get_lr(step - 1, train), "samples_per_s": seen / window,
                       "data_wait": (loader.wait - wait0) / window, "elapsed_s": elapsed}
                log(f"{label} | step {step}/{train.steps} | loss {row['loss']:.4f}"
                    + "".join(f" | {k} {float(v):.4f}" for k, v in info.items())
                    + f" | lr {row['lr']:.2e} | {row['samples_per_s']:.1f} samples/s | data wait "
                    f"{100 * row['data_wait']:.0f}% | elapsed {clock(elapsed)} | "
                    f"eta {clock(elapsed / (step - first_step) * (train.steps - step))}")
                if run.rank == 0:
                    append_jsonl(log_path, row)
                    if tracker:
                        tracker.scalars("train", row, step)
                t0, seen, wait0 = time.time(), 0, loader.wait
            if (step % train.eval_every == 0 or step == train.steps) and run.rank == 0:
                save(step)
                if len(val):
                    model.eval()
                    with torch.no_grad():
                        metrics = evaluate(model, step)
                    log(f"{label} | eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    append_jsonl(metrics_path, {"step": step, **metrics})
                    if tracker:
                        tracker.scalars("val", metrics, step)
                        tracker.image("vis", os.path.join(out_dir, f"vis_{label}_{step:06d}.png"), step)
    if run.rank == 0:
        if step == 0 or not os.path.exists(out_path):
            save(step)
        log(stage_summary(label, step - first_step, time.time() - start, metrics, reference, len(val)))
        curves = os.path.join(out_dir, f"{label}_curves.png")
        try:  # amplify.py needs torch, numpy and einops only; pictures need Pillow and amplify_extras.py
            import amplify_extras
            picture = amplify_extras.plot_curves(label, read_jsonl(log_path), read_jsonl(metrics_path), reference)
        except ImportError:
            picture = None
            log(f"{label} | curves: not drawn (pip install pillow; amplify_extras.py beside amplify.py)")
        if picture is not None:
            write_png(curves, picture)
            log(f"{label} | curves: {curves}")
        if tracker:
            tracker.image("curves", curves, step)
            tracker.close()
    if run.world > 1:
        check_ranks_agree(model, label)
    return model


# The headline metric of each stage's summary, and whether lower is better.
SUMMARY_METRICS = ("delta_auc", "pixel_acc", "mse", "code_acc", "val_nll", "action_mse", "action_mse_norm")


def stage_summary(label, steps, seconds, metrics, reference, n_val):
    """One line at the end of a stage: time taken, final held-out metrics beside the trivial reference."""
    head = f"{label} | done: {steps} steps in {clock(seconds)}"
    if not metrics:
        return head + " | no held-out evaluation in this run"
    ref_name, ref = reference or ("", {})
    parts = [f"{k} {metrics[k]:.4f}" + (f" ({ref_name}: {ref[k]:.4f})" if k in ref else "")
             for k in SUMMARY_METRICS if k in metrics]
    return f"{head} | held-out ({n_val} windows): " + ", ".join(parts)


def check_ranks_agree(model, label):
    """After DDP training every rank must hold the same weights; say so in the log."""
    import torch.distributed as dist
    mine = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    rank0 = mine.clone()
    dist.broadcast(rank0, 0)  # gloo broadcasts CPU tensors; NCCL needs them on the GPU
    diff = (mine - rank0).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    log(f"{label} | ddp: {dist.get_world_size()} ranks, max weight difference {diff.item():.3g}")
    dist.barrier()  # rank 0 has written the checkpoint the next stage reads


def held_out_batches(frames, make_batch, train, run):
    """Evaluation: the held-out frames in training-size batches on the device."""
    for i in range(0, len(frames), train.batch_size):
        yield to_device(make_batch(frames[i:i + train.batch_size]), run.device)


def encoder_key(vision):
    """Hash of what a frozen encoder's features depend on: its ResNet weights and input size."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((vision.cfg.upsample, vision.feature_shape)).encode())
    for name, t in vision.resnet.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def images_key(corpus):
    """Which images the corpus holds, without reading them: each images file's path, shape, size and
    modification time (datasets are written by renaming a whole new file into place)."""
    h = hashlib.blake2b(digest_size=8)
    for ds in corpus.datasets:
        path = os.path.join(ds.path, "images.npy") if os.path.isdir(ds.path) else ds.path
        st = os.stat(path)
        h.update(repr((os.path.abspath(path), ds.arrays["images"].shape, st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()


def frozen_features(corpus, vision, out, run: RunConfig, batch=32):
    """ResNet features of every frame, float16 (F, V, C, h, w), memory-mapped from a cache next to the
    run: OUT/features/<encoder hash>-<images hash>.npy. Computed once (atomically written) and
    then shared by every stage and rerun whose frozen encoder and images are the same."""
    path = os.path.join(out, "features", f"{encoder_key(vision)}-{images_key(corpus)}.npy")
    shape = (int(corpus.offsets[-1]),) + tuple(vision.feature_shape)
    if not os.path.exists(path) and run.rank == 0:
        vision, t0 = vision.to(run.device).eval(), time.time()

        def fill(tmp):
            cache = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
            with torch.no_grad():
                for i in range(0, shape[0], batch):
                    images = torch.as_tensor(corpus.gather("images", np.arange(i, min(shape[0], i + batch))))
                    cache[i:i + len(images)] = vision.features(images.to(run.device)).cpu().numpy()
            cache.flush()
            del cache

        atomic_write(path, fill)
        log(f"features: {shape[0]} frames through the frozen encoder in {time.time() - t0:.0f}s -> {path}")
    if run.world > 1:
        torch.distributed.barrier()  # rank 0 has written the cache
    cache = np.load(path, mmap_mode="r", allow_pickle=False)
    if cache.shape != shape or cache.dtype != np.float16:
        raise DataError(f"feature cache {path}: expected float16 {shape}, found {cache.dtype} {cache.shape}")
    return cache


def tracks_batch(corpus, frames):
    return corpus.gather("tracks", frames).astype(np.float32)  # (B, V, T, N, 2)


def vis_image(corpus, frame, pred, path):
    """--vis: true and predicted tracks of held-out window `frame` side by side, a row per view."""
    images, gt = corpus.gather("images", [frame])[0], tracks_batch(corpus, [frame])[0]
    write_png(path, extras().track_picture(images, gt, pred, corpus.views))


def stage_episodes(corpus, run: RunConfig, train: TrainConfig, stage, need_actions=False):
    """(train episodes, held-out episodes, training frames, evaluation frames) of a stage. The
    tokenizer and forward model take every episode (video is enough), the inverse model those with
    actions."""
    train_eps, val_eps = split_episodes(corpus, run.val_episodes)
    train_eps = select_episodes(corpus, train_eps, need_actions=need_actions, shots=run.shots if need_actions else 0,
                                only_tasks=run.only_tasks, exclude_tasks=run.exclude_tasks)
    val_eps = select_episodes(corpus, val_eps, need_actions=need_actions)
    frames = corpus.frames(train_eps)
    if len(frames) == 0:
        raise DataError(f"{stage}: expected at least one training episode after the filters, found none")
    return train_eps, val_eps, frames, eval_frames(corpus, val_eps, train.eval_samples)


def eval_frames(corpus, episodes, n):
    """A fixed, evenly spaced subset of held-out frames, so evaluations are comparable across steps."""
    frames = corpus.frames(episodes)
    return frames[np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)] if len(frames) else frames


def no_motion_reference(corpus, val):
    """What "nothing moves" scores on the held-out windows: every report of the track metrics carries it."""
    if not len(val):
        return None
    gt = torch.as_tensor(tracks_batch(corpus, val))  # (B, V, T, N, 2)
    return "nothing moves", track_metrics(no_motion(gt), gt, corpus.img_size)


def checkpoint_for(path, stage, corpus):
    """A trained stage's checkpoint, refused unless it was trained on data shaped like `corpus`."""
    ckpt = load_checkpoint(path, stage)
    check_data_matches(ckpt, corpus, path)
    return ckpt


def load_stage(path, stage, corpus, device):
    """A trained stage for this data: (checkpoint, model in eval mode on `device`)."""
    ckpt = checkpoint_for(path, stage, corpus)
    return ckpt, model_from_checkpoint(ckpt).to(device)


def resumed_checkpoint(path, stage, corpus, run: RunConfig):
    """The checkpoint --resume continues, or None. Its model config (and the inverse model's
    normalization) is the run's, whatever the preset and flags say: a resumed model is that model."""
    return checkpoint_for(path, stage, corpus) if run.resume and os.path.exists(path) else None


def n_params(model):
    return f"{sum(p.numel() for p in model.parameters()):,} params"


def train_tokenizer(corpus, cfg: TokenizerConfig, out, train: TrainConfig = None, run: RunConfig = None):
    """Train the motion tokenizer on `corpus`; writes out/tokenizer.pt. The data fields of `cfg`
    (views, img_size, T, grid) are taken from the corpus."""
    train, run = resolve(train, run)
    cfg = replace(cfg, views=len(corpus.views), img_size=corpus.img_size, T=corpus.T, grid=corpus.grid)
    resumed = resumed_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer", corpus, run)
    cfg = cfg if resumed is None else config_from_dict(TokenizerConfig, resumed["config"])
    train_eps, val_eps, frames, val = stage_episodes(corpus, run, train, "tokenizer")
    model = MotionTokenizer(cfg)
    log(f"tokenizer | {n_params(model)} | {len(train_eps)} train episodes, {len(val_eps)} held out | "
        f"codebook {model.fsq.codebook_size}")

    def make_batch(f):
        return {"tracks": tracks_batch(corpus, f)}

    def evaluate(model, step):
        preds, gts, losses, used = [], [], [], set()
        for b in held_out_batches(val, make_batch, train, run):
            tracks = b["tracks"]
            losses.append(model.loss(tracks)[0].item())
            _, idx = model.encode(tracks)
            used.update(idx.flatten().tolist())
            preds.append(model.decode(idx, tracks[:, :, 0]).cpu())
            gts.append(tracks.cpu())
        pred, gt = torch.cat(preds), torch.cat(gts)  # (n, V, T, N, 2)
        if run.vis:
            vis_image(corpus, val[0], pred[0].numpy(), os.path.join(out, f"vis_tokenizer_{step:06d}.png"))
        per_view = {}  # the pooled figures hide which view's motion is learned
        for v, view in enumerate(corpus.views):
            report = track_report(pred[:, v], gt[:, v], corpus.img_size)
            per_view.update({f"{key}_{view}": report[key] for key in ("moving_px", "still_moving_px", "moving_frac")})
        return {"val_loss": float(np.mean(losses)), **track_report(pred, gt, corpus.img_size), **per_view,
                "codes_used": len(used) / model.fsq.codebook_size}

    clear_outputs(out, "tokenizer", run)
    return fit(model, stage="tokenizer", train=train, run=run, frames=frames, val=val, make_batch=make_batch,
               loss_fn=lambda model, b: model.loss(b["tracks"]), evaluate=evaluate,
               out_path=os.path.join(out, "tokenizer.pt"), reference=no_motion_reference(corpus, val), resumed=resumed,
               extra={"config": asdict(cfg), "data": data_shape(corpus), "trained_with": {}})


def train_forward(corpus, cfg: ForwardConfig, out, train: TrainConfig = None, run: RunConfig = None, tokenizer=None):
    """Train the forward model on codes of the frozen tokenizer (default out/tokenizer.pt); writes
    out/forward.pt. The data fields and the codebook size of `cfg` come from the corpus and the tokenizer."""
    train, run = resolve(train, run)
    tok_path = tokenizer or os.path.join(out, "tokenizer.pt")
    tok_ckpt, tokenizer = load_stage(tok_path, "tokenizer", corpus, run.device)
    cfg = replace(cfg, views=len(corpus.views), img_size=corpus.img_size, T=corpus.T,
                  codebook_size=tok_ckpt["config"]["codebook_size"])
    resumed = resumed_checkpoint(os.path.join(out, "forward.pt"), "forward", corpus, run)
    if resumed is not None:
        cfg = config_from_dict(ForwardConfig, resumed["config"])
    elif cfg.text_encoder != "hash":
        cfg = replace(cfg, text_dim=pretrained_text_dim(cfg.text_encoder))
    train_eps, val_eps, frames, val = stage_episodes(corpus, run, train, "forward")
    model = ForwardDynamics(cfg)
    model.code_in.proj.load_state_dict(tokenizer.code_out.state_dict())  # codes read as the tokenizer reads them
    log(f"forward | {n_params(model)} | {len(train_eps)} train episodes, {len(val_eps)} held out | "
        f"tokenizer {tok_path}")
    features = frozen_features(corpus, model.vision, out, run) if cfg.vision.frozen else None

    def make_batch(f):
        images = corpus.gather("images", f) if features is None else read_rows(features, f)  # frozen: features
        return {"images": images, "tracks": tracks_batch(corpus, f), "tasks": corpus.tasks_of(f)}

    def loss_fn(model, batch):
        with torch.no_grad():
            codes = tokenizer.encode(batch["tracks"])[1]  # targets from the frozen tokenizer
        return model.loss(batch["images"], batch["tasks"], codes)

    def evaluate(model, step):
        losses, accs, preds, gts = [], [], [], []
        for b in held_out_batches(val, make_batch, train, run):
            loss, metrics = loss_fn(model, b)
            losses.append(loss.item())
            accs.append(metrics["code_acc"].item())
            preds.append(tokenizer.decode(model.generate(b["images"], b["tasks"]), b["tracks"][:, :, 0]).cpu())
            gts.append(b["tracks"].cpu())
        pred, gt = torch.cat(preds), torch.cat(gts)
        if run.vis:
            vis_image(corpus, val[0], pred[0].numpy(), os.path.join(out, f"vis_forward_{step:06d}.png"))
        return {"val_loss": float(np.mean(losses)), "code_acc": float(np.mean(accs)),
                **track_report(pred, gt, corpus.img_size)}

    extra = {"config": asdict(cfg), "data": data_shape(corpus), "tokenizer_path": os.path.abspath(tok_path),
             "trained_with": {"tokenizer": weights_hash(tok_ckpt)}}
    clear_outputs(out, "forward", run)
    return fit(model, stage="forward", train=train, run=run, frames=frames, val=val, make_batch=make_batch,
               loss_fn=loss_fn, evaluate=evaluate, out_path=os.path.join(out, "forward.pt"), extra=extra,
               reference=no_motion_reference(corpus, val), resumed=resumed)


def train_inverse(corpus, cfg: InverseConfig, out, train: TrainConfig = None, run: RunConfig = None, tokenizer=None,
                  forward=None, codes="true", init=None):
    """Train the inverse model on motion codes and write it to out/inverse.pt (codes="true") or
    out/inverse_ft.pt (codes="pred").

    codes="true": codes of the true tracks, from the tokenizer (default out/tokenizer.pt).
    codes="pred": codes the forward model (default out/forward.pt) predicts from the images, either
    fine-tuning the inverse checkpoint `init` (its config and normalizers are kept: the paper's
    protocol) or, with init=None, a new model (the published code's protocol).
    Without codes (cfg.use_codes False) it is the behaviour-cloning baseline.

    Held-out action errors are reported for the codes trained on (action_mse) and, whichever of the
    tokenizer and forward model is at hand, for true (action_mse_true) and predicted codes
    (action_mse_pred): a prior that works has both well below the no-codes baseline's action_mse."""
    train, run = resolve(train, run)
    if codes not in ("true", "pred"):
        raise UserError(f"train_inverse: expected codes 'true' or 'pred', found {codes!r}")
    name = "inverse_ft" if codes == "pred" else "inverse"
    tok_path, fwd_path = tokenizer or os.path.join(out, "tokenizer.pt"), forward or os.path.join(out, "forward.pt")
    init_ckpt = None if init is None else checkpoint_for(init, "inverse", corpus)
    resumed = resumed_checkpoint(os.path.join(out, name + ".pt"), "inverse", corpus, run)
    kept = resumed or init_ckpt  # a resumed or fine-tuned model keeps its config and normalization
    cfg = cfg if kept is None else config_from_dict(InverseConfig, kept["config"])
    if init_ckpt is not None and not cfg.use_codes:
        raise UserError(f"--predicted-codes fine-tunes on forward-model codes, but {init} was trained "
                        f"without codes (--no-codes)")
    if codes == "pred" and not cfg.use_codes:
        raise UserError("--predicted-codes trains on forward-model codes; it cannot be combined with --no-codes")
    # The model that makes the codes trained on is required; the other is loaded for the diagnostics
    # when its checkpoint is there.
    tok_model = fwd_model = None
    if cfg.use_codes and (codes == "true" or tokenizer or os.path.exists(tok_path)):
        tok_ckpt, tok_model = load_stage(tok_path, "tokenizer", corpus, run.device)
    if cfg.use_codes and (codes == "pred" or forward or os.path.exists(fwd_path)):
        fwd_ckpt, fwd_model = load_stage(fwd_path, "forward", corpus, run.device)
    # Provenance: the weights this model learns from, by content hash (a policy that mixes stages is refused).
    trained_with = {}
    if cfg.use_codes:
        codebook_size = (tok_ckpt if codes == "true" else fwd_ckpt)["config"]["codebook_size"]
        trained_with["tokenizer"] = (weights_hash(tok_ckpt) if codes == "true"
                                     else fwd_ckpt.get("trained_with", {}).get("tokenizer"))
    if codes == "pred":
        trained_with["forward"] = weights_hash(fwd_ckpt)
    if init_ckpt is not None:  # the forward model must speak the codes the inverse model learnt
        speaks = {"tokenizer": (trained_with["tokenizer"], f"{fwd_path} predicts the codes of")}
        check_trained_with(init_ckpt, init, speaks, "retrain one of them on the other's tokenizer")
        known = {k: v for k, v in trained_with.items() if v is not None}  # an older forward model records none
        trained_with = {**init_ckpt.get("trained_with", {}), **known, "init": weights_hash(init_ckpt)}
    train_eps, val_eps, frames, val = stage_episodes(corpus, run, train, "inverse (episodes with actions)", True)
    if corpus.dim("proprio") == 0:
        raise DataError("inverse: expected key 'proprio' in the data, found none")
    if kept is not None:
        stats, action_layout = kept["stats"], kept.get("action_layout")
    else:  # statistics of the training episodes only, kept in the checkpoint: the policy acts in data units
        stats = {key: array_stats(corpus.gather(key, frames)) for key in ("actions", "proprio")}
        action_layout = corpus.action_layout(train_eps)
        cfg = replace(cfg, views=len(corpus.views), img_size=corpus.img_size, T=corpus.T,
                      action_dim=corpus.dim("actions"), proprio_dim=corpus.dim("proprio"),
                      **({"codebook_size": codebook_size} if cfg.use_codes else {}))
    act_norm, prop_norm = normalizers(stats)
    model = build_model("inverse", cfg, init_ckpt["model"] if init_ckpt is not None else None)
    if cfg.use_codes and init_ckpt is None:  # codes read as the tokenizer reads them (the forward model holds a copy)
        code_out = tok_model.code_out if tok_model is not None else fwd_model.code_in.proj
        model.code_in.proj.load_state_dict(code_out.state_dict())
    baseline = "goal-conditioned" if cfg.goal else "inverse-only"
    codes_from = (f"none ({baseline} baseline)" if not cfg.use_codes else "true tracks" if codes == "true"
                  else f"forward-predicted, {'from scratch' if init_ckpt is None else 'fine-tuning ' + init}")
    log(f"{name} | {n_params(model)} | {len(train_eps)} action episodes ({len(frames)} frames), "
        f"{len(val_eps)} held out | codes: {codes_from} | head: {cfg.head}" + (" | task text read" if cfg.goal else ""))
    features = frozen_features(corpus, model.vision, out, run) if cfg.vision.frozen else None
    # The forward model that predicts codes reads the same cached features only if its encoder is the same.
    forward_reads_features = (features is not None and fwd_model is not None and fwd_model.cfg.vision.frozen
                              and encoder_key(fwd_model.vision) == encoder_key(model.vision))

    def make_batch(f):
        actions, valid = corpus.action_chunks(f, cfg.T)
        images = corpus.gather("images", f) if features is None else read_rows(features, f)  # frozen: features
        b = {"images": images, "proprio": prop_norm(corpus.gather("proprio", f)).astype(np.float32),
             "actions": act_norm(actions).astype(np.float32), "valid": valid.astype(np.float32),
             "tasks": corpus.tasks_of(f)}
        if tok_model is not None:
            b["tracks"] = tracks_batch(corpus, f)
        if fwd_model is not None and not forward_reads_features and features is not None:
            b["forward_images"] = corpus.gather("images", f)
        return b

    def codes_for(batch, source=codes):
        if not cfg.use_codes:
            return None
        with torch.no_grad():
            if source == "pred":
                return fwd_model.generate(batch.get("forward_images", batch["images"]), batch["tasks"])
            return tok_model.encode(batch["tracks"])[1]

    def loss_fn(model, b):
        return model.loss(b["images"], b["proprio"], codes_for(b), b["actions"], b["valid"], b["tasks"])

    def action_mse(model, b, codes, generator):
        """Squared error of the chunk the policy would act on, in data units: (over the valid steps, at the first step)."""
        chunk = model(b["images"], b["proprio"], codes, generator=generator, tasks=b["tasks"])  # (B, T, A)
        err = (act_norm.inverse(chunk.float().cpu().numpy()) - act_norm.inverse(b["actions"].cpu().numpy())) ** 2
        valid = b["valid"].bool()
        return err[valid.cpu().numpy()].mean(), err[:, 0].mean(), ((chunk - b["actions"]) ** 2)[valid].mean().item()

    sources = [s for s, m in (("true", tok_model), ("pred", fwd_model)) if m is not None]

    def evaluate(model, step):
        rows = []
        # The same noise at every evaluation, drawn beside training's random stream (a resumed run replays it).
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(run.seed)
            g = torch.Generator(device=run.device).manual_seed(run.seed)
            for b in held_out_batches(val, make_batch, train, run):
                row = {"val_nll" if cfg.head == "gaussian" else "val_loss": loss_fn(model, b)[0].item()}
                row["action_mse"], row["action_mse_first"], row["action_mse_norm"] = action_mse(model, b, codes_for(b), g)
                for source in sources:  # the diagnostics: both kinds of codes on the same windows
                    row[f"action_mse_{source}"] = (row["action_mse"] if source == codes
                                                   else action_mse(model, b, codes_for(b, source), g)[0])
                rows.append(row)
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def reference():
        """Predicting the training episodes' mean action at every step."""
        if not len(val):
            return None
        actions, valid = corpus.action_chunks(val, cfg.T)  # (B, T, A), (B, T)
        mean = np.asarray(stats["actions"]["mean"], dtype=np.float32)
        return "mean action", {"action_mse_norm": float(((act_norm(actions) - act_norm(mean))[valid] ** 2).mean()),
                               "action_mse": float(((actions - mean)[valid] ** 2).mean())}

    # stats: mean and std (the normalizers) and min and max per dimension of the training rows;
    # action_layout: the dataset's meta["action_layout"] (e.g. xyz_gripper), so a robot can refuse a
    # policy whose actions are in other units.
    extra = {"config": asdict(cfg), "data": data_shape(corpus), "predicted_codes": codes == "pred",
             "codes_protocol": None if codes == "true" else "published" if init_ckpt is None else "paper",
             "stats": stats, "action_layout": action_layout, "trained_with": trained_with,
             "protocol": {"shots": run.shots, "only_task": list(run.only_tasks),
                          "exclude_task": list(run.exclude_tasks), "train_episodes": len(train_eps)}}
    clear_outputs(out, name, run)
    return fit(model, stage="inverse", train=train, run=run, frames=frames, val=val, make_batch=make_batch,
               loss_fn=loss_fn, evaluate=evaluate, out_path=os.path.join(out, name + ".pt"), extra=extra, label=name,
               reference=reference(), resumed=resumed)


# -----------------------------------------------------------------------------
# Temporal ensembling (ACT): blend every still-valid chunk's proposal for the current step


def ensemble_weights(n, k=0.01):
    """Weights of n proposals, oldest first: exp(-k * i), i = 0 the oldest, normalized."""
    weights = np.exp(-k * np.arange(n))
    return weights / weights.sum()


class TemporalEnsembler:
    """Feed one chunk (horizon, A) per control step; get the action to execute now."""

    def __init__(self, horizon, k=0.01):
        self.horizon, self.k = horizon, k
        self.reset()

    def reset(self):
        self.chunks = []  # (step the chunk was made at, chunk), oldest first
        self.t = 0

    def step(self, chunk):
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise UserError(f"TemporalEnsembler.step: expected a chunk (horizon, A), found shape {chunk.shape}")
        self.chunks.append((self.t, chunk))
        self.chunks = [(t0, c) for t0, c in self.chunks if self.t - t0 < min(self.horizon, len(c))]
        proposals = np.stack([c[self.t - t0] for t0, c in self.chunks])  # (n, A), oldest first
        self.t += 1
        return ensemble_weights(len(proposals), self.k) @ proposals


# -----------------------------------------------------------------------------
# The composed policy: forward model -> codes -> inverse model -> action chunk -> temporal ensembling


def stage_checkpoints(out_dir):
    """The checkpoints a policy needs from a training directory, without optimizer state: the
    fine-tuned inverse model if present, and the tokenizer and forward model if it uses codes.
    Each part keeps the name of the file it came from (`source`), for error messages."""
    def part(path, stage):
        return {**{k: v for k, v in load_checkpoint(path, stage).items() if k != "optimizer"}, "source": path}

    fine_tuned = os.path.join(out_dir, "inverse_ft.pt")
    parts = {"inverse": part(fine_tuned if os.path.exists(fine_tuned) else os.path.join(out_dir, "inverse.pt"),
                             "inverse")}
    if parts["inverse"]["config"]["use_codes"]:
        parts.update({stage: part(os.path.join(out_dir, stage + ".pt"), stage) for stage in ("tokenizer", "forward")})
    check_policy_parts(parts)
    return parts


def check_policy_parts(parts, where=""):
    """The three stages of a policy must belong together: the inverse model was trained on the
    codes of this tokenizer (and, fine-tuned, on this forward model's predictions), and the forward
    model predicts this tokenizer's codes. A mix is refused, naming both checkpoints."""
    if parts.get("tokenizer") is None or parts.get("forward") is None:
        return
    name = {k: where + str(parts[k].get("source", k)) for k in ("inverse", "tokenizer", "forward")}
    found = {k: (weights_hash(parts[k]), f"{name[k]} is") for k in ("tokenizer", "forward")}
    fix = "retrain it on that one (--overwrite) or use the one it was trained with"
    check_trained_with(parts["inverse"], name["inverse"], found, fix)
    check_trained_with(parts["forward"], name["forward"], {"tokenizer": found["tokenizer"]}, fix)


def write_policy(out_dir):
    """Bundle the stage checkpoints in out_dir into out_dir/policy.pt (refused if they do not belong together)."""
    path = os.path.join(out_dir, "policy.pt")
    save_checkpoint(path, {"stage": "policy", "format": CHECKPOINT_FORMAT, **stage_checkpoints(out_dir)})
    return path


def policy_uses_bf16(precision, device, width):
    """Whether a policy acts under bf16 autocast. "auto": where training would (CUDA, CPUs with native
    bf16) and the models are wide enough for their matmuls to dominate. Sampling 15 codes at batch 1
    reads every forward-model weight 15 times and bf16 halves those reads: 1.6x per policy step at
    the paper preset's width 768; at the cpu preset's 64 the casts cost more than they save (0.71x)."""
    return use_bf16(precision, device) and (precision != "auto" or width >= 256)


class Policy:
    """images (V, H, W, 3) uint8 + proprio (P,) + task -> action (A,), in the units of the training data.

    precision: "auto" runs the models under bf16 autocast where policy_uses_bf16 says it gains,
    "fp32" turns that off, "bf16" forces it. temperature / top_k: how codes are sampled (0: greedy).
    seed: sampled heads and codes restart from it at reset().
    """

    def __init__(self, inverse_ckpt, tokenizer_ckpt=None, forward_ckpt=None, device=None, k=0.01,
                 temperature=0.0, top_k=None, seed=0, precision="auto"):
        self.device = pick_device(device or "auto")
        check_policy_parts({"inverse": inverse_ckpt, "tokenizer": tokenizer_ckpt, "forward": forward_ckpt})
        self.inverse = model_from_checkpoint(inverse_ckpt).to(self.device)
        cfg = self.inverse.cfg
        self.uses_codes = cfg.use_codes
        self.tokenizer = self.forward = None
        if self.uses_codes:
            if tokenizer_ckpt is None or forward_ckpt is None:
                raise DataError("policy: the inverse model uses motion codes, so a tokenizer and a forward model are needed")
            self.tokenizer = model_from_checkpoint(tokenizer_ckpt).to(self.device)
            self.forward = model_from_checkpoint(forward_ckpt).to(self.device)
        self.bf16 = policy_uses_bf16(precision, self.device, (self.forward or self.inverse).cfg.d_model)
        # Both models frozen on the same ResNet (pretrained weights, or the fixed random one): one
        # vision pass per step feeds both, as in the published code.
        self.shared_vision = (self.uses_codes and self.forward.cfg.vision.frozen and cfg.vision.frozen
                              and encoder_key(self.forward.vision) == encoder_key(self.inverse.vision))
        data = inverse_ckpt["data"]
        self.views, self.img_size, self.horizon = list(data["views"]), tuple(data["img_size"]), cfg.T
        self.action_dim, self.proprio_dim = cfg.action_dim, cfg.proprio_dim
        stats = inverse_ckpt["stats"]
        self.act_norm, self.prop_norm = normalizers(stats)
        self.action_stats = {k: np.asarray(v, dtype=np.float32) for k, v in stats["actions"].items()}  # mean, std, ...
        # What a robot checks before it lets the policy move it: the units of the actions. The layout
        # is the dataset's meta["action_layout"] (None when it recorded none); ranges are per-dimension
        # {"min", "max"} of the training rows (None for checkpoints written before they were kept).
        self.action_layout = inverse_ckpt.get("action_layout")
        self.action_range, self.proprio_range = (
            {k: np.asarray(stats[key][k], dtype=np.float32) for k in ("min", "max")} if "min" in stats[key] else None
            for key in ("actions", "proprio"))
        self.temperature, self.top_k = temperature, top_k
        self.ensembler = TemporalEnsembler(self.horizon, k)
        self.seed, self.generator = seed, torch.Generator(device=self.device)  # sampled heads and codes draw from it
        self.reset()

    @classmethod
    def load(cls, path, device=None, **kwargs):
        """`path`: DIR/policy.pt from --stage all, or a directory holding the stage checkpoints."""
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "policy.pt")):
            parts = stage_checkpoints(path)
        else:
            path = os.path.join(path, "policy.pt") if os.path.isdir(path) else path
            parts = load_checkpoint(path, "policy")
            check_policy_parts(parts, where=f"{path}: ")
        return cls(parts["inverse"], parts.get("tokenizer"), parts.get("forward"), device=device, **kwargs)

    def reset(self):
        """A new episode: forget earlier chunks, restart the sampling noise from the seed (an episode's
        actions then depend on its observations alone)."""
        self.ensembler.reset()
        self.generator.manual_seed(self.seed)
        self._last_codes, self._last_tracks = None, None

    @property
    def last_tracks(self):
        """(V, T, N, 2) tracks decoded from the latest predicted codes, or None. Decoded on first
        access only: a control loop that never draws them does not pay for the decoder."""
        if self._last_tracks is None and self._last_codes is not None:
            with torch.no_grad(), self._autocast():
                start = self.tokenizer.start_points(1, self.device)
                self._last_tracks = self.tokenizer.decode(self._last_codes, start)[0].float().cpu().numpy()
        return self._last_tracks

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def predict_chunk(self, images, proprio, task):
        """The model's action chunk (T, A) in data units for one observation, without ensembling."""
        images, proprio = np.asarray(images), np.asarray(proprio, dtype=np.float32).reshape(-1)
        V = len(self.views)
        if images.ndim != 4 or images.shape[0] != V or images.shape[-1] != 3:
            raise UserError(f"policy.act: expected images ({V}, H, W, 3) for views {self.views}, found {images.shape}")
        if proprio.shape != (self.proprio_dim,):
            raise UserError(f"policy.act: expected proprio ({self.proprio_dim},), found {proprio.shape}")
        x = resize_images(torch.as_tensor(images, device=self.device)[None], self.img_size)  # (1, V, H, W_img, 3)
        with self._autocast():
            if self.shared_vision:
                x = self.inverse.vision.features(x)  # (1, V, C, h, w), read by both models
            codes = None
            if self.uses_codes:
                codes = self.forward.generate(x, [task], temperature=self.temperature, top_k=self.top_k,
                                              generator=self.generator)
                self._last_codes, self._last_tracks = codes, None
            p = torch.as_tensor(self.prop_norm(proprio)[None], device=self.device)
            chunk = self.inverse(x, p, codes, generator=self.generator, tasks=[task])  # (1, T, A), normalized
        return self.act_norm.inverse(chunk[0].float().cpu().numpy())

    def act(self, images, proprio, task):
        return self.ensembler.step(self.predict_chunk(images, proprio, task)).astype(np.float32)


def load_policy(path, device="auto", **kwargs):
    """Policy.load for the companion scripts: any failure to load is one UserError line, not a traceback."""
    if not os.path.exists(path):
        raise UserError(f"policy: expected DIR/policy.pt from `amplify.py --stage all` (or a directory of stage "
                        f"checkpoints), found no {path}")
    try:
        return Policy.load(path, device=device, **kwargs)
    except UserError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"policy {path}: cannot load ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# Command line: flags named `dest="<config>.<field>"` set that field of the preset's config


def count_params(stage, preset, views=2, img_size=(128, 128), action_dim=7, proprio_dim=9):
    """Parameters of a stage's model for LIBERO-shaped data (2 views, 128x128, 7-d actions, 9-d proprio)."""
    cfg = replace(preset[stage], views=views, img_size=tuple(img_size))
    if stage == "inverse":
        cfg = replace(cfg, action_dim=action_dim, proprio_dim=proprio_dim)
    if stage != "tokenizer":
        cfg = replace(cfg, vision=replace(cfg.vision, weights=""))
    return sum(p.numel() for p in build_model(stage, cfg).parameters())


def configs_from_args(args):
    """The preset's configs with the flags' values in their fields: {stage: model config, "train": ..., "run": ...}."""
    given = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    configs = {**PRESETS[args.preset], "run": RunConfig()}
    vision = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("vision.")}
    for name, cfg in configs.items():
        mine = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(name + ".")}
        if vision and name in ("forward", "inverse"):  # the ResNet flags set both models'
            mine["vision"] = replace(cfg.vision, **vision)
        configs[name] = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in mine.items()})
    return configs


def stage_labels(args):
    """The checkpoints (by label) this command writes into --out."""
    if args.stage == "all":
        codes = getattr(args, "inverse.use_codes") is not False
        return ["tokenizer"] + ["forward"] * codes + ["inverse"] + ["inverse_ft"] * (codes and args.finetune_steps != 0)
    if args.stage == "inverse":
        return ["inverse_ft" if args.predicted_codes else "inverse"]
    return [args.stage]


def run(args):
    configs = configs_from_args(args)
    if args.count_params:
        print(f"params: {count_params(args.stage, configs)}")
        return
    run_cfg, train, inverse = init_distributed(configs["run"]), configs["train"], configs["inverse"]
    device = run_cfg.device
    torch.manual_seed(run_cfg.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.preset == "cpu" and "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        torch.set_num_threads(1)  # measured on 2 shared cores (docs/TRAINING.md)
    corpus = load_corpus(args.data)
    check_outputs(args.out, stage_labels(args), run_cfg)  # before any work: nothing the user made is replaced unasked
    os.makedirs(args.out, exist_ok=True)
    log(f"data: {corpus.num_episodes} episodes, {int(corpus.offsets[-1])} frames, views {corpus.views}, "
        f"{corpus.img_size[0]}x{corpus.img_size[1]}, {int(corpus.has_actions.sum())} episodes with actions | "
        f"device {device} | {'bf16' if use_bf16(run_cfg.precision, device) else 'fp32'} | preset {args.preset}")
    stage = dict(corpus=corpus, out=args.out, train=train, run=run_cfg)
    paper = args.protocol == "paper"  # the inverse model fine-tuned on predicted codes, not trained on them from scratch
    init = (args.init or os.path.join(args.out, "inverse.pt")) if paper else None
    if args.stage in ("tokenizer", "all"):
        train_tokenizer(cfg=configs["tokenizer"], **stage)
    if args.stage == "forward" or (args.stage == "all" and inverse.use_codes):
        train_forward(cfg=configs["forward"], tokenizer=args.tokenizer, **stage)
    inputs = dict(cfg=inverse, tokenizer=args.tokenizer, forward=args.forward)
    if args.stage == "inverse":
        train_inverse(**inputs, **stage, **(dict(codes="pred", init=init) if args.predicted_codes else {}))
    if args.stage == "all" and (paper or not inverse.use_codes):  # the paper's protocol (or the baseline)
        train_inverse(**inputs, **stage)
        ft_steps = args.finetune_steps if args.finetune_steps is not None else train.steps // 2
        if inverse.use_codes and ft_steps > 0:
            train_inverse(**inputs, **dict(stage, train=replace(train, steps=ft_steps)), codes="pred", init=init)
    elif args.stage == "all":  # the published code's protocol: one inverse model, on predicted codes only
        train_inverse(**inputs, **stage, codes="pred")
    if args.stage == "all" and run_cfg.rank == 0:
        log(f"policy: {write_policy(args.out)}")


PROTOCOLS = {  # how the inverse model comes to read forward-predicted codes (docs/TRAINING.md)
    "paper": "trained on codes of the true tracks (inverse.pt), then fine-tuned on forward-predicted codes",
    "published": "the published code's: trained from scratch on forward-predicted codes",
}


def preset_values(dest):
    """'cpu 300, paper 100000': each preset's value of the field that a flag sets (dest "<config>.<field>")."""
    group, name = dest.split(".")
    values = {p: getattr(c["forward"].vision if group == "vision" else c[group], name) for p, c in PRESETS.items()}
    return (f"{values['cpu']}" if len(set(map(repr, values.values()))) == 1
            else ", ".join(f"{p} {v}" for p, v in values.items()))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not when its help already says it, nor for switches; an unset flag
    that sets a preset's field shows each preset's value. Names a value after its flag (STEPS), not
    its config field (train.steps)."""

    def _get_default_metavar_for_optional(self, action):
        return action.option_strings[-1].lstrip("-").replace("-", "_").upper()

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (False, [], argparse.SUPPRESS) or action.nargs == 0:
            return action.help
        if action.default is None:
            preset_field = action.dest.split(".")[0] in ("train", "vision", *CONFIG_CLASSES)
            return f"{action.help} (default: {preset_values(action.dest)})" if preset_field else action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """One line on stderr for a bad command line, like every other refusal of this file."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def integer(minimum):
    def parse(s):
        if not re.fullmatch(r"-?\d+", s.strip()) or int(s) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found '{s}'")
        return int(s)
    return parse


def build_parser():
    p = Parser(description="AMPLIFY: train the motion tokenizer, forward and inverse dynamics.",
               formatter_class=HelpFormatter)
    # what to run
    p.add_argument("--stage", choices=["tokenizer", "forward", "inverse", "all"],
                   help="which model to train; 'all' trains the three in order and writes OUT/policy.pt")
    p.add_argument("--import-official", nargs="+", help=argparse.SUPPRESS)  # moved to import_official.py
    p.add_argument("--data", nargs="+", help="dataset(s): .npz or directory; several are concatenated "
                   "(e.g. robot demos + action-free video); required unless --count-params")
    p.add_argument("--out", default="runs/amplify", help="directory for checkpoints, metrics and images")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and training sizes")
    p.add_argument("--count-params", action="store_true", help="print 'params: <int>' for --stage and exit")
    # training (unset: the preset's value)
    p.add_argument("--steps", type=integer(0), dest="train.steps", help="training steps per stage")
    p.add_argument("--batch-size", type=integer(1), dest="train.batch_size", help="frames per training step")
    p.add_argument("--lr", type=float, dest="train.lr", help="peak learning rate")
    p.add_argument("--log-every", type=integer(1), dest="train.log_every", help="steps between progress lines")
    p.add_argument("--eval-every", type=integer(1), dest="train.eval_every",
                   help="steps between evaluations and checkpoints")
    p.add_argument("--eval-samples", type=integer(1), dest="train.eval_samples",
                   help="held-out windows scored per evaluation")
    existing = p.add_mutually_exclusive_group()  # what to do with a stage's checkpoint already in --out
    existing.add_argument("--resume", action="store_true", dest="run.resume",
                          help="continue each stage from its checkpoint in --out")
    existing.add_argument("--overwrite", action="store_true", dest="run.overwrite", help="replace the stage's "
                          "checkpoint in --out and remove the stages trained on it (without --resume or --overwrite "
                          "an existing checkpoint is refused)")
    p.add_argument("--seed", type=int, default=0, dest="run.seed", help="seeds the model init and the batch order")
    p.add_argument("--device", default="auto", dest="run.device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--compile", action="store_true", dest="run.compile", help="torch.compile the training step")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", dest="run.precision", help="training "
                   "arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16 / AMX)")
    p.add_argument("--threads", type=integer(1), help="torch CPU threads (default: 1 for --preset cpu on a CPU, "
                   "unless OMP_NUM_THREADS is set; torch's choice otherwise). The cpu preset's small matrices gain "
                   "little from threads, and on a busy machine spinning threads compete for the cores")
    p.add_argument("--val-episodes", type=integer(0), default=1, dest="run.val_episodes",
                   help="episodes held out per task for evaluation")
    p.add_argument("--vis", action="store_true", dest="run.vis",
                   help="write PNGs of predicted vs true tracks at each evaluation")
    p.add_argument("--log-to", choices=["tensorboard", "wandb"], dest="run.log_to", help="also log the metrics, "
                   "pictures and curves to TensorBoard (OUT/tensorboard) or Weights & Biases (offline in OUT/wandb "
                   "unless WANDB_MODE is set); the JSONL files stay the record")
    # stage inputs
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: OUT/tokenizer.pt)")
    p.add_argument("--forward", help="forward-model checkpoint for --predicted-codes (default: OUT/forward.pt)")
    p.add_argument("--init", help="inverse checkpoint that --predicted-codes fine-tunes (default: OUT/inverse.pt)")
    p.add_argument("--predicted-codes", action="store_true", help="inverse: train on codes predicted by the "
                   "forward model (writes OUT/inverse_ft.pt), as --protocol says")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper",
                   help="how the inverse model comes to read predicted codes (--stage all, --predicted-codes): "
                   + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()))
    p.add_argument("--finetune-steps", type=integer(0), help="--stage all --protocol paper: steps of the "
                   "fine-tuning on predicted codes (default: steps/2)")
    # data protocols (paper section 5): few-shot, zero-shot, cross-embodiment
    p.add_argument("--view-weights", type=lambda s: [float(w) for w in s.split(",")], metavar="W1,W2",
                   dest="tokenizer.view_weights", help="tokenizer: loss weight per view, in the data's view order "
                   "(published: 0.9,0.1 for third-person, wrist); default: alike")
    p.add_argument("--shots", type=integer(0), default=0, dest="run.shots",
                   help="inverse: use only the first K action episodes of each task (0: all)")
    p.add_argument("--only-task", action="append", dest="run.only_tasks",
                   help="train only on episodes of this task (repeatable)")
    p.add_argument("--exclude-task", action="append", dest="run.exclude_tasks",
                   help="leave out episodes of this task (repeatable)")
    # the inverse model's action head (paper Appendix E); the step counts are recorded in the checkpoint
    p.add_argument("--action-head", choices=["gaussian", "diffusion", "flow"], dest="inverse.head",
                   help="inverse: Gaussian (default), DDPM/DDIM with a 1-D U-Net, or flow matching with a DiT "
                   "(--predicted-codes fine-tuning keeps the head of the model it fine-tunes)")
    p.add_argument("--diffusion-train-steps", type=integer(1), dest="inverse.diffusion_train_steps",
                   help="diffusion head: noise levels in training")
    p.add_argument("--diffusion-sample-steps", type=integer(1), dest="inverse.diffusion_sample_steps",
                   help="diffusion head: DDIM steps per chunk")
    p.add_argument("--gaussian-std", type=float, dest="inverse.gaussian_std", help="gaussian head: its fixed std "
                   "in normalized action units, > 0, as published")
    p.add_argument("--flow-steps", type=integer(1), dest="inverse.flow_steps",
                   help="flow head: midpoint steps per chunk")
    p.add_argument("--no-codes", action="store_false", default=None, dest="inverse.use_codes",
                   help="inverse without motion codes: the 'AMPLIFY (inverse only)' behaviour-cloning baseline")
    p.add_argument("--memory-layernorm", action="store_true", default=None, dest="inverse.memory_ln",
                   help="inverse: a LayerNorm over the memory tokens (not in the published model; measured better "
                   "few-shot: docs/EXPERIMENT.md)")
    p.add_argument("--goal-conditioned", action="store_true", default=None, dest="inverse.goal",
                   help="inverse: read the task text too (with --no-codes: the goal-conditioned BC baseline)")
    # pretrained encoders (optional; the defaults train from scratch)
    p.add_argument("--vision-weights", dest="vision.weights",
                   help="ResNet-18 weights: 'torchvision', 'timm' or a state-dict path (paper preset); default: none")
    p.add_argument("--frozen-vision", action="store_true", default=None, dest="vision.frozen", help="do not train "
                   "the ResNet (the published default; meant with --vision-weights): its features are computed once "
                   "per frame and cached in OUT/features")
    p.add_argument("--text-encoder", dest="forward.text_encoder", help="'hash' (default: fixed random vectors of "
                   "the words, nothing to download) or a Hugging Face encoder, its first token as published: t5-small")
    p.add_argument("--readout", choices=["argmax", "mean"], dest="tokenizer.readout", help="how decoded tracks are "
                   "read out of the window distributions: argmax (published) or the expected move (keeps sub-pixel "
                   "motion; docs/MOTION_CODES.md)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # Args error checking: what the configs cannot know (each config checks its own values when made).
    if args.import_official:
        p.error("published checkpoints are converted by import_official.py: python import_official.py CKPT... --out DIR")
    if not args.stage:
        p.error("the following arguments are required: --stage")
    if not args.count_params and not args.data:
        p.error("--data is required unless --count-params")
    if args.count_params and args.stage == "all":
        p.error("--count-params: expected --stage tokenizer, forward or inverse, found 'all'")
    if args.predicted_codes and args.stage != "inverse":
        p.error("--predicted-codes applies to --stage inverse (--stage all fine-tunes by itself)")
    if args.protocol == "published" and args.finetune_steps is not None:
        p.error("--finetune-steps: the published protocol has no fine-tuning (it trains on predicted codes from the "
                "start); use --protocol paper")
    callers_group = in_distributed_group()  # a program that calls main() in its own job keeps its group
    try:
        cli(run, args)
    finally:
        if not callers_group:
            leave_distributed()


def cli(fn, *args):
    """Run fn(*args) as a command: bad input is one `error:` line and exit 2, no traceback."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: checkpoints on disk are whole; continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
