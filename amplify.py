"""AMPLIFY: Actionless Motion Priors for Robot Learning from Videos, in one file.

Collins et al., CoRL 2025, arXiv 2506.14198. A visuomotor policy split into three separately
trained stages:

  1. motion tokenizer   point tracks -> discrete motion codes (FSQ) -> tracks again
  2. forward dynamics   image(s) + task text -> motion codes      (any video, no actions needed)
  3. inverse dynamics   image(s) + proprio + motion codes -> action chunk   (any action data)

At test time the forward model predicts the codes, the inverse model turns them into an action
chunk, and chunks are blended with ACT-style temporal ensembling (`Policy`).

Notable features
  - Everything the method needs is here: FSQ, the local-window track codec, three transformers,
    their losses, the track metrics, a memory-mapped dataset reader, three flat training loops,
    the composed policy. Only torch, numpy and einops are imported at module level.
  - `--preset cpu` trains in minutes on a laptop; `--preset paper` builds the Table 10 models.
  - Self-describing, atomically written checkpoints (config, normalization stats, step), and
    `--resume` continues a stage exactly where it stopped (batches are drawn from (seed, step)).
  - Forward-model sampling with a key/value cache.

Examples (DIR holds the checkpoints of all stages):
  python amplify.py --stage tokenizer --data data.npz --out DIR
  python amplify.py --stage forward   --data data.npz --out DIR       # uses DIR/tokenizer.pt
  python amplify.py --stage inverse   --data data.npz --out DIR       # codes of the true tracks
  python amplify.py --stage inverse   --data data.npz --out DIR --predicted-codes   # fine-tune
  python amplify.py --stage all       --data data.npz --out DIR       # all of it -> DIR/policy.pt
  python amplify.py --stage forward --preset paper --count-params

Shape legend
  B batch, V camera views, T horizon (frames in a track window, 16), N points (400 = 20x20 grid),
  L motion codes per window (T-1), D model width, A action dim, P proprio dim, H, W image size,
  K codebook size, C local-window classes (W*W, 225).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
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


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) and rename the result over `path`, so `path` is never half-written."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def grid_points(grid=20):
    """(N, 2) float32 normalized (x, y) of a uniform grid; point n = row * grid + col."""
    ticks = np.linspace(-1 + 1 / grid, 1 - 1 / grid, grid, dtype=np.float32)
    ys, xs = np.meshgrid(ticks, ticks, indexing="ij")  # row-major: y outer, x inner
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


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


def classes_to_tracks(start, classes, img_size, window=15):
    """start (..., N, 2) normalized, classes (..., T-1, N) -> (..., T, N, 2) normalized tracks."""
    start, classes = as_tensor(start).float(), as_tensor(classes).long()
    h, w = size_hw(img_size)
    half = window // 2
    delta = torch.stack([classes % window - half, classes // window - half], dim=-1).float()  # (..., T-1, N, 2) pixels
    delta = delta * 2 / start.new_tensor([w, h])
    steps = torch.cumsum(delta, dim=-3)
    return torch.cat([start.unsqueeze(-3), start.unsqueeze(-3) + steps], dim=-3)


# -----------------------------------------------------------------------------
# Track metrics (as the published numbers were computed: per coordinate, t = 0 included)


def track_metrics(pred, gt, img_size):
    """pred, gt (..., T, N, 2) normalized. Returns floats.

    mse, pixel_acc, delta_auc follow the published evaluation, which thresholds each coordinate
    separately; the *_euclid variants threshold the Euclidean pixel distance (TAP-Vid style).
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
    return {
        "mse": float(((pred - gt) ** 2).mean()),
        "pixel_acc": float((err_px < 0.5).float().mean()),
        "delta_auc": float(np.mean([(err_px < tau).float().mean().item() for tau in taus])),
        "pixel_acc_euclid": float((dist_px < 0.5).float().mean()),
        "delta_auc_euclid": float(np.mean([(dist_px < tau).float().mean().item() for tau in taus])),
    }


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
# Data: a directory of .npy files + meta.json (memory-mapped), or one .npz (SPEC section 6)

