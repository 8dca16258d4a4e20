"""preprocess.py: videos and robot demonstrations -> AMPLIFY datasets (SPEC sections 3 and 6).

AMPLIFY's tokenizer and forward model learn from point tracks: for every frame, a 20x20 grid
re-initialised on that frame and followed through the next T = 16 frames. This file turns four
kinds of source into the dataset format that `amplify.py --data` reads:

  python preprocess.py metaworld reach-v3,push-v3 --episodes 10 --out data/mw      # scripted experts
  python preprocess.py libero libero_object/*.hdf5 --out data/libero_object        # demonstrations
  python preprocess.py libero libero_object/*.hdf5 --tracks-from preprocessed_data --out d  # released tracks
  python preprocess.py videos clips/*.mp4 --task "pick up the cup" --out data/human  # action-free
  python preprocess.py lerobot datasets/aloha_sim --views top --out data/aloha       # LeRobot v3.0/v2.x
  python preprocess.py bench-tracker                                               # tracker accuracy
  python preprocess.py bench-tracker --truth metaworld --tracker lk,flow   # on real frames vs exact tracks
  python preprocess.py check-sim reach-v3                                  # self-check of exact tracks
  python preprocess.py libero f.hdf5 --shard 0/2 --out s0   # machine 1 (--shard 1/2 --out s1: machine 2)
  python preprocess.py merge s0 s1 --out data/joined                               # = the unsharded run

Notable features
- Trackers: CoTracker3 (offline model, torch.hub or a local clone + checkpoint) when it loads,
  else `flow`, dense optical flow chained through the window (the best offline tracker on real
  frames); `--tracker auto` picks the first that works, the one used is recorded in meta.json.
  `--tracker lk`: pyramidal Lucas-Kanade with a forward-backward check for visibility. `--tracker sim` (the default for metaworld; libero files with recorded states):
  exact tracks from MuJoCo's depth, segmentation and body poses, no tracking at all.
  `libero --tracks-from DIR`: the authors' released LIBERO tracks (CoTracker, uniform_400_reinit_16)
  converted to our point order, units and visibility instead of tracking.
- Windows are tracked in batches: Lucas-Kanade moves the points of every open window across one
  frame transition in a single call, CoTracker gets `--batch` windows per forward pass.
- Time resampling: a source at another frame rate is tracked over the frames that span the same
  time as T training steps, and the tracks are resampled to T steps with a cubic spline (the paper
  did this for BridgeData: 5 Hz, 4 frames -> 16 steps).
- Conventions pinned by tests: grid exact at t = 0, windows past the episode end repeat the last
  frame (zero motion), (x, y) = (column, row) normalised with u = 2 * pixel / size - 1, where pixel
  (row i, column j) has its centre at (j, i) (OpenCV's and CoTracker's convention).
- LeRobot datasets (v3.0, v2.x) read from disk without the lerobot package: pyarrow for the
  parquet files, PyAV for the AV1/h264 videos; each frame is the video frame presented at the
  episode's span start + the frame's timestamp (docs/LEROBOT.md).
- Sharding: `--shard i/n` processes episodes k with k % n == i (source order) as a dataset of its
  own; `merge` checks the shards belong together and restores the original order, streaming one
  episode at a time into memory-mapped .npy files.
- Output written one episode at a time (np.lib.format.open_memmap, or `write_dataset` for
  .npz) under a temporary name, then renamed. Tracked episodes are kept in `<out>.work/` until the
  dataset is written, so an interrupted run resumes where it stopped.

Shapes: F frames, V views, H, W image size, T window length, S source frames a window spans,
N = grid * grid points, A action dim, P proprio dim.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import amplify

# Headless rendering for Meta-World / LIBERO: MuJoCo reads MUJOCO_GL when it is first imported, so
# the default is set here, before any importer of this file can pull mujoco in (egl or osmesa).
os.environ.setdefault("MUJOCO_GL", "egl")

# -----------------------------------------------------------------------------
# Conventions and small helpers

TRAINING_FPS = 20.0  # LIBERO demonstrations are recorded at 20 Hz; other sources are resampled to it
DataError = amplify.DataError


def grid_pixels(height, width, grid=20):
    """The uniform grid of SPEC section 3 in pixel coordinates (x, y): (N, 2) float32, row-major."""
    uv = amplify.grid_points(grid)  # (N, 2) normalised (x, y)
    return normalized_to_pixels(uv, height, width)


def pixels_to_normalized(p, height, width):
    """(..., 2) pixel (x, y) -> normalised: u = 2 * pixel / size - 1 (size = W for x, H for y)."""
    size = np.array([width, height], np.float32)
    return (2.0 * np.asarray(p, np.float32) / size - 1.0).astype(np.float32)


def normalized_to_pixels(u, height, width):
    size = np.array([width, height], np.float32)
    return ((np.asarray(u, np.float32) + 1.0) * size / 2.0).astype(np.float32)


def fit_square(frames, size):
    """Centre-crop (F, H, W, 3) uint8 frames to a square and resize to size x size.

    The paper trains on 128x128 images; cropping keeps the aspect ratio of what the policy sees.
    The resize is amplify.resize_images, the one Policy.act uses: a policy sees pixels as its
    training data had them.
    """
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    if (h, w) == (size, size):
        return np.ascontiguousarray(frames)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = frames[:, top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    return np.stack([amplify.resize_images(f, size) for f in crop])  # a frame at a time: bounded memory


def task_from_name(name):
    """Meta-World task name -> instruction: "door-open-v3" -> "door open"."""
    return re.sub(r"-v\d+$", "", name).replace("-", " ").strip()


# -----------------------------------------------------------------------------
# Writing datasets (SPEC section 6): whole (write_dataset), streamed one episode at a time
# (write_streaming), or in shards joined later (merge_shards). Every write is atomic through
# amplify.atomic_write: an existing dataset at `out` stays whole until the new one replaces it.


def _with_stats(arrays, meta):
    """meta plus action_stats / proprio_stats over the non-NaN rows, unless already given."""
    meta = dict(meta)
    for key, stats_key in (("actions", "action_stats"), ("proprio", "proprio_stats")):
        if key in arrays and stats_key not in meta:
            meta[stats_key] = amplify.array_stats(arrays[key])
    return meta


def _meta_json(meta):
    return json.dumps(meta, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def write_dataset(path, arrays, meta):
    """Validate, then write `arrays` + `meta` as path.npz or a directory of .npy + meta.json."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if "tasks" in arrays:
        arrays["tasks"] = arrays["tasks"].astype(str)
    if "episode_ends" in arrays:
        arrays["episode_ends"] = arrays["episode_ends"].astype(np.int64)
    meta = _with_stats(arrays, meta)
    amplify.validate_dataset(arrays, meta)
    if str(path).endswith(".npz"):
        _atomic_savez(path, meta_json=np.array(_meta_json(meta)), **arrays)
        return

    def write(tmp):
        for key, value in arrays.items():
            np.save(os.path.join(tmp, key + ".npy"), value, allow_pickle=False)
        Path(tmp, "meta.json").write_text(_meta_json(meta))
    amplify.atomic_write(path, write, directory=True)


def write_streaming(out, layout, lengths, tasks, episodes, meta):
    """Write a dataset one episode at a time, so no more than one episode's arrays are in memory.

    layout: key -> (dtype, per-frame shape) of the frame-axis arrays; lengths: frames per episode;
    episodes: yields one dict of arrays per episode, in order (actions an episode lacks stay NaN,
    SPEC 6). A directory is filled through np.lib.format.open_memmap in a temporary directory next
    to `out`, validated, then renamed into place; a .npz goes through write_dataset from the same
    memory-mapped arrays.
    """
    import tempfile
    from numpy.lib.format import open_memmap

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    F = int(sum(lengths))

    def fill(tmp):
        arrays = {k: open_memmap(Path(tmp) / f"{k}.npy", "w+", dtype, (F, *shape))
                  for k, (dtype, shape) in layout.items()}
        for k in ("actions", "proprio"):
            if k in arrays:
                arrays[k][:] = np.nan
        start = 0
        for n, ep in zip(lengths, episodes):
            for k, a in ep.items():
                arrays[k][start:start + n] = a
            start += n
        if start != F:
            raise DataError(f"write_streaming: expected {F} frames from {len(lengths)} episodes, found {start}")
        for a in arrays.values():
            a.flush()
        arrays["episode_ends"] = np.cumsum(lengths).astype(np.int64)
        arrays["tasks"] = np.array(tasks, dtype=str)
        return arrays

    if str(out).endswith(".npz"):
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            arrays = fill(tmp)
            write_dataset(str(out), arrays, meta)
            del arrays  # close the memory maps before the directory goes
        return

    def write(tmp):
        arrays = fill(tmp)
        full_meta = _with_stats(arrays, meta)
        amplify.validate_dataset(arrays, full_meta)  # in chunks
        for k in ("episode_ends", "tasks"):
            np.save(Path(tmp) / f"{k}.npy", arrays[k], allow_pickle=False)
        (Path(tmp) / "meta.json").write_text(_meta_json(full_meta))
    amplify.atomic_write(out, write, directory=True)


# Shards: `--shard i/n` tracks episodes k with k % n == i; `merge` joins the n shards
# Each shard is a complete dataset whose meta["shard"] = {"index": i, "count": n, "episodes": [k...]}
# (k: the episode's index in the unsharded run), so the merge can restore the original order.

SHARD_CHECKED_FIRST = ("views", "img_size", "T", "grid", "fps", "tracker")  # then every other key
SHARD_FREE_KEYS = ("shard", "action_stats", "proprio_stats", "command")  # per shard; stats are recomputed


def parse_shard(text):
    """"i/n" -> (i, n), 0-based: this run processes the episodes k with k % n == i."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m[1]) < int(m[2]):
        raise DataError(f"--shard: expected i/n with 0 <= i < n (e.g. 0/4), found {text!r}")
    return int(m[1]), int(m[2])


def shard_indices(total, shard):
    """Indices of the episodes (of `total`, in source order) that shard (i, n) processes."""
    if shard is None:
        return list(range(total))
    i, n = shard
    if n > total:  # some shard would be empty, and an empty dataset is not a dataset
        raise DataError(f"--shard {i}/{n}: expected at most {total} shards for {total} episodes, found {n}")
    return list(range(i, total, n))


def _shard_info(path, meta):
    info = meta.get("shard")
    if not isinstance(info, dict) or not {"index", "count", "episodes"} <= set(info):
        raise DataError(f"{path}: meta 'shard': expected a dataset written with --shard i/n, "
                        f"found {info!r}")
    return int(info["index"]), int(info["count"]), [int(k) for k in info["episodes"]]


def merge_shards(paths, out, *, log=None, extra_meta=None):
    """Join the n shards of one run (any order) into one dataset in the original episode order.

    Every check runs before anything is written: the shards must be exactly 0/n .. n-1/n, agree
    on every meta key (views, img_size, T, grid, fps, tracker, source, ...) and on array dtypes
    and widths. Arrays are copied one episode at a time (directory shards are memory-mapped; .npz
    shards are read whole, as .npz is meant for small sets). action_stats and proprio_stats are
    recomputed over the merged rows, so the result equals the unsharded run.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    out = Path(out)
    for p in paths:
        if Path(p).absolute() == out.absolute():
            raise DataError(f"--out: expected a path other than the shards, found the shard {p}")
    sets = [amplify.load_dataset(str(p)) for p in paths]
    infos = [_shard_info(p, ds.meta) for p, ds in zip(paths, sets)]

    # the set: n shards, each index once
    n = infos[0][1]
    seen = {}
    for p, (i, count, _) in zip(paths, infos):
        if count != n:
            raise DataError(f"shard count: expected {n} (as in {paths[0]}), found {count} in {p}")
        if i in seen:
            raise DataError(f"shard {i}/{n} given twice: {seen[i]} and {p}")
        seen[i] = p
    missing = [f"{i}/{n}" for i in range(n) if i not in seen]
    if missing:
        raise DataError(f"missing shards: expected all of 0/{n} .. {n - 1}/{n}, missing {', '.join(missing)}")

    # the same run: meta and arrays agree
    ref = sets[0].meta
    keys = list(SHARD_CHECKED_FIRST) + sorted(set().union(*(ds.meta for ds in sets)) - set(SHARD_CHECKED_FIRST))
    for key in keys:
        if key in SHARD_FREE_KEYS:
            continue
        for p, ds in zip(paths[1:], sets[1:]):
            if ds.meta.get(key) != ref.get(key):
                raise DataError(f"meta '{key}' differs between shards: {ref.get(key)!r} in {paths[0]}, "
                                f"{ds.meta.get(key)!r} in {p}")
    layout = {}
    for key in ("images", "tracks", "vis", "actions", "proprio"):
        have = [(p, ds.arrays[key]) for p, ds in zip(paths, sets) if key in ds.arrays]
        if not have:
            continue
        if key != "actions" and len(have) != len(sets):  # actions may be absent (NaN rows), not these
            lacking = next(p for p, ds in zip(paths, sets) if key not in ds.arrays)
            raise DataError(f"'{key}': expected in every shard like {have[0][0]}, missing in {lacking}")
        p0, a0 = have[0]
        for p, a in have[1:]:
            if a.dtype != a0.dtype or a.shape[1:] != a0.shape[1:]:
                raise DataError(f"'{key}' differs between shards: {a0.dtype} {a0.shape[1:]} in {p0}, "
                                f"{a.dtype} {a.shape[1:]} in {p}")
        layout[key] = (a0.dtype, a0.shape[1:])

    # the original order: shard episode lists must tile 0..E-1
    order = sorted((k, s, e) for s, (_, _, ks) in enumerate(infos) for e, k in enumerate(ks))
    for p, ds, (i, _, ks) in zip(paths, sets, infos):
        if len(ks) != ds.num_episodes:
            raise DataError(f"{p}: meta 'shard' lists {len(ks)} episodes, expected {ds.num_episodes}")
    if [k for k, _, _ in order] != list(range(len(order))):
        raise DataError(f"shard episodes: expected indices 0..{len(order) - 1} once each, found "
                        f"{[k for k, _, _ in order][:12]}")

    lengths = [int(np.diff(sets[s].episode_range(e))[0]) for _, s, e in order]
    tasks = [sets[s].tasks[e] for _, s, e in order]

    def episodes():
        for _, s, e in order:
            a, b = sets[s].episode_range(e)
            yield {k: v[a:b] for k, v in sets[s].arrays.items() if k in layout}

    meta = {**{k: v for k, v in ref.items() if k not in SHARD_FREE_KEYS}, **(extra_meta or {})}
    write_streaming(out, layout, lengths, tasks, episodes(), meta)
    return {"episodes": len(order), "frames": int(sum(lengths)), "shards": n, "out": str(out),
            "seconds": round(time.time() - t0, 2)}


# -----------------------------------------------------------------------------
# Trackers: track(frames (F, H, W, 3) uint8, queries (N, 2) pixels, span S)
#   -> tracks (F, S, N, 2) float32 pixels, vis (F, S, N) bool
# Window s starts from the queries on frame s and covers frames s .. s+S-1; steps past the last
# frame hold the last tracked position (the "last frame repeated" convention, exactly zero motion).


def _hold_past_end(tracks, vis):
    F, S = tracks.shape[:2]
    for s in range(max(0, F - S + 1), F):
        last = F - 1 - s  # step index of the episode's last frame in window s
        tracks[s, last + 1:] = tracks[s, last]
        vis[s, last + 1:] = vis[s, last]
    return tracks, vis


class LKTracker:
    """Pyramidal Lucas-Kanade (OpenCV) with a zero-motion check and a forward-backward check.

    A step is trusted when LK converges both ways and tracking the result back lands within
    `fb_threshold` pixels of where it started; visibility is the running AND of trusted steps
    (once the chain breaks, later positions are guesses). A point LK loses (status 0: left the
    image or no texture) stays where it was.

    Static points stay put. LK alone let points on a flat, static wall follow the robot arm next
    to them: the coarse pyramid levels (and a window covering much of a small image) see the
    arm's motion, a flat patch has no gradient to pull the estimate back at the finest level, and
    the backward pass drifts back the same way, so the forward-backward check passed as well (on
    Meta-World's corner view at 64 px, 11% of the grid points in static regions moved > 1 px).
    So every step also weighs the zero-motion hypothesis: the point keeps its position unless
    LK's estimate explains the window strictly better (mean absolute grey-level difference).
    Visibility also needs texture: the smaller eigenvalue of the window's structure tensor must
    reach `min_eig` ((grey levels / px)^2); below it the position cannot be observed (a flat
    patch, or an edge's aperture problem) and the point is reported invisible.

    win_size None: 15 px for 128 px images, scaled with the image side (7 px at 64), so the window
    covers the same part of the scene whatever the resolution. Trade-offs: fast motion
    (> ~window/2 px per frame at the coarsest level) is lost; a textureless point of a moving
    object follows its neighbourhood only where the window shows the motion, else it is held
    (reported invisible either way); bench-tracker measures the cost on textured scenes.
    """

    name = "lk"

    def __init__(self, win_size=None, levels=3, fb_threshold=1.0, min_eig=1.0):
        import cv2

        self.cv2 = cv2
        self.win_size, self.levels = win_size, levels
        self.fb_threshold, self.min_eig = fb_threshold, min_eig
        self.criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01)

    def window(self, height, width):
        """LK window side in pixels: odd, 15 at 128 px, proportional to the image, 7 to 15."""
        if self.win_size:
            return self.win_size
        return 2 * int(np.clip(7 * min(height, width) // 128, 3, 7)) + 1

    def _min_eig(self, gray, win):
        """Smaller eigenvalue of the structure tensor averaged over each window: (H, W) float32."""
        cv2 = self.cv2
        g = gray.astype(np.float32)
        gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) / 8  # grey levels per pixel
        gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) / 8
        a, b, c = (cv2.boxFilter(x, -1, (win, win), borderType=cv2.BORDER_REFLECT)
                   for x in (gx * gx, gx * gy, gy * gy))
        return (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)

    def _step(self, prev, nxt, p0, texture, win):
        """Move points p0 (M, 2) from image prev to nxt -> (p1 (M, 2), trusted (M,) bool).

        texture: _min_eig(prev) (H, W).
        """
        cv2 = self.cv2
        params = dict(winSize=(win, win), maxLevel=self.levels, criteria=self.criteria)
        p0 = np.ascontiguousarray(p0, np.float32).reshape(-1, 1, 2)
        p1, st1, err = cv2.calcOpticalFlowPyrLK(prev, nxt, p0, None, **params)
        p0b, st2, _ = cv2.calcOpticalFlowPyrLK(nxt, prev, p1, None, **params)
        p0, p1, p0b = p0[:, 0], p1[:, 0], p0b[:, 0]
        found = st1[:, 0] == 1
        fb = np.linalg.norm(p0b - p0, axis=1)
        h, w = prev.shape
        inside = (p1[:, 0] >= 0) & (p1[:, 0] <= w - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= h - 1)
        trusted = found & (st2[:, 0] == 1) & (fb < self.fb_threshold) & inside
        # zero motion vs LK's estimate: mean |nxt - prev| over the window at p0 vs LK's residual
        # (OpenCV's err: the same mean absolute difference, at the moved window)
        col, row = np.clip(np.rint(p0), 0, [w - 1, h - 1]).astype(int).T
        still = cv2.boxFilter(cv2.absdiff(nxt, prev).astype(np.float32), -1, (win, win),
                              borderType=cv2.BORDER_REFLECT)[row, col]
        # Ties stay (a flat, static patch: both residuals 0). No noise margin: on a noisy flat
        # wall LK still fits the noise, but a margin held the textureless points of moving-camera
        # views (gripperPOV) that LK moves with the scene; such points are invisible either way.
        textured = texture[row, col] >= self.min_eig
        stay = ~found | (still <= np.where(found, err[:, 0], np.inf))
        unchanged = still <= 0.5  # the window is the same to within half a grey level: seen there
        trusted = (trusted | (stay & unchanged)) & textured
        p1 = np.where(stay[:, None], p0, p1)
        p1 = np.clip(p1, 0, [w - 1, h - 1])
        return p1, trusted

    def track(self, frames, queries, span):
        cv2 = self.cv2
        F, N = len(frames), len(queries)
        gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
        win = self.window(*gray[0].shape)
        tracks = np.zeros((F, span, N, 2), np.float32)
        vis = np.ones((F, span, N), bool)
        tracks[:, 0] = queries
        for t in range(F - 1):  # transition t -> t+1, all open windows in one batch
            starts = np.arange(max(0, t - span + 2), t + 1)  # windows that have frame t and t+1
            k = t - starts  # step of frame t inside each window
            p1, ok = self._step(gray[t], gray[t + 1], tracks[starts, k].reshape(-1, 2),
                                self._min_eig(gray[t], win), win)
            tracks[starts, k + 1] = p1.reshape(len(starts), N, 2)
            vis[starts, k + 1] = vis[starts, k] & ok.reshape(len(starts), N)
        return _hold_past_end(tracks, vis)


class CoTrackerTracker:
    """CoTracker3 offline (Karaev et al. 2024) through torch.hub, a local clone, or a checkpoint.

    repo: None -> github "facebookresearch/co-tracker" (downloads code and weights on first use);
    a directory -> a local clone. checkpoint: a local weights file (e.g. scaled_offline.pth) used
    instead of the download.
    """

    name = "cotracker3_offline"

    def __init__(self, repo=None, checkpoint=None, device=None, batch=8):
        import torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch = batch
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"CoTracker checkpoint not found: {checkpoint}")
        # The hub entry builds the model from the repository's code; weights come from its
        # release URL unless a local checkpoint is given (weights_only=True: no code from the file).
        hub = dict(source="local") if repo else dict(source="github", trust_repo=True)
        model = torch.hub.load(repo or "facebookresearch/co-tracker", "cotracker3_offline",
                               pretrained=checkpoint is None, verbose=False, **hub)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.model.load_state_dict(state.get("model", state))
        self.model = model.to(self.device).eval()

    def track(self, frames, queries, span):
        torch = self.torch
        F, N = len(frames), len(queries)
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
        q = torch.cat([torch.zeros(N, 1), torch.from_numpy(queries).float()], 1)  # (N, 3): (t, x, y)
        tracks = np.zeros((F, span, N, 2), np.float32)
        vis = np.ones((F, span, N), bool)
        for b0 in range(0, F, self.batch):
            starts = np.arange(b0, min(F, b0 + self.batch))
            idx = np.minimum(starts[:, None] + np.arange(span), F - 1)  # (B, S) last frame repeated
            clip = video[torch.from_numpy(idx)].to(self.device)  # (B, S, 3, H, W)
            with torch.no_grad():
                tr, vi = self.model(clip, queries=q[None].expand(len(starts), N, 3).to(self.device))
            vi = vi > 0.5 if vi.is_floating_point() else vi.bool()  # the predictor thresholds at 0.9
            tracks[starts] = tr.float().cpu().numpy()
            vis[starts] = vi.reshape(len(starts), span, N).cpu().numpy()
        tracks[:, 0] = queries  # the query point is where the window starts, exactly
        return _hold_past_end(tracks, vis)


def load_tracker(name="auto", *, cotracker_repo=None, cotracker_checkpoint=None, device=None,
                 batch=8, log=None):
    """"lk" | "flow" | "cotracker" | "auto" (CoTracker when it loads, else flow) | "sim" -> tracker."""
    if name not in ("auto", "lk", "flow", "cotracker", "sim"):
        raise DataError(f"--tracker: expected auto, cotracker, lk, flow or sim, found {name!r}")
    if name == "lk":
        return LKTracker()
    if name == "flow":
        return FlowTracker()
    if name == "sim":
        return SimTracker()
    try:
        return CoTrackerTracker(cotracker_repo, cotracker_checkpoint, device, batch)
    except Exception as e:  # no network, no weights, missing dependency: all mean "not here"
        if name == "cotracker":
            raise DataError(f"--tracker cotracker: could not load CoTracker "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        reason = str(e).splitlines()[0][:160] if str(e) else ""
        (log or print)(f"CoTracker unavailable ({type(e).__name__}: {reason}); using the offline flow tracker")
        return FlowTracker()


# -----------------------------------------------------------------------------
# Tracker: dense optical flow chained through the window, anchored to the window's first frame
# Chosen by bench-tracker --truth metaworld (README): on real Meta-World frames it beats LK on
# moving points, keeps ~9 in 10 of them visible in the wrist view (LK: 2 in 10), and runs several
# times faster, since one dense flow per frame pair serves every open window.


def _bilinear(field, points):
    """field (H, W, C) float32 at points (M, 2) pixels (x, y) -> (M, C); edges replicated."""
    m = np.ascontiguousarray(points, np.float32).reshape(-1, 1, 2)
    rows = 32000  # cv2.remap takes maps of fewer than 32767 rows
    out = [_remap(field, m[i:i + rows, :, 0], m[i:i + rows, :, 1]) for i in range(0, len(m), rows)]
    return np.concatenate(out).reshape(len(m), -1) if len(m) else np.zeros((0, field.shape[-1]), np.float32)


def _remap(img, map_x, map_y):
    import cv2

    return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _patches(img, points, win):
    """win x win patches of img (H, W) float32 centred at points (M, 2), bilinear -> (M, win, win)."""
    off = np.arange(win, dtype=np.float32) - (win - 1) / 2
    M = len(points)
    mx = np.broadcast_to(points[:, None, None, 0] + off[None, None, :], (M, win, win)).reshape(M, -1)
    my = np.broadcast_to(points[:, None, None, 1] + off[None, :, None], (M, win, win)).reshape(M, -1)
    rows = 32000  # cv2.remap takes maps of fewer than 32767 rows
    out = [_remap(img, np.ascontiguousarray(mx[i:i + rows], np.float32),
                  np.ascontiguousarray(my[i:i + rows], np.float32)) for i in range(0, M, rows)]
    return np.concatenate(out).reshape(M, win, win) if M else np.zeros((0, win, win), np.float32)


class FlowTracker:
    """Dense optical flow (OpenCV DIS) chained through the window, with drift correction.

    Per frame pair t -> t+1, DIS flow forward and backward at full resolution (finest scale 0:
    the default preset stops at half resolution, which cost 0.2 px of bias per step here). Every
    open window's points move by the forward flow at their position, except:
    - zero motion wins where it explains the point's neighbourhood (still_win px) at least as well
      as the flow, or the neighbourhood did not change: flow fields smear the motion of an arm over
      the static wall next to it, as LK's coarse levels did (see LKTracker);
    - drift correction: each moved point is refined by single-level Lucas-Kanade against its
      window's first frame (the template at the query, refine_win px), and the refinement is kept
      only where it moves the point by less than max_fix px and lowers the template residual.
      Chained flow alone drifts by a bias per step (2 px after 15 steps in the third-person view).
    Visible: inside the image, and the backward flow brings the point back to within fb_threshold
    px (or it was held still). Per step, not a running AND: a point seen again is visible again.
    Trade-offs: the interiors of textureless surfaces that move (the wrist view's flat gripper
    fingers) follow the flow's interpolation from their edges, which the moving background
    contaminates; those points carry most of the remaining error (README, tracker table).
    """

    name = "flow"

    def __init__(self, fb_threshold=1.0, still_win=7, still_margin=0.5, refine_win=9, max_fix=1.0):
        import cv2

        self.cv2 = cv2
        self.fb_threshold, self.still_win, self.still_margin = fb_threshold, still_win, still_margin
        self.refine_win, self.max_fix = refine_win, max_fix
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.dis.setFinestScale(0)
        self.criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 20, 0.01)

    def _moves(self, g0, g1):
        """Frames t, t+1 (uint8 grey) -> forward flow, backward flow (H, W, 2) and, per pixel,
        the neighbourhood residual of zero motion and of the flow (H, W, 2) float32."""
        cv2 = self.cv2
        fwd, bwd = self.dis.calc(g0, g1, None), self.dis.calc(g1, g0, None)
        H, W = g0.shape
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
        f0, f1 = g0.astype(np.float32), g1.astype(np.float32)
        warped = _remap(f1, xs + fwd[..., 0], ys + fwd[..., 1])
        win = (self.still_win, self.still_win)
        resid = np.dstack([cv2.boxFilter(np.abs(f1 - f0), -1, win, borderType=cv2.BORDER_REFLECT),
                           cv2.boxFilter(np.abs(warped - f0), -1, win, borderType=cv2.BORDER_REFLECT)])
        return fwd, bwd, resid

    def _anchor(self, template, frame, queries, tpl, p):
        """Refine points p (M, 2) in `frame` (uint8) against `template` (uint8) at `queries`, whose
        patches are tpl (M, win, win) float32: single-level LK, kept where it lowers the residual."""
        cv2, win = self.cv2, self.refine_win
        r, st, _ = cv2.calcOpticalFlowPyrLK(template, frame, queries.reshape(-1, 1, 2),
                                            p.reshape(-1, 1, 2).copy(), winSize=(win, win), maxLevel=0,
                                            criteria=self.criteria, flags=cv2.OPTFLOW_USE_INITIAL_FLOW)
        r = r[:, 0]
        fix = (st[:, 0] == 1) & (np.linalg.norm(r - p, axis=1) < self.max_fix)
        img = frame.astype(np.float32)
        both = _patches(img, np.concatenate([r[fix], p[fix]]), win)  # (2 * fixed, win, win)
        better = (np.abs(both[:fix.sum()] - tpl[fix]).mean((1, 2))
                  < np.abs(both[fix.sum():] - tpl[fix]).mean((1, 2)))
        fix[fix] = better
        return np.where(fix[:, None], r, p)

    def track(self, frames, queries, span):
        cv2 = self.cv2
        F, N = len(frames), len(queries)
        gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
        H, W = gray[0].shape
        queries = np.ascontiguousarray(queries, np.float32)
        tracks = np.zeros((F, span, N, 2), np.float32)
        vis = np.ones((F, span, N), bool)
        tracks[:, 0] = queries
        templates = {}  # start frame -> its query patches (N, win, win)
        for t in range(F - 1):  # transition t -> t+1, all open windows at once
            starts = np.arange(max(0, t - span + 2), t + 1)
            k = t - starts  # step of frame t inside each window
            fwd, bwd, resid = self._moves(gray[t], gray[t + 1])
            p = tracks[starts, k].reshape(-1, 2)  # (M, 2), M = len(starts) * N
            r_still, r_flow = _bilinear(resid, p).T
            hold = (r_still < r_flow - self.still_margin) | (r_still <= self.still_margin)
            d = np.where(hold[:, None], 0.0, _bilinear(fwd, p))
            p1 = p + d
            fb = np.linalg.norm(d + _bilinear(bwd, p1), axis=1)  # forward-backward round trip
            inside = (p1[:, 0] > -0.5) & (p1[:, 0] < W - 0.5) & (p1[:, 1] > -0.5) & (p1[:, 1] < H - 0.5)
            seen = ((fb < self.fb_threshold) | hold) & inside
            p1 = p1.reshape(len(starts), N, 2)
            if t not in templates:  # patches around the queries on frame t, for the windows from t
                templates[t] = _patches(gray[t].astype(np.float32), queries, self.refine_win)
            templates.pop(t - span, None)  # window t - span is closed
            for j, s in enumerate(starts):  # drift correction against each window's first frame
                moved = ~hold.reshape(len(starts), N)[j]
                if moved.any():
                    p1[j, moved] = self._anchor(gray[s], gray[t + 1], queries[moved],
                                                templates[s][moved], p1[j, moved])
            tracks[starts, k + 1] = p1
            vis[starts, k + 1] = seen.reshape(len(starts), N)
        return _hold_past_end(tracks, vis)


# -----------------------------------------------------------------------------
# Windows: track one view of one episode, resample to T steps


def source_span(T, fps, source_fps):
    """Number of source frames that cover the time of T steps at `fps`."""
    return int(np.ceil((T - 1) * source_fps / fps - 1e-6)) + 1


def resample_windows(tracks, vis, T, step):
    """Cubic-spline resampling of windows in time.

    tracks (F, S, N, 2), vis (F, S, N), where step k of the output sits at source step k * step.
    Returns (F, T, N, 2), (F, T, N). Windows that run past the episode end are fitted on their
    real frames only, then held, so the padding stays exactly still.
    """
    from scipy.interpolate import CubicSpline

    F, S = tracks.shape[:2]
    tau = np.arange(T) * step  # (T,) in source steps
    out = np.empty((F, T) + tracks.shape[2:], np.float32)
    out_vis = np.empty((F, T) + vis.shape[2:], bool)
    for s in range(F):
        real = min(S, F - s)  # real frames in this window
        t = np.minimum(tau, real - 1)
        if real == 1:
            out[s] = tracks[s, 0]
        else:
            out[s] = CubicSpline(np.arange(real), tracks[s, :real], axis=0)(t)
        out_vis[s] = vis[s, np.floor(t).astype(int)] & vis[s, np.ceil(t).astype(int)]
    return out, out_vis


def track_episode(images, tracker, *, T=16, grid=20, fps=TRAINING_FPS, source_fps=None):
    """images uint8 (F, V, H, W, 3) upright -> tracks (F, V, T, N, 2) normalised, vis (F, V, T, N)."""
    F, V, H, W = images.shape[:4]
    source_fps = source_fps or fps
    span = source_span(T, fps, source_fps)
    start = amplify.grid_points(grid)  # (N, 2) normalised
    queries = normalized_to_pixels(start, H, W)
    tracks = np.empty((F, V, T, grid * grid, 2), np.float32)
    vis = np.empty((F, V, T, grid * grid), bool)
    for v in range(V):
        tr, vi = tracker.track(images[:, v], queries, span)  # (F, S, N, 2) pixels
        if span != T:
            tr, vi = resample_windows(tr, vi, T, source_fps / fps)
        # grid + displacement rather than pixels_to_normalized(tr): the grid comes out exact at
        # t = 0 and held positions stay bit-identical (exactly zero motion in the padding)
        tracks[:, v] = start + (tr - queries) * (2.0 / np.array([W, H], np.float32))
        vis[:, v] = vi
    return tracks, vis