REQUIRED_KEYS = ("images", "tracks", "episode_ends", "tasks")
OPTIONAL_KEYS = ("vis", "actions", "proprio")
META_KEYS = ("views", "img_size", "T", "grid")
CHUNK_BYTES = 64 << 20  # validate big arrays this many bytes at a time: never all in memory


def _chunks(n_rows, row_bytes):
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


def _row_bytes(a):
    return int(a.itemsize * np.prod(a.shape[1:], dtype=np.int64))


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
    for rows in _chunks(F_, _row_bytes(tracks)):
        bad = ~np.isfinite(tracks[rows])
        if bad.any():
            frame = rows.start + int(np.argwhere(bad)[0][0])
            raise DataError(f"dataset: 'tracks' expected finite values, found NaN/inf at frame {frame}")
    if "proprio" in arrays:
        if not np.isfinite(arrays["proprio"]).all():
            raise DataError("dataset: 'proprio' expected finite values, found NaN/inf")
    if "actions" in arrays:
        a = arrays["actions"]
        nan_rows = np.isnan(a).all(axis=1)
        if not (np.isfinite(a) | nan_rows[:, None]).all():
            raise DataError("dataset: 'actions' expected finite rows or all-NaN rows (no actions), found a partial NaN/inf row")


def write_dataset(path, arrays, meta):
    """Validate, then write `arrays` + `meta` as path.npz or a directory; atomic either way."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if "tasks" in arrays:
        arrays["tasks"] = arrays["tasks"].astype(str)
    if "episode_ends" in arrays:
        arrays["episode_ends"] = arrays["episode_ends"].astype(np.int64)
    meta = dict(meta)
    for key, stats_key in (("actions", "action_stats"), ("proprio", "proprio_stats")):
        if key in arrays and stats_key not in meta:
            meta[stats_key] = array_stats(arrays[key])
    validate_dataset(arrays, meta)
    meta_json = json.dumps(meta, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    if str(path).endswith(".npz"):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, meta_json=np.array(meta_json), **arrays)
        atomic_write(path, write)
        return
    path = os.path.abspath(path)
    tmp_dir = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path) or ".")
    try:
        for key, value in arrays.items():
            np.save(os.path.join(tmp_dir, key + ".npy"), value, allow_pickle=False)
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            f.write(meta_json)
        old = None
        if os.path.exists(path):  # swap: the old dataset stays whole until the new one is in place
            old = path + ".old-" + str(os.getpid())
            os.replace(path, old)
        os.replace(tmp_dir, path)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)


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
        starts = np.concatenate([[0], self.episode_ends[:-1]])
        self.episode_starts = starts

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


def synthetic_dataset(episodes=4, frames=24, views=2, img_size=32, action_dim=7, proprio_dim=9, T=16, grid=20,
                      seed=0, tasks=None):
    """Small data for tests and smoke runs: a bright square moves with the action, tracks follow it.

    Points on the square move with it, the rest stay: the tracker output a real scene would give.
    The motion is driven by the first two action dims, so all three stages have something to learn.
    """
    rng = np.random.default_rng(seed)
    h, w = size_hw(img_size)
    tasks = tasks or ["move the square right", "move the square down"]
    pts = grid_points(grid)  # (N, 2)
    all_images, all_tracks, all_actions, all_proprio, ends, names = [], [], [], [], [], []
    yy, xx = np.mgrid[0:h, 0:w]
    for e in range(episodes):
        task = tasks[e % len(tasks)]
        direction = np.array([1.0, 0.0]) if e % len(tasks) == 0 else np.array([0.0, 1.0])
        pos = rng.uniform(-0.6, -0.2, size=2)  # square centre, normalized (x, y)
        centres, actions = [], []
        for t in range(frames):
            speed = 1.5 * 2 / min(h, w)  # about 1.5 pixels a frame
            act = np.zeros(action_dim, dtype=np.float32)
            act[:2] = direction * (1.0 if t < frames * 2 // 3 else 0.0)
            act[2:] = rng.normal(0, 0.05, size=action_dim - 2)
            centres.append(pos.copy())
            actions.append(act)
            pos = np.clip(pos + act[:2] * speed, -0.9, 0.9)
        centres = np.array(centres)  # (F, 2)
        half = 0.3
        for t in range(frames):
            img = np.full((views, h, w, 3), 30, dtype=np.uint8)
            cx, cy = (centres[t] + 1) * np.array([w, h]) / 2
            for v in range(views):
                shade = 255 - 60 * v
                inside = (abs(xx - cx) < half * w / 2) & (abs(yy - cy) < half * h / 2)
                img[v][inside] = (shade, 200, 80)
            all_images.append(img)
            window = [centres[min(t + k, frames - 1)] for k in range(T)]  # last frame repeats at the end
            on_square = (np.abs(pts - centres[t]) < half / 2).all(-1)  # (N,)
            track = np.repeat(pts[None], T, 0)  # (T, N, 2)
            track[:, on_square] += (np.array(window) - centres[t])[:, None, :]
            all_tracks.append(np.repeat(track[None], views, 0))
            all_proprio.append(np.concatenate([centres[t], rng.normal(0, 0.01, size=proprio_dim - 2)]).astype(np.float32))
        all_actions.extend(actions)
        ends.append(len(all_images))
        names.append(task)
    arrays = {
        "images": np.stack(all_images),
        "tracks": np.stack(all_tracks).astype(np.float32),
        "actions": np.stack(all_actions).astype(np.float32),
        "proprio": np.stack(all_proprio).astype(np.float32),
        "episode_ends": np.array(ends, dtype=np.int64),
        "tasks": np.array(names),
    }
    meta = {"views": [f"view{v}" for v in range(views)], "img_size": [h, w], "T": T, "grid": grid, "fps": 10.0,
            "source": "synthetic", "tracker": "ground-truth"}
    return arrays, meta


# -----------------------------------------------------------------------------
# Drawing tracks and writing PNGs (numpy + zlib only, so --vis needs no extra package)


def draw_tracks(image, tracks, color=None, fade=True, min_motion_px=1.0):
    """image uint8 (H, W, 3), tracks (T, N, 2) normalized -> a copy with each track drawn as a polyline.

    Colour follows the point's start position (hue by x) unless `color` is given; with `fade`,
    older steps are dimmer so the direction of motion reads at a glance. Points that move less
    than `min_motion_px` are not drawn: on a 20x20 grid they would cover the image.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    tracks = np.asarray(tracks, dtype=np.float32)
    h, w = out.shape[:2]
    px = (tracks + 1) * np.array([w, h], dtype=np.float32) / 2 - 0.5  # (T, N, 2) pixel centres
    moving = np.abs(px - px[:1]).max(axis=(0, 2)) >= min_motion_px
    tracks, px = tracks[:, moving], px[:, moving]
    T, N = tracks.shape[:2]
    if color is None:
        hue = (tracks[0, :, 0] + 1) / 2
        colors = np.stack([np.clip(np.abs(hue * 6 - 3) - 1, 0, 1), np.clip(2 - np.abs(hue * 6 - 2), 0, 1),
                           np.clip(2 - np.abs(hue * 6 - 4), 0, 1)], -1) * 255  # (N, 3) hue wheel
    else:
        colors = np.tile(np.asarray(color, dtype=np.float32), (N, 1))
    samples = np.linspace(0, 1, 8, dtype=np.float32)[:, None, None]
    for t in range(T - 1):
        seg = px[t][None] + samples * (px[t + 1] - px[t])[None]  # (8, N, 2)
        xs, ys = np.rint(seg[..., 0]).astype(int), np.rint(seg[..., 1]).astype(int)
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        strength = (0.4 + 0.6 * (t + 1) / (T - 1)) if fade else 1.0
        cols = np.broadcast_to(colors[None] * strength, seg.shape[:2] + (3,))
        out[ys[ok], xs[ok]] = cols[ok].astype(np.uint8)
    return out


def write_png(path, image):
    """Write uint8 (H, W, 3) as PNG with only zlib; atomic."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(png)
    atomic_write(path, write)