# -----------------------------------------------------------------------------
# Episodes -> dataset (resumable)


def _check_episode(i, ep, views, shape):
    images = ep.get("images")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 5:
        raise DataError(f"episode {i}: images: expected uint8 (F, V, H, W, 3), found "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    F, V, H, W, C = images.shape
    if V != len(views) or C != 3 or F < 1:
        raise DataError(f"episode {i}: images: expected (F>=1, {len(views)}, H, W, 3) for views "
                        f"{list(views)}, found {images.shape}")
    if shape is not None and (H, W) != shape:
        raise DataError(f"episode {i}: images: expected size {shape} like episode 0, found {(H, W)}")
    if not isinstance(ep.get("task"), str) or not ep["task"].strip():
        raise DataError(f"episode {i}: task: expected a non-empty string, found {ep.get('task')!r}")
    for key in ("actions", "proprio"):
        x = ep.get(key)
        if x is None:
            continue
        x = np.asarray(x)
        if x.ndim != 2 or len(x) != F:
            raise DataError(f"episode {i}: {key}: expected ({F}, dim), found {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"episode {i}: {key}: expected finite values, found NaN or inf")


def _episode_key(ep):
    h = hashlib.sha1()
    for key in ("images", "actions", "proprio"):
        if ep.get(key) is not None:
            h.update(key.encode() + np.ascontiguousarray(ep[key]).tobytes())
    h.update(ep["task"].encode())
    for a in ep.get("released") or ():  # released tracks: other files mean other episodes on resume
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _atomic_savez(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    amplify.atomic_write(path, write)


def episodes_to_dataset(episodes, out, *, views, fps, source, tracker="auto", T=16, grid=20,
                        progress=True, source_fps=None, track_dtype="float32", extra_meta=None,
                        log=None, overwrite=False):
    """Track every window of every episode and write the dataset with write_streaming.

    episodes: iterable of dicts with `images` uint8 (F, V, H, W, 3) upright, `task` str, optional
    `actions` float32 (F, A) and `proprio` float32 (F, P). fps: the rate of the T track steps (and
    of actions); source_fps: the rate of the frame axis when it differs (videos), see
    resample_windows. tracker: "auto" | "lk" | "cotracker" or a tracker object. Episodes tracked
    by an interrupted run with other settings (in `<out>.work/`) are refused unless `overwrite`.
    Returns a summary dict (episodes, frames, moving_fraction, visible_fraction, tracker, seconds).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    out = Path(out)
    if track_dtype not in ("float32", "float16"):
        raise DataError(f"track_dtype: expected float32 or float16, found {track_dtype!r}")
    if isinstance(tracker, str):
        tracker = load_tracker(tracker, log=log)
    views = list(views)
    config = {"views": views, "fps": fps, "source_fps": source_fps or fps, "T": T, "grid": grid,
              "tracker": tracker.name, "track_dtype": track_dtype, "source": source}
    work = out.with_name(out.name + ".work")
    created = not work.exists()
    if not created:
        old = json.loads((work / "config.json").read_text()) if (work / "config.json").exists() else None
        if old != config:
            if not overwrite:
                raise DataError(f"{work} holds episodes tracked by an interrupted run with other settings "
                                f"({old}): expected the same settings to resume it, or --overwrite to discard it")
            log(f"{work}: left by a run with other settings; discarded (--overwrite)")
            shutil.rmtree(work)
            created = True
    work.mkdir(parents=True, exist_ok=True)
    amplify.atomic_write(work / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config)))

    try:
        names, shape, resumed, dims = [], None, 0, {}
        bar = _progress(episodes, progress)
        for i, ep in enumerate(bar):
            _check_episode(i, ep, views, shape)
            shape = ep["images"].shape[2:4]
            for k in ("actions", "proprio"):  # dims must agree; proprio is all-or-nothing
                d = None if ep.get(k) is None else np.shape(ep[k])[1]
                if k == "actions" and d is None:
                    continue
                if dims.setdefault(k, d) != d:
                    raise DataError(f"episode {i}: {k}: expected dim {dims[k]} like the episodes "
                                    f"before, found {d}")
            key = _episode_key(ep)
            path = work / f"ep_{i:06d}.npz"
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        names.append(path)
                        resumed += 1
                        continue
            if hasattr(tracker, "track_sim_episode"):  # exact tracks from recorded simulator state
                tracks, vis = tracker.track_sim_episode(ep, T=T, grid=grid)
            elif hasattr(tracker, "episode_tracks"):  # tracks the episode brings (--tracks-from)
                tracks, vis = tracker.episode_tracks(ep, T=T, grid=grid)
            else:
                tracks, vis = track_episode(ep["images"], tracker, T=T, grid=grid, fps=fps,
                                            source_fps=source_fps)
            arrays = {"images": ep["images"], "tracks": tracks.astype(track_dtype), "vis": vis,
                      "task": np.array(ep["task"]), "key": np.array(key)}
            for k in ("actions", "proprio"):
                if ep.get(k) is not None:
                    arrays[k] = np.asarray(ep[k], np.float32)
            _atomic_savez(path, **arrays)
            names.append(path)
        if not names:
            raise DataError("no episodes to write (expected at least one, found 0)")
        if resumed:
            log(f"resumed: {resumed} of {len(names)} episodes were already tracked in {work}")
        summary = _assemble(names, out, views, T, grid, fps, source_fps, source, tracker.name,
                            extra_meta)
    except DataError:
        if created:  # bad input: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        log(f"interrupted: tracked episodes are kept in {work}; run the same command again to resume")
        raise
    shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _progress(it, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc="episodes", unit="ep", file=sys.stderr)


def _assemble(names, out, views, T, grid, fps, source_fps, source, tracker_name, extra_meta):
    """Concatenate the per-episode files into the dataset, one episode in memory at a time."""
    lengths, tasks, count, dims = [], [], {"actions": 0, "proprio": 0}, {}
    for p in names:
        with np.load(p, allow_pickle=False) as z:
            lengths.append(len(z["vis"]))
            tasks.append(str(z["task"]))
            first, track_dtype = z["images"].shape, z["tracks"].dtype
            for k in count:
                if k in z.files:
                    count[k] += 1
                    if dims.setdefault(k, z[k].shape[1]) != z[k].shape[1]:
                        raise DataError(f"episode {len(lengths) - 1}: {k}: expected dim {dims[k]} "
                                        f"like the other episodes, found {z[k].shape[1]}")
    # Actions may be missing in some episodes (NaN rows, SPEC 6); proprio must be all or nothing.
    if 0 < count["proprio"] < len(names):
        raise DataError(f"proprio: expected in every episode or none, found in "
                        f"{count['proprio']} of {len(names)}")
    F, (V, H, W) = int(sum(lengths)), first[1:4]
    layout = {"images": (np.uint8, (V, H, W, 3)), "tracks": (track_dtype, (V, T, grid * grid, 2)),
              "vis": (np.bool_, (V, T, grid * grid))}
    layout.update({k: (np.float32, (dims[k],)) for k in count if count[k]})
    stats = {"moving": 0, "visible": 0}

    def episodes():
        for p in names:
            with np.load(p, allow_pickle=False) as z:
                ep = {k: z[k] for k in layout if k in z.files}
            disp = (ep["tracks"].astype(np.float32) - ep["tracks"][:, :, :1]) * np.array([W, H]) / 2
            stats["moving"] += int((np.linalg.norm(disp, axis=-1).max(axis=2) > 1.0).sum())  # > 1 px
            stats["visible"] += int(ep["vis"].sum())
            yield ep

    meta = {"views": views, "img_size": [int(H), int(W)], "T": T, "grid": grid, "fps": float(fps),
            "source_fps": float(source_fps or fps), "source": source, "tracker": tracker_name,
            "coordinates": "normalized (x, y), u = 2 * pixel / size - 1, pixel centres at integers"}
    # action_stats / proprio_stats: computed by write_streaming over the non-NaN rows
    meta.update(extra_meta or {})
    write_streaming(out, layout, lengths, tasks, episodes(), meta)
    return {"episodes": len(names), "frames": F, "views": V,
            "moving_fraction": round(stats["moving"] / (F * V * grid * grid), 4),
            "visible_fraction": round(stats["visible"] / (F * V * T * grid * grid), 4),
            "tracker": tracker_name, "out": str(out)}


# -----------------------------------------------------------------------------
# Source: LIBERO demonstrations (hdf5) and observations

LIBERO_VIEWS = ["agentview", "eye_in_hand"]
LIBERO_KEYS = {  # key under data/demo_<i>/ -> expected trailing shape
    "actions": (7,), "obs/agentview_rgb": None, "obs/eye_in_hand_rgb": None,
    "obs/joint_states": (7,), "obs/gripper_states": (2,)}


def upright_libero(images):
    """LIBERO renders (and stores) images upside down: flip the H axis of (..., H, W, 3)."""
    return np.ascontiguousarray(np.asarray(images)[..., ::-1, :, :])


def libero_observation(obs):
    """A LIBERO env observation -> (images uint8 (2, H, W, 3) upright, proprio float32 (9,)).

    Same layout as the demonstrations: views agentview, eye_in_hand; joints (7) + gripper (2).
    """
    keys = ["agentview_image", "robot0_eye_in_hand_image", "robot0_joint_pos", "robot0_gripper_qpos"]
    missing = [k for k in keys if k not in obs]
    if missing:
        raise DataError(f"LIBERO observation: expected keys {keys}, missing {missing}")
    images = np.stack([upright_libero(obs[keys[0]]), upright_libero(obs[keys[1]])]).astype(np.uint8)
    proprio = np.concatenate([np.asarray(obs[keys[2]], np.float32).reshape(-1),
                              np.asarray(obs[keys[3]], np.float32).reshape(-1)])
    if proprio.shape != (9,):
        raise DataError(f"LIBERO observation: proprio expected 7 joints + 2 gripper = (9,), "
                        f"found {proprio.shape}")
    return images, proprio


def _libero_demos(f, path):
    if "data" not in f:
        raise DataError(f"{path}: expected group 'data' (LIBERO layout), found keys {sorted(f.keys())}")
    demos = [k for k in f["data"].keys() if re.fullmatch(r"demo_\d+", k)]
    if not demos:
        raise DataError(f"{path}: expected data/demo_<i> groups, found {sorted(f['data'].keys())[:5]}")
    return sorted(demos, key=lambda k: int(k.split("_")[1]))


def check_libero(path):
    """Validate a LIBERO hdf5 file without reading its images -> (instruction, number of demos)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: cannot open as hdf5 ({e})") from None
    with f:
        demos = _libero_demos(f, path)
        try:
            task = json.loads(f["data"].attrs["problem_info"])["language_instruction"]
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{path}: expected attribute data.problem_info (JSON with "
                            f"'language_instruction'), not found") from None
        for d in demos:
            g, F, hw = f["data"][d], None, None
            for key, tail in LIBERO_KEYS.items():
                if key not in g:
                    raise DataError(f"{path}: data/{d}/{key}: expected, missing")
                shape = g[key].shape
                F = shape[0] if F is None else F
                if tail is None:  # an image stream: uint8 (F, H, W, 3), both views the same size
                    hw = hw or (tuple(shape[1:3]) if len(shape) == 4 else ("H", "W"))
                    tail = (*hw, 3)
                    if g[key].dtype != np.uint8:
                        raise DataError(f"{path}: data/{d}/{key}: expected uint8, found {g[key].dtype}")
                if shape[0] != F or tuple(shape[1:]) != tuple(tail) or shape[0] < 1:
                    raise DataError(f"{path}: data/{d}/{key}: expected shape ({F}, "
                                    f"{', '.join(map(str, tail))}), found {shape}")
    return " ".join(str(task).split()), len(demos)


def read_libero(path, img_size=None, demos=None):
    """Yield the episodes of one LIBERO hdf5 file (call check_libero first for clear errors).

    demos: positions in the file's demo order (demo_0, demo_1, ...) to read; None reads all.
    """
    import h5py

    task, _ = check_libero(path)
    with h5py.File(path, "r") as f:
        for j, d in enumerate(_libero_demos(f, path)):
            if demos is not None and j not in demos:
                continue  # another shard's: its images are never read
            g = f["data"][d]
            views = [upright_libero(g[f"obs/{v}_rgb"][()]) for v in LIBERO_VIEWS]  # (F, H, W, 3) each
            if img_size:
                views = [fit_square(v, img_size) for v in views]
            yield {"images": np.stack(views, axis=1).astype(np.uint8),  # (F, V, H, W, 3)
                   "actions": g["actions"][()].astype(np.float32),
                   "proprio": np.concatenate([g["obs/joint_states"][()], g["obs/gripper_states"][()]],
                                             axis=1).astype(np.float32),
                   "task": task}


# -----------------------------------------------------------------------------
# Source: action-free video (files, or folders of frames)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _rgb(x, stack=True):
    """Grayscale or RGBA image(s) -> uint8 RGB: (F, H, W[, C]) if stack else (H, W[, C])."""
    x = np.asarray(x)
    if x.ndim == (3 if stack else 2):  # grayscale
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x[..., :3]).astype(np.uint8)


def video_fps(path):
    """Frame rate from a video file's metadata; None for folders of frames or when absent."""
    import imageio.v3 as iio

    if Path(path).is_dir():
        return None
    try:
        fps = iio.immeta(path, plugin="FFMPEG").get("fps")
    except Exception as e:
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    return float(fps) if fps else None


def read_video(path):
    """A video file or a folder of frames -> (frames uint8 (F, H, W, 3), fps or None)."""
    import imageio.v3 as iio

    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: _natural_key(p.name))
        if not files:
            raise DataError(f"{path}: expected image files {IMAGE_EXTENSIONS}, found none")
        frames = []
        for p in files:
            try:
                frames.append(_rgb(iio.imread(p), stack=False))
            except Exception as e:
                raise DataError(f"{p}: cannot read image ({type(e).__name__})") from None
            if frames[-1].shape != frames[0].shape:
                raise DataError(f"{p}: expected size {frames[0].shape} like {files[0].name}, "
                                f"found {frames[-1].shape}")
        return np.stack(frames), None
    if not path.is_file():
        raise DataError(f"{path}: expected a video file or a folder of frames, found nothing")
    try:
        fps = iio.immeta(path, plugin="FFMPEG").get("fps")
        frames = _rgb(iio.imread(path, plugin="FFMPEG", index=None))
    except Exception as e:
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if frames.ndim != 4 or len(frames) < 1:
        raise DataError(f"{path}: expected frames (F, H, W, 3), found {frames.shape}")
    return frames, (float(fps) if fps else None)


# -----------------------------------------------------------------------------
# Source: LeRobot datasets on disk (format v3.0, and v2.0/v2.1), read with pyarrow and PyAV
#
# The `lerobot` package cannot be installed beside our torch, so the files are read directly:
#   meta/info.json        codebase_version, fps, features (dtype "video" | "image" | numeric, shape),
#                         chunks_size, data_path and video_path templates
#   v3.0: meta/episodes/chunk-XXX/file-XXX.parquet  one row per episode: length, dataset_from_index,
#                         data/chunk_index, data/file_index, videos/<key>/{chunk_index, file_index,
#                         from_timestamp, to_timestamp}: several episodes share one parquet and one mp4
#         meta/tasks.parquet    task_index -> task (the task string is the pandas index)
#   v2.x: meta/episodes.jsonl, meta/tasks.jsonl; one parquet and one mp4 per episode
#   data parquet: one row per frame: episode_index, frame_index, timestamp, task_index,
#                 observation.state, action, and image features stored inline (PNG bytes)
# Frame t of an episode is the video frame presented at from_timestamp + timestamp[t] (LeRobot
# matches within tolerance_s = 1e-4 s); a query with no frame that close is refused, never rounded.

LEROBOT_VERSIONS = ("v2.0", "v2.1", "v3.0")
LEROBOT_STATE, LEROBOT_ACTION = "observation.state", "action"
LEROBOT_TOLERANCE_S = 1e-4


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: expected {what}, found no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: expected {what} (JSON), found unreadable JSON ({e})") from None


def _read_jsonl(path, what):
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: expected {what}, found no such file") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{n}: expected one JSON object per line, found {line[:60]!r}") from None
    return rows


def _read_parquet(path, columns=None, what="a parquet file", filters=None):
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: expected {what}, found no such file")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in (columns or []) if c not in names]
        if missing:
            raise DataError(f"{path}: expected columns {missing} in {what}, found {names[:12]}")
        return pq.read_table(path, columns=columns, filters=filters)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: expected {what}, found an unreadable file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _fill_template(template, key, **fields):
    """info.json's data_path / video_path with its fields filled; only plain named fields allowed
    (a template from an untrusted file must not reach attributes through str.format)."""
    import string

    if not isinstance(template, str):
        raise DataError(f"meta/info.json: {key}: expected a path template, found {template!r}")
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in fields:
            raise DataError(f"meta/info.json: {key}: expected fields from {sorted(fields)}, "
                            f"found {{{name}}} in {template!r}")
    return template.format(**fields)


def _column_matrix(table, key, width, where):
    """A numeric feature column (scalars, or lists nested to any depth) -> float32 (rows, width)."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col = col.flatten()
    if col.null_count:
        raise DataError(f"{where}: {key}: expected numbers, found {col.null_count} nulls")
    values = col.to_numpy(zero_copy_only=False)
    if values.size != table.num_rows * width:
        raise DataError(f"{where}: {key}: expected {width} values per frame (meta/info.json shape), "
                        f"found {values.size} for {table.num_rows} frames")
    values = values.reshape(table.num_rows, width).astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{where}: {key}: expected finite values, found NaN or inf")
    return values


def _decode_from(container, stream, start, times, tolerance_s, img_size):
    """Seek to `start` (stream time base), decode forward; the frame within tolerance_s of each of
    `times` (None where there is none) and the presentation times of the frames decoded."""
    container.seek(start, stream=stream, backward=True)
    out, seen, j = [None] * len(times), [], 0
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        t = float(frame.pts * stream.time_base)
        seen.append(t)
        if t > times[-1] + tolerance_s:
            break
        while j < len(times) and times[j] < t - tolerance_s:
            j += 1  # passed without a match: the caller reports it
        if j < len(times) and abs(times[j] - t) <= tolerance_s:
            rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            out[j] = fit_square(rgb[None], img_size)[0] if img_size else rgb
            j += 1
    return out, seen


def decode_video_at(path, times, tolerance_s, img_size=None, label=None):
    """The frames of a video file presented at `times` (seconds) -> uint8 (len(times), H, W, 3).

    Seeks to the keyframe before times[0] and decodes forward, keeping the frame whose presentation
    time (pts * time_base) is within tolerance_s of each query; a query without one is refused.
    img_size: each kept frame goes through fit_square at once, so memory holds only small frames.
    label: prefixes errors.
    """
    import av

    where = f"{label}: {path}" if label else str(path)
    times = np.asarray(times, np.float64)
    if len(times) and np.any(np.diff(times) <= 0):
        raise DataError(f"{where}: expected increasing frame timestamps, found {times[:6].tolist()}...")
    if not Path(path).is_file():
        raise DataError(f"{where}: expected a video file, found no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{where}: expected a video stream, found none")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # Seek to the keyframe at or before the first query (offset in the stream's time base).
            # mp4 indexes keyframes by decode time, which B-frames put ahead of presentation time:
            # when the first frame decoded comes after the query, start earlier, at last from 0.
            for early in (0.0, 1.0, None):
                start = 0 if early is None else max(0, int((times[0] - early) / stream.time_base))
                out, seen = _decode_from(container, stream, start, times, tolerance_s, img_size)
                if start == 0 or not seen or seen[0] <= times[0] + tolerance_s:
                    break  # (not seen: nothing at or after the seek point; reported below)
    except DataError:
        raise
    except Exception as e:  # av.error.* for unreadable or undecodable files
        raise DataError(f"{where}: cannot decode video ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    missing = [k for k, f in enumerate(out) if f is None]
    if missing:
        k = missing[0]
        near = min(seen, key=lambda s: abs(s - times[k])) if seen else None
        raise DataError(f"{where}: expected a frame at {times[k]:.6f} s (+-{tolerance_s:g}), found "
                        + (f"the nearest at {near:.6f} s" if near is not None else "no frames there")
                        + f" ({len(missing)} of {len(times)} frames missing)")
    sizes = {f.shape for f in out}
    if len(sizes) > 1:
        raise DataError(f"{where}: expected frames of one size, found {sorted(sizes)}")
    return np.stack(out)


class LeRobotSource:
    """A LeRobot dataset folder: checks its layout on open, then reads episodes as AMPLIFY episodes.

    views: camera keys to read (full "observation.images.top" or short "top"); None: every camera
    (RGB video and image features, in info.json's order; depth-map videos are left out).
    """

    def __init__(self, root, views=None, tolerance_s=LEROBOT_TOLERANCE_S):
        self.root = Path(root)
        self.tolerance_s = float(tolerance_s)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DataError(f"{self.root}: expected a LeRobot dataset (meta/info.json), found "
                            + ("no such folder" if not self.root.is_dir() else "no meta/info.json"))
        info = _read_json(info_path, "LeRobot's meta/info.json")
        self.version = info.get("codebase_version")
        if self.version not in LEROBOT_VERSIONS:
            raise DataError(f"{info_path}: codebase_version: expected one of {list(LEROBOT_VERSIONS)}, "
                            f"found {self.version!r}")
        self.fps = info.get("fps")
        if not isinstance(self.fps, (int, float)) or self.fps <= 0:
            raise DataError(f"{info_path}: fps: expected a positive number, found {self.fps!r}")
        self.fps = float(self.fps)
        self.features = info.get("features")
        if not isinstance(self.features, dict):
            raise DataError(f"{info_path}: features: expected a dict, found {type(self.features).__name__}")
        self.info = info

        cameras = [k for k, ft in self.features.items() if ft.get("dtype") in ("video", "image")]
        depth = {k for k in cameras if (self.features[k].get("info") or {}).get("is_depth_map")
                 or (self.features[k].get("info") or {}).get("video.is_depth_map")}
        short = {k.removeprefix("observation.images."): k for k in cameras}
        if views is None:
            self.camera_keys = [k for k in cameras if k not in depth]
        else:
            self.camera_keys = []
            for v in views:
                key = v if v in cameras else short.get(v)
                if key is None:
                    raise DataError(f"--views: expected camera keys of {self.root} from {cameras}, found {v!r}")
                if key in depth:
                    raise DataError(f"--views: expected an RGB camera, found the depth map {key!r}")
                self.camera_keys.append(key)
        if not self.camera_keys:
            raise DataError(f"{info_path}: features: expected at least one RGB camera (dtype video or "
                            f"image), found {sorted(self.features)}")
        self.views = [k.removeprefix("observation.images.") for k in self.camera_keys]
        if len(set(self.views)) != len(self.views):
            raise DataError(f"--views: expected distinct cameras, found {self.camera_keys}")
        self.numeric = {}  # feature -> values per frame
        for key in (LEROBOT_STATE, LEROBOT_ACTION):
            if key in self.features:
                shape = self.features[key].get("shape")
                if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
                    raise DataError(f"{info_path}: features.{key}.shape: expected a list of positive "
                                    f"ints, found {shape!r}")
                self.numeric[key] = int(np.prod(shape))
        self.episodes = self._read_episodes()  # episode_index -> dict (length, files, video spans)
        self.tasks = self._read_tasks()  # task_index -> str
        self._table = (None, None)  # the last data parquet read: (path, table)

    # meta/ -------------------------------------------------------------------

    def _read_episodes(self):
        v3 = self.version == "v3.0"
        videos = [k for k in self.camera_keys if self.features[k]["dtype"] == "video"]
        if videos and not self.info.get("video_path"):
            raise DataError(f"{self.root}/meta/info.json: video_path: expected a template for the "
                            f"video features {videos}, found {self.info.get('video_path')!r}")
        episodes = {}
        if v3:
            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise DataError(f"{self.root}: expected meta/episodes/chunk-XXX/file-XXX.parquet "
                                f"(LeRobot v3.0), found none")
            cols = ["episode_index", "length", "dataset_from_index", "dataset_to_index",
                    "data/chunk_index", "data/file_index"]
            cols += [f"videos/{k}/{c}" for k in videos
                     for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
            for f in files:
                table = _read_parquet(f, cols, "LeRobot v3.0 episodes metadata").to_pydict()
                for row in zip(*(table[c] for c in cols)):
                    r = dict(zip(cols, row))
                    e = int(r["episode_index"])
                    if r["dataset_to_index"] - r["dataset_from_index"] != r["length"]:
                        raise DataError(f"{f}: episode {e}: expected length = dataset_to_index - "
                                        f"dataset_from_index = {r['dataset_to_index'] - r['dataset_from_index']}, "
                                        f"found {r['length']}")
                    data = _fill_template(self.info.get("data_path"), "data_path",
                                          chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
                    episodes[e] = {"length": int(r["length"]), "data": self.root / data, "video": {}}
                    for k in videos:
                        path = _fill_template(self.info["video_path"], "video_path", video_key=k,
                                              chunk_index=r[f"videos/{k}/chunk_index"],
                                              file_index=r[f"videos/{k}/file_index"])
                        episodes[e]["video"][k] = (self.root / path, float(r[f"videos/{k}/from_timestamp"]),
                                                   float(r[f"videos/{k}/to_timestamp"]))
        else:
            path = self.root / "meta" / "episodes.jsonl"
            chunks = self.info.get("chunks_size")
            if not isinstance(chunks, int) or chunks < 1:
                raise DataError(f"{self.root}/meta/info.json: chunks_size: expected a positive int "
                                f"(LeRobot {self.version}), found {chunks!r}")
            for n, r in enumerate(_read_jsonl(path, f"LeRobot {self.version} episodes metadata"), 1):
                if not isinstance(r.get("episode_index"), int) or not isinstance(r.get("length"), int):
                    raise DataError(f"{path}:{n}: expected integer episode_index and length, found {r}")
                e = r["episode_index"]
                fields = dict(episode_chunk=e // chunks, episode_index=e)
                data = _fill_template(self.info.get("data_path"), "data_path", **fields)
                episodes[e] = {"length": r["length"], "data": self.root / data, "video": {}}
                for k in videos:
                    video = _fill_template(self.info["video_path"], "video_path", video_key=k, **fields)
                    episodes[e]["video"][k] = (self.root / video, 0.0, None)
        if not episodes:
            raise DataError(f"{self.root}: expected at least one episode in its metadata, found none")
        return dict(sorted(episodes.items()))

    def _read_tasks(self):
        if self.version == "v3.0":
            path = self.root / "meta" / "tasks.parquet"
            table = _read_parquet(path, None, "LeRobot v3.0 tasks (task_index, task)")
            names = table.column_names  # the task is pandas' index: named "task", or left unnamed
            text = next((c for c in ("task", "__index_level_0__") if c in names), None)
            if "task_index" not in names or text is None:
                raise DataError(f"{path}: expected columns task_index and task, found {names}")
            pairs = zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())
        else:
            path = self.root / "meta" / "tasks.jsonl"
            rows = _read_jsonl(path, f"LeRobot {self.version} tasks (task_index, task)")
            if not all("task_index" in r and "task" in r for r in rows):
                raise DataError(f"{path}: expected task_index and task on every line, found {rows[:2]}")
            pairs = ((r["task_index"], r["task"]) for r in rows)
        return {int(i): str(t) for i, t in pairs}

    # episodes ------------------------------------------------------------------

    def select(self, text=None):
        """"0-9,12" -> those episode indices, each checked to exist; None: every episode."""
        if text is None:
            return list(self.episodes)
        picked = []
        for part in str(text).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m or (m[2] is not None and int(m[2]) < int(m[1])):
                raise DataError(f"--episodes: expected indices and ranges like 0-9,12, found {part!r}")
            for e in range(int(m[1]), int(m[2] or m[1]) + 1):
                if e not in self.episodes:
                    raise DataError(f"--episodes: expected episode indices of {self.root} "
                                    f"({min(self.episodes)}..{max(self.episodes)}, {len(self.episodes)} "
                                    f"episodes), found {e}")
                if e not in picked:
                    picked.append(e)
        return picked

    def frames(self, e):
        """Episode e's rows of the data parquet, checked: a pyarrow table sorted by frame_index."""
        import pyarrow.compute as pc

        ep = self.episodes[e]
        where = f"{ep['data']}: episode {e}"
        images = [k for k in self.camera_keys if self.features[k]["dtype"] == "image"]
        cols = ["episode_index", "frame_index", "timestamp", "task_index", *self.numeric]
        if images:  # inline PNG bytes: read this episode's rows only, with them
            rows = _read_parquet(ep["data"], cols + images, f"LeRobot {self.version} frames",
                                 filters=[("episode_index", "=", e)])
        else:  # v3.0: one file holds many episodes, read in order: keep the last file's numbers
            if self._table[0] != ep["data"]:
                self._table = (ep["data"], _read_parquet(ep["data"], cols, f"LeRobot {self.version} frames"))
            table = self._table[1]
            rows = table.filter(pc.equal(table.column("episode_index"), e))
        order = np.argsort(rows.column("frame_index").to_numpy(zero_copy_only=False), kind="stable")
        rows = rows.take(order)
        if rows.num_rows != ep["length"] or rows.num_rows < 1:
            raise DataError(f"{where}: expected {ep['length']} frames (its length in meta/episodes), "
                            f"found {rows.num_rows} rows")
        index = rows.column("frame_index").to_numpy(zero_copy_only=False)
        if not np.array_equal(index, np.arange(len(index))):
            raise DataError(f"{where}: frame_index: expected 0..{len(index) - 1}, found {index[:8].tolist()}...")
        return rows

    def check(self, episodes):
        """Everything that can fail without decoding video, for every episode: run before tracking."""
        for e in episodes:
            rows = self.frames(e)
            where = f"{self.episodes[e]['data']}: episode {e}"
            for key, width in self.numeric.items():
                _column_matrix(rows, key, width, where)
            unknown = sorted(set(rows.column("task_index").to_pylist()) - set(self.tasks))
            if unknown:
                raise DataError(f"{where}: task_index: expected indices listed in meta/tasks, found {unknown}")
            for key, (path, start, end) in self.episodes[e]["video"].items():
                if not path.is_file():
                    raise DataError(f"episode {e}: {key}: expected the video file {path}, found no such file")
                last = start + float(rows.column("timestamp")[-1].as_py())
                if end is not None and last > end + self.tolerance_s:
                    raise DataError(f"episode {e}: {key}: expected its frames within the span "
                                    f"{start:.4f}..{end:.4f} s of {path.name}, found the last at {last:.4f} s")

    def task(self, rows):
        """The episode's task string; an episode with several tasks gets them joined with '; '."""
        ids = list(dict.fromkeys(rows.column("task_index").to_pylist()))  # order of first appearance
        return "; ".join(self.tasks[i] for i in ids)

    def episode(self, e, img_size):
        """Episode e as preprocess episodes: images uint8 (F, V, S, S, 3), task, actions, proprio."""
        rows = self.frames(e)
        where = f"{self.episodes[e]['data']}: episode {e}"
        times = rows.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64)
        views = []
        for key in self.camera_keys:
            if self.features[key]["dtype"] == "video":
                path, start, _ = self.episodes[e]["video"][key]
                views.append(decode_video_at(path, start + times, self.tolerance_s, img_size,
                                             label=f"episode {e}: {key}"))
            else:
                views.append(self._images(rows, key, where, img_size))
        shapes = {v.shape for v in views}
        if len(shapes) > 1:  # only without --img-size, which the CLI always sets
            raise DataError(f"{where}: expected cameras of one size, found {sorted(shapes)}")
        ep = {"images": np.stack(views, axis=1), "task": self.task(rows)}  # (F, V, H, W, 3)
        for key, name in ((LEROBOT_STATE, "proprio"), (LEROBOT_ACTION, "actions")):
            if key in self.numeric:
                ep[name] = _column_matrix(rows, key, self.numeric[key], where)  # (F, dim)
        return ep

    def _images(self, rows, key, where, img_size):
        """An image feature stored in the parquet ({bytes, path} structs of PNG/JPEG) -> uint8 frames."""
        import io

        from PIL import Image

        out = []
        for t, cell in enumerate(rows.column(key).to_pylist()):
            data = cell.get("bytes") if isinstance(cell, dict) else None
            if not data:
                raise DataError(f"{where}: {key} frame {t}: expected embedded image bytes, found {cell!r:.80}")
            try:
                rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8)  # (H, W, 3)
            except Exception as e:
                raise DataError(f"{where}: {key} frame {t}: cannot decode image ({type(e).__name__})") from None
            out.append(fit_square(rgb[None], img_size)[0] if img_size else rgb)
        return np.stack(out)


# -----------------------------------------------------------------------------
# Source: Meta-World scripted experts

DEFAULT_CAMERAS = ("corner", "gripperPOV")
# The corner cameras are mounted with their up axis pointing down: a 180-degree rotation makes the
# view upright (a vertical flip alone would leave a mirror image).
UPSIDE_DOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4")


def _import_metaworld():
    # Headless rendering: MUJOCO_GL must be set before mujoco is first imported (egl, or osmesa).
    os.environ.setdefault("MUJOCO_GL", "egl")
    import metaworld
    import metaworld.policies
    import mujoco

    return metaworld, mujoco


def metaworld_task_name(task):
    """"door-open" or "door-open-v3" -> "door-open-v3"; unknown names raise DataError."""
    metaworld, _ = _import_metaworld()

    known = sorted(metaworld.policies.ENV_POLICY_MAP)
    name = task.strip() if re.search(r"-v\d+$", task.strip()) else task.strip() + "-v3"
    if name not in known:
        raise DataError(f"Meta-World task: expected one of {', '.join(known[:6])}, ... "
                        f"({len(known)} tasks), found {task!r}")
    return name


class MetaWorldEnv:
    """One Meta-World task with rendered, upright camera images and the scripted expert.

    obs = {"images": uint8 (V, H, W, 3), "proprio": float32 (4,)}; proprio is obs[:4] of the
    state vector: hand position (xyz) and gripper opening, the robot's own state (the rest of the
    vector describes objects and the goal, which a camera-based policy should not be handed).
    Default cameras: "corner" (third-person, close to the table, turned upright) and "gripperPOV"
    (wrist view): the same pairing as LIBERO's agentview + eye_in_hand.
    """

    def __init__(self, task, seed=0, cameras=DEFAULT_CAMERAS, img_size=128):
        metaworld, mujoco = _import_metaworld()
        self.name = metaworld_task_name(task)
        self.task_text = task_from_name(self.name)
        self.seed = seed
        self.cameras = list(cameras)
        self.views = self.cameras
        h, w = (img_size, img_size) if np.isscalar(img_size) else tuple(img_size)
        self._benchmark = metaworld.MT1(self.name, seed=seed)
        self.env = self._benchmark.train_classes[self.name]()
        self.env.set_task(self._benchmark.train_tasks[0])
        known = [self.env.model.camera(i).name for i in range(self.env.model.ncam)]
        bad = [c for c in self.cameras if c not in known]
        if bad:
            raise DataError(f"Meta-World cameras: expected names from {known}, found {bad}")
        self.policy = metaworld.policies.ENV_POLICY_MAP[self.name]()
        self.env.model.vis.quality.offsamples = 0  # no multisampling: ~7 ms a frame on CPU
        self.renderer = mujoco.Renderer(self.env.model, h, w)
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.action_dim = int(self.env.action_space.shape[0])
        self.max_steps = int(self.env.max_path_length)
        self.fps = 1.0 / float(self.env.dt)
        self.render_images = True  # False: obs["images"] is None (a rollout only for its outcome)
        self._state, self._steps = None, 0

    def _obs(self):
        if not self.render_images:
            return {"images": None, "proprio": np.asarray(self._state[:4], np.float32)}
        images = []
        for cam in self.cameras:
            self.renderer.update_scene(self.env.data, camera=cam)
            img = self.renderer.render()
            images.append(np.rot90(img, 2) if cam in UPSIDE_DOWN_CAMERAS else img)
        return {"images": np.ascontiguousarray(np.stack(images)).astype(np.uint8),
                "proprio": np.asarray(self._state[:4], np.float32)}

    def reset(self, i=0):
        """Episode i: goal variation i of the benchmark's 50, environment seed seed * 10007 + i."""
        tasks = self._benchmark.train_tasks
        self.env.set_task(tasks[i % len(tasks)])
        self._state, _ = self.env.reset(seed=self.seed * 10007 + i)
        self._steps = 0
        return self._obs()

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._state, _, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        done = bool(terminated or truncated or self._steps >= self.max_steps)
        return self._obs(), bool(info.get("success", False)), done

    def expert_action(self):
        with warnings.catch_warnings():  # the experts warn that their gains saturate; harmless
            warnings.simplefilter("ignore")
            return np.clip(self.policy.get_action(self._state), -1.0, 1.0).astype(np.float32)

    def close(self):
        if getattr(self, "renderer", None) is not None:
            self.renderer.close()
            self.renderer = None
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def metaworld_episodes(tasks, episodes, *, cameras=DEFAULT_CAMERAS, img_size=128, seed=0,
                       max_attempts=None, record=None, shard=None, indices=None, sim=False):
    """Yield `episodes` successful scripted-expert episodes per task (failures are dropped).

    Frame t holds the observation before action t; the episode stops at the first success.
    `record` (a dict) receives per-task attempts and successes, for the success rate.
    shard (i, n): yield only the kept episodes whose index k (counting kept episodes over all
    tasks, in order) has k % n == i. Every shard still rolls out every attempt, since only the
    outcome says which index the next success gets, but renders only its own: the union of the
    shards is the unsharded run, episode for episode (resets are seeded, MuJoCo is deterministic).
    `indices` (a list) receives k of each yielded episode. sim: each episode also carries
    ep["sim"], the simulator record exact tracks are computed from (SimTracker).
    """
    record = record if record is not None else {}
    i_shard, n_shard = shard or (0, 1)
    k = 0  # index of the next kept episode in the unsharded run
    for task in tasks:
        with (MetaWorldSimEnv if sim else MetaWorldEnv)(task, seed=seed, cameras=cameras,
                                                         img_size=img_size) as env:
            stat = record.setdefault(env.name, {"attempts": 0, "successes": 0})
            kept = 0
            while kept < episodes and stat["attempts"] < (max_attempts or 3 * episodes):
                mine = k % n_shard == i_shard
                env.render_images = mine
                obs = env.reset(stat["attempts"])
                stat["attempts"] += 1
                images, proprio, actions, success = [], [], [], False
                for _ in range(env.max_steps):
                    a = env.expert_action()
                    images.append(obs["images"])
                    proprio.append(obs["proprio"])
                    actions.append(a)
                    obs, success, done = env.step(a)
                    if success or done:
                        break
                if success:
                    stat["successes"] += 1
                    kept += 1
                    k += 1
                    if mine:
                        if indices is not None:
                            indices.append(k - 1)
                        ep = {"images": np.stack(images), "proprio": np.stack(proprio),
                              "actions": np.stack(actions), "task": env.task_text}
                        if sim:
                            ep["sim"] = env.sim_episode(len(images))
                        yield ep


# -----------------------------------------------------------------------------
# Exact tracks from the simulator (MuJoCo)
# Per frame the simulator records, for every camera, the rendered depth and segmentation and the
# camera pose, and every body's pose. A window's grid point is back-projected with the depth at
# its pixel, attached to the body the segmentation shows there, carried with that body's pose
# through the window and projected with each frame's camera: no tracker, no error, and the
# moving wrist camera costs nothing. A point is visible where its projected depth agrees with the
# rendered depth (nothing in front of it). Pixel convention: centres at integers, so the optical
# centre of a W-pixel image is at (W - 1) / 2 (checked against mujoco.mj_ray in the tests).

SIM_DEPTH_TOL = (0.01, 1e-3)  # visible: depth <= rendered depth * (1 + 1%) + 1 mm (float32 depth, slopes)


def sim_segments(model):
    """Segment id -> body id table: geoms are ids 0 .. ngeom-1, sites ngeom .. ngeom+nsite-1."""
    return np.concatenate([model.geom_bodyid, model.site_bodyid]).astype(np.int32)


def record_sim_frame(renderer, model, data, cameras, rot180, scene_option=None):
    """What exact tracks need from one frame, in the orientation the images are stored in.

    renderer: a mujoco.Renderer of the stored image size; rot180[v]: view v is stored rotated by
    180 degrees (Meta-World's corner cameras); scene_option: the mujoco.MjvOption the images were
    rendered with (which geom groups show). Returns a dict of arrays: depth (V, H, W) float32
    metres along the optical axis, seg (V, H, W) int32 (geom id, ngeom + site id; -1 background
    or sky, -2 other objects), cam_pos (V, 3), cam_mat (V, 3, 3) camera-to-world (the camera looks
    along -z, y up), xpos (nbody, 3), xmat (nbody, 3, 3), geom_xpos/geom_xmat (for the self-check).
    """
    import mujoco

    geom, site = mujoco.mjtObj.mjOBJ_GEOM.value, mujoco.mjtObj.mjOBJ_SITE.value
    depth, seg, cam_pos, cam_mat = [], [], [], []
    for cam, flip in zip(cameras, rot180):
        renderer.update_scene(data, camera=cam, scene_option=scene_option)
        renderer.enable_depth_rendering()
        d = renderer.render().copy()
        renderer.enable_segmentation_rendering()
        s = renderer.render()
        renderer.disable_segmentation_rendering()
        ids = np.where(s[..., 1] == geom, s[..., 0],
                       np.where(s[..., 1] == site, model.ngeom + s[..., 0],
                                np.where(s[..., 1] < 0, -1, -2))).astype(np.int32)
        if flip:
            d, ids = np.rot90(d, 2), np.rot90(ids, 2)
        depth.append(d)
        seg.append(ids)
        i = model.camera(cam).id
        cam_pos.append(data.cam_xpos[i].copy())
        cam_mat.append(data.cam_xmat[i].reshape(3, 3).copy())
    return {"depth": np.stack(depth).astype(np.float32), "seg": np.stack(seg),
            "cam_pos": np.stack(cam_pos), "cam_mat": np.stack(cam_mat),
            "xpos": data.xpos.copy(), "xmat": data.xmat.reshape(-1, 3, 3).copy(),
            "geom_xpos": data.geom_xpos.copy(), "geom_xmat": data.geom_xmat.reshape(-1, 3, 3).copy()}


def sim_record(frames, model, cameras, rot180, geomgroup=None):
    """Stack per-frame records (record_sim_frame) into one episode record (leading axis F).

    geomgroup: the 6 geom-group flags the frames were rendered with (default: MuJoCo's).
    """
    import mujoco

    rec = {k: np.stack([f[k] for f in frames]) for k in frames[0]}
    rec["geomgroup"] = np.array(mujoco.MjvOption().geomgroup if geomgroup is None else geomgroup, np.uint8)
    rec["fovy"] = np.array([model.cam_fovy[model.camera(c).id] for c in cameras], np.float64)
    rec["rot180"] = np.array(rot180, bool)
    rec["seg_body"] = sim_segments(model)
    return rec


def _intrinsics(fovy, flip, height, width):
    """(f, cx, cy, sign): pixel = c + sign * f * (X, -Y) / -Z for camera-frame points (X, Y, Z)."""
    f = (height / 2) / np.tan(np.deg2rad(fovy) / 2)  # MuJoCo's fovy is vertical; square pixels
    return f, (width - 1) / 2, (height - 1) / 2, (-1.0 if flip else 1.0)


def _sample(img, xy):
    """img (H, W) at the nearest pixel of xy (..., 2), clamped to the image."""
    H, W = img.shape
    col = np.clip(np.rint(xy[..., 0]), 0, W - 1).astype(int)
    row = np.clip(np.rint(xy[..., 1]), 0, H - 1).astype(int)
    return img[row, col]


def _corners(img, xy):
    """img (H, W) at the 4 pixels around xy (..., 2) -> (..., 4) and bilinear weights (..., 4)."""
    H, W = img.shape
    x0 = np.clip(np.floor(xy[..., 0]), 0, W - 1)
    y0 = np.clip(np.floor(xy[..., 1]), 0, H - 1)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    ax = np.clip(xy[..., 0] - x0, 0, 1)
    ay = np.clip(xy[..., 1] - y0, 0, 1)
    cols = np.stack([x0, x1, x0, x1], -1).astype(int)
    rows = np.stack([y0, y0, y1, y1], -1).astype(int)
    w = np.stack([(1 - ax) * (1 - ay), ax * (1 - ay), (1 - ax) * ay, ax * ay], -1)
    return img[rows, cols], w


def sim_view_tracks(rec, v, queries, span, points=False):
    """Exact tracks of one view: queries (N, 2) stored-image pixels -> tracks (F, S, N, 2) pixels,
    vis (F, S, N); with points=True also world points (F, S, N, 3) and segment ids (F, N).

    Windows past the episode end repeat the last frame (held poses: exactly zero motion).
    Points on the background (sky, beyond the far plane) are directions at infinity: they move
    only with the camera's rotation. Points on other objects (-2) or behind the camera are held
    and reported invisible; points that leave the picture are pinned to its border (invisible).
    """
    depth, seg = rec["depth"][:, v], rec["seg"][:, v]  # (F, H, W)
    F, H, W = depth.shape
    N = len(queries)
    f, cx, cy, sign = _intrinsics(rec["fovy"][v], rec["rot180"][v], H, W)
    cam_pos, cam_mat = rec["cam_pos"][:, v], rec["cam_mat"][:, v]  # (F, 3), (F, 3, 3)
    q = np.asarray(queries, np.float64)
    ray = np.stack([sign * (q[:, 0] - cx) / f, -sign * (q[:, 1] - cy) / f, -np.ones(N)], -1)  # (N, 3), z = -1

    # Back-project every frame's grid: depth at the query (inverse depth interpolated between the
    # 4 surrounding pixels when they all show the same object, else the nearest pixel's).
    ids = np.stack([_sample(seg[s], q) for s in range(F)])  # (F, N)
    z0 = np.empty((F, N))
    for s in range(F):
        dz, w = _corners(depth[s], q)
        same = (_corners(seg[s], q)[0] == ids[s][:, None]).all(-1)
        z0[s] = np.where(same, 1.0 / (w / dz).sum(-1), _sample(depth[s], q))
    body = np.where(ids >= 0, rec["seg_body"][np.maximum(ids, 0)], 0)  # (F, N); background: world
    at_inf = ids == -1
    p_cam = ray[None] * np.where(at_inf, 1.0, z0)[..., None]  # (F, N, 3); directions at infinity
    p_world = np.einsum("fij,fnj->fni", cam_mat, p_cam) + np.where(at_inf, 0.0, 1.0)[..., None] * cam_pos[:, None]
    bx, bR = rec["xpos"][np.arange(F)[:, None], body], rec["xmat"][np.arange(F)[:, None], body]  # (F, N, 3[, 3])
    local = np.einsum("fnji,fnj->fni", bR, p_world - np.where(at_inf, 0.0, 1.0)[..., None] * bx)  # body frame

    def project(t, pts_local):  # frame index per window (F,), points (F, N, 3) -> pixels, depth, world
        R, x = rec["xmat"][t[:, None], body], rec["xpos"][t[:, None], body]  # (F, N, 3, 3), (F, N, 3)
        fin = np.where(at_inf, 0.0, 1.0)[..., None]
        world = np.einsum("fnij,fnj->fni", R, pts_local) + fin * x
        pc = np.einsum("fji,fnj->fni", cam_mat[t], world - fin * cam_pos[t][:, None])  # camera frame
        z = -pc[..., 2]
        zs = np.where(z > 1e-6, z, 1.0)
        xy = np.stack([cx + sign * f * pc[..., 0] / zs, cy - sign * f * pc[..., 1] / zs], -1)
        return xy, z, world

    start = np.arange(F)
    xy0, _, _ = project(start, local)
    tracks = np.empty((F, span, N, 2), np.float32)
    vis = np.ones((F, span, N), bool)
    world_pts = np.empty((F, span, N, 3)) if points else None
    tracks[:, 0] = q
    ok_track = ids != -2
    tol_rel, tol_abs = SIM_DEPTH_TOL
    for k in range(span):
        t = np.minimum(start + k, F - 1)
        xy, z, world = project(t, local)
        if points:
            world_pts[:, k] = world
        if k == 0:
            continue
        front = z > 1e-6
        # grid + displacement: exact grid at step 0, exactly still where nothing moved
        moved = q[None] + (xy - xy0)
        # A point that leaves the picture is pinned to its border, as the local-window codec clamps it
        # (tracks_to_classes): near the lens a projection can land 1e4 images away, and such values
        # would swamp the tokenizer's velocity inputs and every error figure.
        moved = np.clip(moved, 0.0, [W - 1.0, H - 1.0])
        tracks[:, k] = np.where((front & ok_track)[..., None], moved, tracks[:, k - 1])
        inside = (xy[..., 0] > -0.5) & (xy[..., 0] < W - 0.5) & (xy[..., 1] > -0.5) & (xy[..., 1] < H - 0.5)
        seen = np.empty((F, N), bool)
        for s in range(F):
            d4, _ = _corners(depth[t[s]], xy[s])
            sky = _sample(seg[t[s]], xy[s]) == -1
            seen[s] = np.where(at_inf[s], sky, z[s] <= d4.max(-1) * (1 + tol_rel) + tol_abs)
        vis[:, k] = front & inside & seen & ok_track
    if points:
        return tracks, vis, world_pts, ids
    return tracks, vis


class MetaWorldSimEnv(MetaWorldEnv):
    """MetaWorldEnv that also records, for every rendered observation, what exact tracks need."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rot180 = [c in UPSIDE_DOWN_CAMERAS for c in self.cameras]
        self.sim_frames = []

    def _obs(self):
        obs = super()._obs()
        if self.render_images:
            self.sim_frames.append(record_sim_frame(self.renderer, self.env.model, self.env.data,
                                                    self.cameras, self.rot180))
        return obs

    def reset(self, i=0):
        self.sim_frames = []
        return super().reset(i)

    def sim_episode(self, frames):
        """The record of the first `frames` observations of this episode (see sim_record)."""
        return sim_record(self.sim_frames[:frames], self.env.model, self.cameras, self.rot180)


def check_sim_metaworld(tasks, episodes, *, cameras=DEFAULT_CAMERAS, img_size=128, seed=0, T=16,
                        grid=20):
    """Yield (task, episode index, sim_self_check figures) for scripted-expert episodes."""
    k = 0
    for task in tasks:
        for ep in metaworld_episodes([task], episodes, cameras=cameras, img_size=img_size, seed=seed,
                                     sim=True):
            with MetaWorldEnv(task, cameras=cameras, img_size=8) as env:  # the model, for mj_ray
                check = sim_self_check(env.env.model, ep["sim"], ep["images"], grid=grid, T=T)
            yield task, k, check
            k += 1


class SimTracker:
    """Exact tracks from the simulator state an episode carries (ep["sim"], see record_sim_frame).

    Not a video tracker: only sources that record simulator state (metaworld, libero with states)
    can use it, and track_episode (the per-view function every tracker fits) is not its entry
    point; episodes_to_dataset calls track_sim_episode for it.
    """

    name = "sim"

    def track(self, frames, queries, span):
        raise DataError("--tracker sim: expected a simulator source (metaworld, or libero files with "
                        "recorded states), found frames without simulator state")

    def track_sim_episode(self, ep, *, T=16, grid=20):
        """ep["sim"] (record) -> tracks (F, V, T, N, 2) normalised, vis (F, V, T, N)."""
        rec = ep.get("sim")
        if rec is None:
            self.track(None, None, None)
        F, V, H, W = ep["images"].shape[:4]
        if rec["depth"].shape != (F, V, H, W):
            raise DataError(f"sim record: expected depth (F, V, H, W) = {(F, V, H, W)} like the "
                            f"images, found {rec['depth'].shape}")
        start = amplify.grid_points(grid)
        queries = normalized_to_pixels(start, H, W)
        tracks = np.empty((F, V, T, grid * grid, 2), np.float32)
        vis = np.empty((F, V, T, grid * grid), bool)
        for v in range(V):
            tr, vi = sim_view_tracks(rec, v, queries, T)
            tracks[:, v] = start + (tr - queries) * (2.0 / np.array([W, H], np.float32))
            vis[:, v] = vi
        return tracks, vis


def sim_self_check(model, rec, images, *, grid=20, T=16, every=4, patch=5):
    """Check exact tracks against the simulator and the images; returns a dict of figures.

    1. Surface: every visible tracked point on a geom (not the sky, not a site), in every checked
       window and step, is where a ray from that frame's camera first meets a geom (mj_ray, with
       the geoms placed as recorded for that frame): the hit's body is the point's body and the hit
       distance is the point's distance to within 1% + 2 mm. `surface_ok` is the share that pass.
    2. Patches: grey-level mean absolute difference between the patch x patch image patch around
       a moving visible point (> 1 px from its start) at step 0 and at step k (bilinear sampling),
       against the same at the start position (what "no motion" would claim). Exact tracks make
       the first much smaller: `patch_err` vs `patch_err_still`, medians over points and steps.
    Windows s = 0, every, 2 * every, ... are checked; `ok` when surface_ok >= 0.95 and patch_err
    is below half of patch_err_still.
    """
    import cv2
    import mujoco

    F, V, H, W = images.shape[:4]
    queries = grid_pixels(H, W, grid)
    data = mujoco.MjData(model)
    groups = rec["geomgroup"]  # rays meet only the geoms the renderer drew
    starts = np.arange(0, F, every)
    hits = total = 0
    surf_err = []
    patch_err, patch_still = [], []
    for v in range(V):
        tracks, vis, world, ids = sim_view_tracks(rec, v, queries, T, points=True)
        body = rec["seg_body"][np.maximum(ids, 0)]
        cam_pos = rec["cam_pos"][:, v]
        gray = [cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY).astype(np.float32)
                for im in images[:, v]]
        for s in starts:
            on_geom = (ids[s] >= 0) & (ids[s] < model.ngeom)
            for k in range(T):
                t = min(s + k, F - 1)
                m = vis[s, k] & on_geom
                if not m.any():
                    continue
                data.geom_xpos[:] = rec["geom_xpos"][t]
                data.geom_xmat[:] = rec["geom_xmat"][t].reshape(-1, 9)
                vec = world[s, k, m] - cam_pos[t]
                dist = np.linalg.norm(vec, axis=-1)
                vec = vec / dist[:, None]
                # one mj_ray per point: mj_multiRay (MuJoCo 3.3) missed the gripper's mesh geoms here
                geomid, hit, g = np.zeros(len(vec), np.int32), np.zeros(len(vec)), np.zeros(1, np.int32)
                for i, d in enumerate(vec):
                    hit[i] = mujoco.mj_ray(model, data, cam_pos[t], d, groups, 1, -1, g)
                    geomid[i] = g[0]
                n = len(vec)
                good = (geomid >= 0) & (np.abs(hit - dist) <= 0.01 * dist + 2e-3)
                good &= model.geom_bodyid[np.maximum(geomid, 0)] == body[s][m]
                hits += int(good.sum())
                total += n
                surf_err.append(np.abs(hit - dist)[geomid >= 0])
            # patches around moving visible points, step 0 vs step k
            p0 = tracks[s, 0]
            for k in range(1, T):
                t = min(s + k, F - 1)
                moving = vis[s, k] & (np.linalg.norm(tracks[s, k] - p0, axis=-1) > 1.0)
                inner = ((tracks[s, k] >= patch) & (tracks[s, k] <= [W - 1 - patch, H - 1 - patch])).all(-1)
                for n in np.flatnonzero(moving & inner):
                    a = cv2.getRectSubPix(gray[s], (patch, patch), tuple(map(float, p0[n])))
                    b = cv2.getRectSubPix(gray[t], (patch, patch), tuple(map(float, tracks[s, k, n])))
                    c = cv2.getRectSubPix(gray[t], (patch, patch), tuple(map(float, p0[n])))
                    patch_err.append(np.abs(a - b).mean())
                    patch_still.append(np.abs(a - c).mean())
    surf = np.concatenate(surf_err) if surf_err else np.zeros(1)
    out = {"windows": int(len(starts) * V), "surface_points": total,
           "surface_ok": round(hits / max(total, 1), 4),
           "surface_err_mm_median": round(1e3 * float(np.median(surf)), 3),
           "patch_points": len(patch_err),
           "patch_err": round(float(np.median(patch_err)), 2) if patch_err else None,
           "patch_err_still": round(float(np.median(patch_still)), 2) if patch_still else None}
    out["ok"] = bool(out["surface_ok"] >= 0.95 and
                     (not patch_err or out["patch_err"] < 0.5 * out["patch_err_still"]))
    return out


# -----------------------------------------------------------------------------
# Tracker benchmark: frames with known motion


def _texture(size, rng):
    """A smooth random RGB texture with detail at several scales (uint8 (size, size, 3))."""
    from PIL import Image

    tex = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 1.0), (16, 0.6), (64, 0.4), (size // 2, 0.3)):
        noise = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        tex += weight * np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC),
                                   np.float32)
    tex -= tex.min()
    return (255 * tex / tex.max()).astype(np.uint8)


def synthetic_motion(size=128, frames=32, speed=1.0, seed=0):
    """Frames of a texture moved by a known affine motion, and where any point goes.

    The camera window drifts, rotates and zooms over a larger texture: frame t shows texture point
    q = M_t(p) at pixel p, with M_t = c + o + d_t + s_t R_t (p - c). Returns
    (frames uint8 (F, size, size, 3), to_texture(t, p), to_frame(t, q)) for ground truth.
    speed: the largest pixel motion per frame is about `speed`.
    """
    import cv2

    rng = np.random.default_rng(seed)
    tex = _texture(3 * size, rng)
    c = np.array([size / 2, size / 2])
    o = np.array([size, size], np.float64)  # the window starts in the texture's centre
    direction = rng.normal(size=2)
    v = speed * 0.7 * direction / np.linalg.norm(direction)  # px per frame of drift
    omega = speed * 0.3 / (size / 2) * rng.choice([-1, 1])  # rad per frame: ~0.3*speed px at the rim
    zoom = speed * 0.2 / (size / 2) * rng.choice([-1, 1])  # relative scale change per frame

    def affine(t):
        a, s = omega * t, 1.0 + zoom * t
        A = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        return A, c + o + v * t - A @ c  # q = A p + b

    def to_texture(t, p):
        A, b = affine(t)
        return p @ A.T + b

    def to_frame(t, q):
        A, b = affine(t)
        return (q - b) @ np.linalg.inv(A).T

    out = []
    for t in range(frames):
        A, b = affine(t)
        M = np.hstack([A, b[:, None]]).astype(np.float64)
        out.append(cv2.warpAffine(tex, M, (size, size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT))
    return np.stack(out), to_texture, to_frame


def bench_tracker(tracker, *, size=128, frames=32, sequences=3, speeds=(0.5, 2.0, 4.0), T=16, grid=20,
                  seed=0):
    """Track synthetic sequences; pixel errors at steps 1..T-1 of points that stay in view."""
    rows = []
    queries = grid_pixels(size, size, grid)
    for speed in speeds:
        errors, vis_in, elapsed = [], [], 0.0
        for k in range(sequences):
            video, to_texture, to_frame = synthetic_motion(size, frames, speed, seed=seed + k)
            t0 = time.time()
            tracks, vis = tracker.track(video, queries, T)  # (F, T, N, 2)
            elapsed += time.time() - t0
            for s in range(frames):
                q = to_texture(s, queries.astype(np.float64))
                steps = np.minimum(s + np.arange(T), frames - 1)
                gt = np.stack([to_frame(t, q) for t in steps])  # (T, N, 2)
                inside = ((gt >= 0) & (gt <= size - 1)).all(-1).all(0)  # in view the whole window
                err = np.linalg.norm(tracks[s][1:, inside] - gt[1:, inside], axis=-1)
                errors.append(err.ravel())
                vis_in.append(vis[s][1:, inside].ravel())
        e = np.concatenate(errors)
        rows.append({"speed": speed, "median_px": float(np.median(e)),
                     "p90_px": float(np.percentile(e, 90)),
                     "visible": float(np.concatenate(vis_in).mean()),
                     "frames_per_s": sequences * frames / elapsed})
    return rows


# -----------------------------------------------------------------------------
# Exact tracks for LIBERO demonstrations: replay the MuJoCo states the hdf5 files record
# LIBERO's files keep, per demonstration, the simulator state of every frame (data/demo_i/states:
# time, qpos, qvel, as robosuite's MjSim.get_state().flatten()) and the model it ran
# (attribute model_file: the MJCF text). Setting each state and running mj_forward gives the
# same body and camera poses the images were rendered from, with MuJoCo alone (no robosuite env).

LIBERO_CAMERAS = ["agentview", "robot0_eye_in_hand"]  # the model's cameras behind LIBERO_VIEWS
LIBERO_GEOMGROUP = (0, 1, 1, 0, 0, 0)  # robosuite hides collision geoms (group 0), shows visual (1)


def _asset_roots():
    """(marker, local directory) pairs for remapping asset paths recorded on another machine."""
    roots = []
    try:
        import robosuite

        roots.append(("robosuite", Path(robosuite.__file__).parent))
    except ImportError:
        pass
    try:
        from libero.libero import get_libero_path

        roots.append(("assets", Path(get_libero_path("assets"))))
    except Exception:  # not installed, or its config cannot be written: no LIBERO assets here
        pass
    return roots


def libero_model(xml, where="model_file"):
    """MJCF text from a LIBERO file -> mujoco.MjModel, with mesh/texture paths made local.

    The recorded paths are absolute on the machine that collected the demonstrations; a missing
    file is looked up under the local robosuite package (after the last "robosuite" component)
    and LIBERO's assets folder (after the last "assets" component).
    """
    import xml.etree.ElementTree as ET

    import mujoco

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DataError(f"{where}: expected MJCF xml text, found unparsable text ({e})") from None
    roots = _asset_roots()
    for elem in root.iter():
        file = elem.get("file")
        if file is None or Path(file).is_file():
            continue
        parts = Path(file).parts
        for marker, local in roots:
            if marker in parts:
                k = len(parts) - 1 - parts[::-1].index(marker)
                candidate = local.joinpath(*parts[k + 1:])
                if candidate.is_file():
                    elem.set("file", str(candidate))
                    break
        else:
            if Path(file).is_absolute():
                raise DataError(f"{where}: asset {file} not found here, nor under the local "
                                f"{' or '.join(str(r) for _, r in roots) or 'robosuite / LIBERO packages'}")
    try:
        return mujoco.MjModel.from_xml_string(ET.tostring(root, encoding="unicode"))
    except ValueError as e:
        raise DataError(f"{where}: MuJoCo cannot build the model ({str(e).splitlines()[0]})") from None


def replay_libero(model, states, size, rgb=False):
    """Replay flattened states (F, 1 + nq + nv) -> the sim record (record_sim_frame) of LIBERO's
    two views at size (H, W), and with rgb=True the re-rendered upright images (F, 2, H, W, 3)."""
    import mujoco

    states = np.asarray(states, np.float64)
    if states.ndim != 2 or states.shape[1] != 1 + model.nq + model.nv:
        raise DataError(f"states: expected (F, 1 + nq + nv) = (F, {1 + model.nq + model.nv}) for this "
                        f"model, found {states.shape}")
    H, W = size
    data = mujoco.MjData(model)
    option = mujoco.MjvOption()
    option.geomgroup[:] = LIBERO_GEOMGROUP
    frames, images = [], []
    with mujoco.Renderer(model, H, W) as renderer:
        for s in states:
            data.time = s[0]
            data.qpos[:] = s[1:1 + model.nq]
            data.qvel[:] = s[1 + model.nq:]
            mujoco.mj_forward(model, data)
            frames.append(record_sim_frame(renderer, model, data, LIBERO_CAMERAS, [False, False], option))
            if rgb:
                views = []
                for cam in LIBERO_CAMERAS:
                    renderer.update_scene(data, camera=cam, scene_option=option)
                    views.append(renderer.render().copy())  # mujoco.Renderer returns upright rows
                images.append(np.stack(views))
    rec = sim_record(frames, model, LIBERO_CAMERAS, [False, False], LIBERO_GEOMGROUP)
    return (rec, np.stack(images)) if rgb else rec


def check_libero_states(path):
    """The replay needs data/demo_i/states and the attribute model_file in every demonstration."""
    import h5py

    with h5py.File(path, "r") as f:
        for d in _libero_demos(f, path):
            g = f["data"][d]
            if "states" not in g or "model_file" not in g.attrs:
                raise DataError(f"{path}: data/{d}: expected 'states' and the attribute 'model_file' "
                                f"(recorded MuJoCo states, as LIBERO's own files have) for --tracker "
                                f"sim, found {'no states' if 'states' not in g else 'no model_file'}; "
                                f"use --tracker lk or cotracker")
            if len(g["states"]) != len(g["actions"]):
                raise DataError(f"{path}: data/{d}/states: expected {len(g['actions'])} rows like "
                                f"actions, found {len(g['states'])}")


def read_libero_sim(path, img_size=None, demos=None):
    """read_libero's episodes, each with ep["sim"] from replaying its recorded states."""
    import h5py

    check_libero_states(path)
    models = {}
    with h5py.File(path, "r") as f:
        keys = [d for j, d in enumerate(_libero_demos(f, path)) if demos is None or j in demos]
        for key, ep in zip(keys, read_libero(path, img_size, demos)):
            g = f["data"][key]
            stored = g[f"obs/{LIBERO_VIEWS[0]}_rgb"].shape[1:3]
            if img_size and stored[0] != stored[1]:  # fit_square would crop: another camera geometry
                raise DataError(f"{path}: data/{key}: --tracker sim with --img-size expects square "
                                f"images, found {tuple(stored)}; leave --img-size out")
            xml = g.attrs["model_file"]
            xml = xml.decode() if isinstance(xml, bytes) else str(xml)
            h = hashlib.sha1(xml.encode()).hexdigest()
            if h not in models:  # demonstrations of one file usually share the model
                models = {h: libero_model(xml, f"{path}: data/{key}.model_file")}
            ep["sim"] = replay_libero(models[h], g["states"][()], ep["images"].shape[2:4])
            yield ep


# -----------------------------------------------------------------------------
# Released tracks for LIBERO demonstrations (--tracks-from): the authors' preprocessed tracks
# (pairlab/AMPLIFY f4bcc46, preprocessing/preprocess_libero.py; docs/PUBLISHED_ARCHITECTURE.md
# sections 8 and 10) converted to our conventions instead of running a tracker. Per demonstration
# one file DIR/<suite>/uniform_400_reinit_16/<stem of the LIBERO file>/demo_<i>.hdf5 holding, per
# view, root/<view>/tracks float32 (F, 16, 400, 2) and root/<view>/vis float32 (F, 16, 400): one
# 16-frame window per frame, tracked by CoTracker2 (torch.hub "cotracker2"), the end padded by
# repeating the last frame. Three things differ from ours:
# - point order: their point k starts at grid point (row k % 20, column k // 20), column-major;
#   ours n = row * 20 + column, so ours n is theirs k = column * 20 + row;
# - units: pixels (x = column, y = row) on the 128 x 128 frames, pixel centres at integers (the
#   queries were (u + 1) * 128 / 2), where ours are normalised, u = 2 * pixel / size - 1;
# - visibility: a float, where ours is bool. CoTracker's predictor thresholds at 0.9 and sets the
#   query step visible, so released values should be 0 or 1; we take > 0.5.
# The orientation needs no change: they flipped the stored frames vertically before tracking
# (`arr[:, ::-1]`), which is exactly what upright_libero does to the frames we store, so their
# pixel (x, y) is our pixel (x, y). The last axis is (x, y) in the file as in ours (their loader
# swaps it to (row, col) for their models, we do not).

RELEASED_METHOD = "uniform_400_reinit_16"  # <init_queries>_<n_tracks>_reinit_<horizon>, the release's
RELEASED_SIZE = 128  # the frames the authors tracked: LIBERO's stored 128 x 128 images
RELEASED_T, RELEASED_GRID = 16, 20
RELEASED_START_PX = 1.0  # step 0 must sit on their grid: median distance allowed, in pixels


def released_point_order(grid=RELEASED_GRID):
    """(N,) int: ours[n] = theirs[order[n]]; our n = row * grid + col is their k = col * grid + row."""
    row, col = np.divmod(np.arange(grid * grid), grid)
    return col * grid + row


def released_track_dir(root, path, suite=None):
    """The folder of the released tracks of LIBERO file `path`: root/<suite>/<method>/<file stem>.

    The suite is the one folder of `root` that holds <method>/<stem> (LIBERO's task names differ
    between suites); `suite` restricts the search to root/<suite>. Two suites holding it: refused.
    """
    root, stem = Path(root), Path(path).stem
    pattern = f"{suite or '*'}/{RELEASED_METHOD}/{stem}"
    found = sorted(p for p in root.glob(pattern) if p.is_dir())
    if not found:
        raise DataError(f"--tracks-from {root}: expected the folder {root / pattern} for {path}, found none")
    if len(found) > 1:
        raise DataError(f"--tracks-from {root}: expected one suite holding {RELEASED_METHOD}/{stem}, "
                        f"found {len(found)} ({', '.join(p.parts[-3] for p in found)}); pass --suite")
    return found[0]


def check_released(path, folder, demos=None, T=RELEASED_T, grid=RELEASED_GRID):
    """Check the released track files of the demos of `path` (positions in its demo order; None:
    all) against the demos, reading only their shapes and step 0: before any slow work."""
    import h5py

    N = grid * grid
    start = normalized_to_pixels(amplify.grid_points(grid), RELEASED_SIZE, RELEASED_SIZE)  # (N, 2) ours
    order = released_point_order(grid)
    with h5py.File(path, "r") as f:
        for j, d in enumerate(_libero_demos(f, path)):
            if demos is not None and j not in demos:
                continue
            F, H, W = f["data"][d][f"obs/{LIBERO_VIEWS[0]}_rgb"].shape[:3]
            if (H, W) != (RELEASED_SIZE, RELEASED_SIZE):
                raise DataError(f"{path}: data/{d}: the released tracks are pixels of {RELEASED_SIZE} x "
                                f"{RELEASED_SIZE} frames, expected images of that size, found {H} x {W}")
            tf = folder / f"{d}.hdf5"
            if not tf.is_file():
                raise DataError(f"{tf}: expected the released tracks of {path} data/{d}, found no such file")
            try:
                t = h5py.File(tf, "r")
            except OSError as e:
                raise DataError(f"{tf}: cannot open as hdf5 ({e})") from None
            with t:
                for view in LIBERO_VIEWS:
                    g = t.get(f"root/{view}")
                    if not isinstance(g, h5py.Group):
                        found = sorted(t["root"].keys()) if isinstance(t.get("root"), h5py.Group) else sorted(t.keys())
                        raise DataError(f"{tf}: expected the group root/{view}, found {found}")
                    for key, tail in (("tracks", (N, 2)), ("vis", (N,))):
                        a = g.get(key)
                        if not isinstance(a, h5py.Dataset):
                            raise DataError(f"{tf}: root/{view}/{key}: expected, missing")
                        where = f"{tf}: root/{view}/{key}"
                        if a.dtype.kind != "f" and not (key == "vis" and a.dtype.kind == "b"):
                            raise DataError(f"{where}: expected float32, found {a.dtype}")
                        if len(a.shape) != 2 + len(tail) or tuple(a.shape[2:]) != tail:
                            raise DataError(f"{where}: expected shape ({F}, {T}, {', '.join(map(str, tail))}), "
                                            f"found {a.shape}")
                        if a.shape[0] != F:
                            raise DataError(f"{where}: expected {F} windows, one per frame of {path} "
                                            f"data/{d}, found {a.shape[0]}")
                        if a.shape[1] != T:
                            raise DataError(f"{where}: expected windows of --T {T} steps, found {a.shape[1]}")
                    # Step 0 of every window is where the tracker was asked to start: their grid. A
                    # file in another point order or unit lands far from it (the flip cannot be seen
                    # here: the grid is nearly symmetric; test_tracks_from.py pins it on content).
                    first = g["tracks"][:, 0][:, order].astype(np.float64)  # (F, N, 2) our order
                    dist = np.linalg.norm(first - start, axis=-1)
                    dist = dist[np.isfinite(dist)]
                    if dist.size and np.median(dist) > RELEASED_START_PX:
                        raise DataError(f"{tf}: root/{view}/tracks: expected step 0 on the {grid}x{grid} grid "
                                        f"(column-major, pixels of {RELEASED_SIZE} px frames), found a median "
                                        f"distance of {np.median(dist):.1f} px")


def released_to_ours(tracks, vis, size=RELEASED_SIZE, grid=RELEASED_GRID):
    """One view of one released file -> our conventions.

    tracks (F, T, N, 2) pixels (x, y) on RELEASED_SIZE frames, points column-major; vis (F, T, N)
    float. Returns tracks (F, T, N, 2) float32 normalised, points row-major, for frames resized to
    `size`; vis bool (F, T, N); the number of non-finite positions replaced.

    Non-finite positions (CoTracker can give NaN; their loader turns it into 0, a jump to the
    corner) become the point's previous position in its window, the grid point at step 0, and
    invisible: the point stays where it was last seen, as our trackers hold a lost point. Past
    the episode end the last real step is held exactly (SPEC 3: zero motion; the tracker's
    estimate on repeated frames jitters by a fraction of a pixel).
    """
    order = released_point_order(grid)
    px = np.asarray(tracks, np.float64)[:, :, order]  # (F, T, N, 2) our point order
    v = np.asarray(vis)[:, :, order]
    seen = np.isfinite(v) & (v > 0.5)  # (F, T, N)
    bad = ~np.isfinite(px).all(-1)  # (F, T, N)
    if bad.any():
        start = normalized_to_pixels(amplify.grid_points(grid), RELEASED_SIZE, RELEASED_SIZE)
        px[:, 0][bad[:, 0]] = np.broadcast_to(start, px[:, 0].shape)[bad[:, 0]]
        for t in range(1, px.shape[1]):
            px[:, t][bad[:, t]] = px[:, t - 1][bad[:, t]]
        seen &= ~bad
    px, seen = _hold_past_end(px, seen)
    # u on the tracked frames, then the same scene point on `size`-pixel frames: amplify.resize_images
    # is half-pixel-centred (align_corners=False), pixel p -> (p + 0.5) * size / 128 - 0.5, i.e.
    # u -> u + 1/128 - 1/size (zero at 128). Normalised coordinates are not size-free under the
    # pixel-centres-at-integers convention; at 64 px this is half a pixel.
    u = 2.0 * px / RELEASED_SIZE - 1.0 + (1.0 / RELEASED_SIZE - 1.0 / size)
    return u.astype(np.float32), seen, int(bad.sum())


def read_libero_released(path, folder, img_size=None, demos=None, stats=None):
    """read_libero's episodes, each with ep["released"] = (tracks (F, V, T, N, 2), vis (F, V, T, N))
    converted from the released files in `folder` (call check_released first). stats["nonfinite"]
    counts the positions replaced, over every episode read (resumed ones included)."""
    import h5py

    with h5py.File(path, "r") as f:
        keys = [d for j, d in enumerate(_libero_demos(f, path)) if demos is None or j in demos]
    for key, ep in zip(keys, read_libero(path, img_size, demos)):
        size = ep["images"].shape[2]  # square: check_released asked for 128 x 128, fit_square keeps it
        with h5py.File(folder / f"{key}.hdf5", "r") as t:
            views = [released_to_ours(t[f"root/{v}/tracks"][()], t[f"root/{v}/vis"][()], size)
                     for v in LIBERO_VIEWS]
        ep["released"] = (np.stack([tr for tr, _, _ in views], 1), np.stack([vi for _, vi, _ in views], 1))
        if stats is not None:
            stats["nonfinite"] = stats.get("nonfinite", 0) + sum(n for _, _, n in views)
        yield ep


class ReleasedTracks:
    """The tracks an episode brings along (ep["released"], read_libero_released): no tracking.

    Like SimTracker, not a video tracker: episodes_to_dataset calls episode_tracks for it.
    """

    name = f"released:{RELEASED_METHOD}"

    def track(self, frames, queries, span):
        raise DataError("--tracks-from: expected LIBERO episodes with released tracks, found frames alone")

    def episode_tracks(self, ep, *, T=RELEASED_T, grid=RELEASED_GRID):
        if ep.get("released") is None:
            self.track(None, None, None)
        tracks, vis = ep["released"]
        F, V = ep["images"].shape[:2]
        if tracks.shape != (F, V, T, grid * grid, 2):
            raise DataError(f"released tracks: expected {(F, V, T, grid * grid, 2)}, found {tracks.shape}")
        return tracks, vis


# -----------------------------------------------------------------------------
# Tracker benchmark on real frames: Meta-World episodes scored against the exact tracks

BENCH_TASKS = ("reach-v3", "push-v3", "drawer-open-v3", "button-press-v3")


def score_tracks(pred, pred_vis, truth, truth_vis, moving_px=1.0):
    """Endpoint errors of predicted tracks against exact ones, on points that move (SPEC 3).

    pred, truth (F, S, N, 2) pixels; pred_vis, truth_vis (F, S, N). A point of a window counts when
    the truth moves it more than moving_px from its start within the window and sees it at the
    window's last step. Returns, for those points, the error there (pixels), whether the tracker
    calls it visible there, and the error of "no motion" (the start position held): flat arrays.
    """
    disp = np.linalg.norm(truth - truth[:, :1], axis=-1)  # (F, S, N)
    m = truth_vis[:, -1] & (disp.max(1) > moving_px)  # (F, N)
    err = np.linalg.norm(pred[:, -1] - truth[:, -1], axis=-1)[m]
    return err, pred_vis[:, -1][m], disp[:, -1][m]


def bench_tracker_truth(trackers, tasks, *, episodes=1, cameras=DEFAULT_CAMERAS, img_size=128, T=16,
                        grid=20, seed=0, log=None):
    """Score trackers on scripted Meta-World episodes against the exact simulator tracks.

    trackers: a list (the episodes are rolled out once and every tracker sees the same frames, so
    their speeds are comparable). Returns one row per tracker and view: moving points' median / 90th-percentile endpoint error in pixels,
    the share of those the tracker calls visible where the truth sees them, the same errors for "no
    motion", the moving share of all points, the share of still points (the truth moves them
    < 0.5 px) that the tracker moves > 1 px (invented motion), and windows/s of the tracker alone.
    """
    queries = grid_pixels(img_size, img_size, grid)
    acc = {(j, c): {"err": [], "vis": [], "still": [], "moving": 0, "points": 0, "windows": 0,
                    "s": 0.0, "static": 0, "invented": 0} for j in range(len(trackers)) for c in cameras}
    for ep in metaworld_episodes(tasks, episodes, cameras=cameras, img_size=img_size, seed=seed, sim=True):
        for (j, cam), a in acc.items():
            v = cameras.index(cam)
            truth, truth_vis = sim_view_tracks(ep["sim"], v, queries, T)
            t0 = time.time()
            pred, pred_vis = trackers[j].track(ep["images"][:, v], queries, T)
            a["s"] += time.time() - t0
            err, vis, still = score_tracks(pred, pred_vis, truth, truth_vis)
            a["err"].append(err)
            a["vis"].append(vis)
            a["still"].append(still)
            a["windows"] += len(truth)
            travel = np.linalg.norm(truth - truth[:, :1], axis=-1).max(1)  # (F, N) px
            static = travel < 0.5
            a["moving"] += int((travel > 1).sum())
            a["points"] += truth.shape[0] * truth.shape[2]
            a["static"] += int(static.sum())
            a["invented"] += int((np.linalg.norm(pred - pred[:, :1], axis=-1).max(1)[static] > 1).sum())
        if log:
            log(f"{ep['task']}: {len(ep['images'])} frames")
    rows = []
    for (j, cam), a in acc.items():
        err, vis, still = (np.concatenate(a[k]) if a[k] else np.zeros(0) for k in ("err", "vis", "still"))
        q = (lambda x, p: float(np.percentile(x, p)) if len(x) else float("nan"))
        rows.append({"tracker": trackers[j].name, "view": cam, "windows": a["windows"], "moving": a["moving"] / max(a["points"], 1),
                     "median_px": q(err, 50), "p90_px": q(err, 90),
                     "visible": float(vis.mean()) if len(vis) else float("nan"),
                     "still_median_px": q(still, 50), "still_p90_px": q(still, 90),
                     "invented": a["invented"] / max(a["static"], 1),
                     "windows_per_s": a["windows"] / max(a["s"], 1e-9)})
    return rows


# -----------------------------------------------------------------------------
# Command line


def _summary_line(summary):
    return ", ".join(f"{k} {v}" for k, v in summary.items())


def _common(p):
    p.add_argument("--out", required=True, help="output: a directory (memory-mappable .npy) or FILE.npz")
    p.add_argument("--tracker", default=None, choices=["auto", "cotracker", "lk", "flow", "sim"],
                   help="default auto: CoTracker when it loads, else flow; lk: OpenCV Lucas-Kanade; flow: dense "
                        "optical flow chained through the window (offline, see bench-tracker); sim: "
                        "exact tracks from the simulator (metaworld, libero files with states)")
    p.add_argument("--cotracker-repo", default=None,
                   help="local clone of facebookresearch/co-tracker (default: fetch through torch.hub)")
    p.add_argument("--cotracker-checkpoint", default=None,
                   help="local CoTracker3 offline weights, e.g. scaled_offline.pth (default: download)")
    p.add_argument("--device", default=None, help="torch device for CoTracker (default: cuda if available)")
    p.add_argument("--batch", type=int, default=8, help="windows per CoTracker forward pass")
    p.add_argument("--T", type=int, default=16, help="track window length in steps (paper: 16)")
    p.add_argument("--grid", type=int, default=20, help="grid side; N = grid * grid points (paper: 20)")
    p.add_argument("--track-dtype", default="float32", choices=["float32", "float16"],
                   help="float16 halves the size of the tracks; error < 0.05 px at 128 px")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and tracked episodes another run left in OUT.work/)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process only episodes k with k %% N == I (0-based), as a dataset of its own; "
                        "join the N shards with the merge subcommand")


def build_parser():
    parser = argparse.ArgumentParser(description="Videos and demonstrations -> AMPLIFY datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("libero", help="LIBERO demonstration files (hdf5)")
    p.add_argument("files", nargs="+", help="LIBERO hdf5 files; each file's instruction is its task")
    p.add_argument("--img-size", type=int, default=None, help="resize (default: keep, 128 in LIBERO)")
    p.add_argument("--tracks-from", default=None, metavar="DIR",
                   help="the authors' released tracks instead of a tracker: "
                        f"DIR/<suite>/{RELEASED_METHOD}/<file stem>/demo_<i>.hdf5 (docs/DATA.md)")
    p.add_argument("--suite", default=None,
                   help="with --tracks-from: look only in DIR/SUITE (default: the one suite folder "
                        "that holds the file's tracks)")
    _common(p)

    p = sub.add_parser("videos", help="action-free videos: files or folders of frames, one episode each")
    p.add_argument("paths", nargs="+", help="video files (mp4, avi, ...) or folders of image frames")
    p.add_argument("--task", required=True, help="task description of every video")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate of the sources (default: from the file; folders: --target-fps)")
    p.add_argument("--target-fps", type=float, default=TRAINING_FPS,
                   help="rate of the T track steps, i.e. of the training data (LIBERO: 20)")
    p.add_argument("--img-size", type=int, default=128, help="centre-crop to a square and resize")
    p.add_argument("--view", default="camera", help="name of the (single) view in meta.json")
    _common(p)

    p = sub.add_parser("lerobot", help="a LeRobot dataset on disk (format v3.0 or v2.x): cameras, "
                                       "observation.state, action, tasks")
    p.add_argument("root", help="the dataset folder (the one holding meta/info.json)")
    p.add_argument("--views", default=None,
                   help="comma-separated camera keys, full (observation.images.top) or short (top); "
                        "default: every RGB camera")
    p.add_argument("--episodes", dest="select", default=None, metavar="LIST",
                   help="LeRobot episode indices to convert, e.g. 0-9,12 (default: all)")
    p.add_argument("--target-fps", type=float, default=TRAINING_FPS,
                   help="rate of the T track steps (the dataset's fps is the source rate, as for videos)")
    p.add_argument("--img-size", type=int, default=128, help="centre-crop to a square and resize")
    p.add_argument("--tolerance-s", type=float, default=LEROBOT_TOLERANCE_S,
                   help="largest gap between a frame's timestamp and the video frame used for it "
                        "(LeRobot's tolerance_s)")
    _common(p)

    p = sub.add_parser("metaworld", help="Meta-World scripted-expert demonstrations")
    p.add_argument("tasks", help="comma-separated task names, e.g. reach-v3,push-v3")
    p.add_argument("--episodes", type=int, default=10, help="successful episodes to keep per task")
    p.add_argument("--max-attempts", type=int, default=None, help="rollouts per task (default: 3 * episodes)")
    p.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS),
                   help="comma-separated camera names (corner..corner4, topview, behindGripper, gripperPOV)")
    p.add_argument("--img-size", type=int, default=128, help="rendered image size")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed (goal variations, resets)")
    _common(p)
    p.set_defaults(tracker="sim")  # exact tracks: the simulator knows where every point goes

    p = sub.add_parser("check-sim", help="self-check of the exact simulator tracks on Meta-World episodes")
    p.add_argument("tasks", help="comma-separated task names, e.g. reach-v3,push-v3")
    p.add_argument("--episodes", type=int, default=1, help="successful episodes per task")
    p.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS), help="comma-separated camera names")
    p.add_argument("--img-size", type=int, default=128, help="rendered image size")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed (goal variations, resets)")
    p.add_argument("--T", type=int, default=16, help="track window length in steps")
    p.add_argument("--grid", type=int, default=20, help="grid side")

    p = sub.add_parser("merge", help="join the datasets written with --shard 0/N .. N-1/N into one")
    p.add_argument("shards", nargs="+", help="the N shard datasets (directories or .npz), any order")
    p.add_argument("--out", required=True, help="output: a directory (memory-mappable .npy) or FILE.npz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("bench-tracker", help="tracker accuracy on frames with known motion")
    p.add_argument("--tracker", default="lk",
                   help="comma-separated: auto, cotracker, lk, flow (e.g. lk,flow: one table, the "
                        "same frames for each)")
    p.add_argument("--cotracker-repo", default=None, help="as for the other subcommands")
    p.add_argument("--cotracker-checkpoint", default=None, help="as for the other subcommands")
    p.add_argument("--device", default=None, help="torch device for CoTracker")
    p.add_argument("--batch", type=int, default=8, help="windows per CoTracker forward pass")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--frames", type=int, default=32, help="frames per sequence")
    p.add_argument("--sequences", type=int, default=3, help="sequences per speed")
    p.add_argument("--speeds", default="0.5,2,4", help="comma-separated max motion, px per frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", default="synthetic", choices=["synthetic", "metaworld"],
                   help="synthetic: a texture moved by a known motion; metaworld: scripted-expert "
                        "episodes scored against the exact simulator tracks, per view")
    p.add_argument("--tasks", default=",".join(BENCH_TASKS), help="--truth metaworld: task names")
    p.add_argument("--episodes", type=int, default=1, help="--truth metaworld: episodes per task")
    p.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS), help="--truth metaworld: views")
    return parser


def _print_bench(rows, tracker, args):
    print(f"tracker {tracker.name}: {args.size}x{args.size} px, T=16, grid 20x20, "
          f"{args.sequences} sequences x {args.frames} frames per speed (drift + rotation + zoom)")
    print("| max motion (px/frame) | median error (px) | 90th pct error (px) | visible | frames/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['speed']:g} | {r['median_px']:.3f} | {r['p90_px']:.3f} | {r['visible']:.3f} "
              f"| {r['frames_per_s']:.1f} |")


def _print_bench_truth(rows, args, tasks):
    print(f"trackers vs exact simulator tracks: Meta-World {','.join(tasks)}, "
          f"{args.episodes} episode(s) each, {args.size}x{args.size} px, T=16, grid 20x20; "
          f"endpoint error (step 15) of points moving > 1 px within the window, where the truth sees them")
    print("| tracker | view | windows | moving points | median error (px) | 90th pct (px) | visible "
          "| no motion: median (px) | no motion: 90th pct (px) | still points moved > 1 px | windows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tracker']} | {r['view']} | {r['windows']} | {r['moving']:.2f} | {r['median_px']:.2f} | {r['p90_px']:.2f} "
              f"| {r['visible']:.2f} | {r['still_median_px']:.2f} | {r['still_p90_px']:.2f} "
              f"| {r['invented']:.3f} | {r['windows_per_s']:.1f} |")


# Flags that do not change what a run writes: the same command with or without them is the same run.
NEUTRAL_FLAGS = ("--overwrite", "--no-progress")


def run_command(argv):
    """The command that wrote a dataset, as recorded in its meta.json ('command'): the subcommand and
    its arguments, without flags that do not change the output."""
    return ["preprocess.py"] + [a for a in argv if a not in NEUTRAL_FLAGS]


def existing_output(out):
    """What is at --out already: None (nothing, or an empty directory), or (description, the command
    recorded in its meta, or None)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        if out.is_dir():
            meta = json.loads((out / "meta.json").read_text())
            episodes = len(np.load(out / "episode_ends.npy", allow_pickle=False))
        else:
            with np.load(out, allow_pickle=False) as z:
                meta, episodes = json.loads(str(z["meta_json"])), len(z["episode_ends"])
    except (OSError, ValueError, KeyError):
        return ("not a dataset this file wrote", None)
    return (f"a dataset of {episodes} episodes", meta.get("command"))


def check_out(out, command, overwrite, log):
    """An existing --out is replaced only with --overwrite. The same command run again on a finished
    dataset has nothing to do (True: stop here); an interrupted one resumes from OUT.work/."""
    found = existing_output(out)
    if found is None or overwrite:
        if found is not None:
            log(f"--overwrite: {out} ({found[0]}) will be replaced when the new dataset is complete")
        return False
    what, recorded = found
    if recorded == command:
        log(f"{out}: already written by this same command ({what}); nothing to do (--overwrite rebuilds it)")
        return True
    raise DataError(f"--out {out} exists ({what}, written by {' '.join(recorded) if recorded else 'another command'}): "
                    f"expected a new path, or --overwrite to replace it; nothing was changed")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    # args error checking
    for name in ("batch", "T", "grid", "episodes", "img_size", "size", "frames", "sequences"):
        value = getattr(args, name, None)
        if value is not None and value < (2 if name in ("T", "grid") else 1):
            raise DataError(f"--{name.replace('_', '-')}: expected a positive number"
                            f"{' >= 2' if name in ('T', 'grid') else ''}, found {value}")
    tracks_from = getattr(args, "tracks_from", None)
    if tracks_from is not None:
        if args.tracker is not None:
            raise DataError(f"--tracks-from replaces the tracker: expected no --tracker, found --tracker {args.tracker}")
        if not Path(tracks_from).is_dir():
            raise DataError(f"--tracks-from: expected a directory, found "
                            f"{'a file' if Path(tracks_from).exists() else 'nothing'} at {tracks_from}")
        if (args.T, args.grid) != (RELEASED_T, RELEASED_GRID):
            raise DataError(f"--tracks-from: the released tracks ({RELEASED_METHOD}) are {RELEASED_T}-step "
                            f"windows of a {RELEASED_GRID}x{RELEASED_GRID} grid, expected --T {RELEASED_T} "
                            f"--grid {RELEASED_GRID}, found --T {args.T} --grid {args.grid}")
    elif getattr(args, "suite", None) is not None:
        raise DataError(f"--suite {args.suite}: expected only with --tracks-from")
    if getattr(args, "tracker", "") is None:
        args.tracker = "auto"
    if args.command == "check-sim":
        tasks = [metaworld_task_name(t) for t in args.tasks.split(",") if t.strip()]
        cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
        failed = 0
        for task, k, check in check_sim_metaworld(tasks, args.episodes, cameras=cameras,
                                                  img_size=args.img_size, seed=args.seed, T=args.T,
                                                  grid=args.grid):
            print(f"{task} episode {k}: " + _summary_line(check))
            failed += not check["ok"]
        return 1 if failed else 0
    if getattr(args, "tolerance_s", 1.0) <= 0:
        raise DataError(f"--tolerance-s: expected a positive number of seconds, found {args.tolerance_s}")
    if args.command in ("videos", "lerobot") and args.tracker == "sim":
        raise DataError(f"--tracker sim: expected a simulator source (metaworld, libero), found {args.command}; "
                        f"use lk or cotracker")
    if args.command != "bench-tracker":
        out = Path(args.out)
        if out.exists() and not out.is_dir() and not str(out).endswith(".npz"):
            raise DataError(f"--out: expected a directory or a .npz path, found the file {out}")
        command = run_command(argv)
        if check_out(out, command, getattr(args, "overwrite", False), log):
            return 0
    shard = parse_shard(args.shard) if getattr(args, "shard", None) is not None else None
    if args.command == "merge":
        print(_summary_line(merge_shards(args.shards, out, log=log, extra_meta={"command": command})))
        return 0

    # Sources: validate everything cheap first, so bad input fails before any slow work
    extra = {}
    if args.command == "libero":
        counts = [check_libero(f)[1] for f in args.files]
        if args.tracker == "sim":
            for f in args.files:
                check_libero_states(f)
        demos = sum(counts)
        keep = shard_indices(demos, shard)  # global demo indices, over the files in order
        offsets = np.cumsum([0] + counts)
        picks = [{int(k - lo) for k in keep if lo <= k < hi} for lo, hi in zip(offsets[:-1], offsets[1:])]
        read = read_libero_sim if args.tracker == "sim" else read_libero
        if tracks_from is not None:  # every track file checked before any image is read
            folders = [released_track_dir(tracks_from, f, args.suite) for f in args.files]
            for f, folder, pick in zip(args.files, folders, picks):
                if pick:
                    check_released(f, folder, pick, args.T, args.grid)
            released = {"nonfinite": 0}
            folder_of = dict(zip(args.files, folders))
            read = lambda f, size, demos: read_libero_released(f, folder_of[f], size, demos, released)  # noqa: E731
        episodes = (ep for f, pick in zip(args.files, picks) if pick
                    for ep in read(f, args.img_size, demos=pick))
        run = dict(views=LIBERO_VIEWS, fps=TRAINING_FPS,
                   source="libero: " + ", ".join(Path(f).name for f in args.files),
                   extra_meta={"proprio": "joint positions (7) + gripper (2)",
                               "actions": "delta end-effector pose (6) + gripper (1)"})
        if tracks_from is not None:
            run["extra_meta"]["released_tracks"] = {
                "dir": str(Path(tracks_from).absolute()), "method": RELEASED_METHOD,
                "suites": sorted({p.parts[-3] for p in folders}),
                "made_by": "CoTracker2 in pairlab/AMPLIFY preprocessing/preprocess_libero.py, "
                           f"{RELEASED_SIZE} px frames flipped upright as ours",
                "vis": "released vis > 0.5",
                "nonfinite": "replaced by the point's previous position in its window (the grid "
                             "point at step 0), marked invisible; counted in the run's summary"}
        extra["demos"] = demos

    elif args.command == "videos":
        rates = []
        for p in args.paths:  # missing or unreadable sources fail before any tracking
            if not Path(p).exists():
                raise DataError(f"{p}: expected a video file or a folder of frames, found nothing")
            rates.append(args.fps or video_fps(p) or args.target_fps)  # reads the file's header
        if len(set(rates)) > 1:  # the rate decides the window span: one rate per dataset
            raise DataError(f"videos: expected one frame rate, found {sorted(set(rates))} fps "
                            f"(pass --fps, or preprocess each rate separately)")
        keep = shard_indices(len(args.paths), shard)
        episodes = ({"images": fit_square(read_video(args.paths[k])[0], args.img_size)[:, None],
                     "task": args.task} for k in keep)
        run = dict(views=[args.view], fps=args.target_fps, source_fps=rates[0],
                   source="videos: " + args.task)
        extra["source_fps"] = rates[0]

    elif args.command == "lerobot":
        views = None if args.views is None else [v.strip() for v in args.views.split(",") if v.strip()]
        src = LeRobotSource(args.root, views=views, tolerance_s=args.tolerance_s)
        chosen = src.select(args.select)
        keep = shard_indices(len(chosen), shard)  # positions in `chosen`: the unsharded run's order
        picked = [chosen[k] for k in keep]
        src.check(picked)  # lengths, widths, tasks, video files: before any decoding or tracking
        episodes = (src.episode(e, args.img_size) for e in picked)
        described = lambda key: (f"LeRobot '{key}'" + (f": {src.features[key].get('names')}"  # noqa: E731
                                                       if src.features[key].get("names") else ""))
        run = dict(views=src.views, fps=args.target_fps, source_fps=src.fps,
                   source=f"lerobot {src.version}: {Path(args.root).absolute().name}",
                   extra_meta={"lerobot": {"root": str(Path(args.root).absolute()), "version": src.version,
                                           "fps": src.fps, "camera_keys": src.camera_keys,
                                           "episode_index": chosen}})  # a shard's: meta shard.episodes
        for key, name in ((LEROBOT_STATE, "proprio"), (LEROBOT_ACTION, "actions")):
            if key in src.numeric:
                run["extra_meta"][name] = described(key) + f", one row per frame at {src.fps:g} fps"
        extra["source_fps"] = src.fps

    elif args.command == "metaworld":
        tasks = [metaworld_task_name(t) for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise DataError(f"metaworld: expected task names, found {args.tasks!r}")
        cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
        with MetaWorldEnv(tasks[0], cameras=cameras, img_size=args.img_size) as env:
            fps = env.fps  # also checks the camera names before any rollout
        record, keep = {}, []  # both filled while the episodes are recorded
        episodes = metaworld_episodes(tasks, args.episodes, cameras=cameras, img_size=args.img_size,
                                      seed=args.seed, max_attempts=args.max_attempts, record=record,
                                      shard=shard, indices=keep, sim=args.tracker == "sim")
        run = dict(views=cameras, fps=fps, source="metaworld: " + ",".join(tasks),
                   extra_meta={"proprio": "obs[:4]: hand xyz + gripper opening",
                               "actions": "delta hand xyz + gripper effort, in [-1, 1]",
                               "success": record})

    if args.command == "bench-tracker":
        names = [t.strip() for t in args.tracker.split(",") if t.strip()]
        bad = [t for t in names if t not in ("auto", "cotracker", "lk", "flow")]
        if bad or not names:
            raise DataError(f"--tracker: expected comma-separated names from auto, cotracker, lk, "
                            f"flow, found {args.tracker!r}")
        trackers = [load_tracker(t, cotracker_repo=args.cotracker_repo, device=args.device,
                                 cotracker_checkpoint=args.cotracker_checkpoint, batch=args.batch,
                                 log=log) for t in names]
        if args.truth == "metaworld":
            tasks = [metaworld_task_name(t) for t in args.tasks.split(",") if t.strip()]
            cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
            rows = bench_tracker_truth(trackers, tasks, episodes=args.episodes, cameras=cameras,
                                       img_size=args.size, seed=args.seed, log=log)
            _print_bench_truth(rows, args, tasks)
            return 0
        speeds = [float(s) for s in args.speeds.split(",")]
        for tracker in trackers:
            rows = bench_tracker(tracker, size=args.size, frames=args.frames, sequences=args.sequences,
                                 speeds=speeds, seed=args.seed)
            _print_bench(rows, tracker, args)
        return 0

    if tracks_from is not None:
        tracker = ReleasedTracks()
    else:
        tracker = load_tracker(args.tracker, cotracker_repo=args.cotracker_repo,
                               cotracker_checkpoint=args.cotracker_checkpoint, device=args.device,
                               batch=args.batch, log=log)

    run["extra_meta"] = {**run.get("extra_meta", {}), "command": command}
    if shard is not None:
        run["extra_meta"]["shard"] = {"index": shard[0], "count": shard[1], "episodes": keep}
        extra["shard"] = f"{shard[0]}/{shard[1]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = episodes_to_dataset(episodes, out, tracker=tracker, T=args.T, grid=args.grid,
                                  progress=not args.no_progress, track_dtype=args.track_dtype,
                                  log=log, overwrite=getattr(args, "overwrite", False), **run)
    summary.update(extra)
    if tracks_from is not None:
        summary["nonfinite_replaced"] = released["nonfinite"]
    if args.command == "metaworld":
        attempts = sum(r["attempts"] for r in record.values())
        successes = sum(r["successes"] for r in record.values())
        summary["success_rate"] = round(successes / max(attempts, 1), 3)
        summary["attempts"] = attempts
    print(_summary_line(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except amplify.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
