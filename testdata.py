"""Synthetic data for the tests: a bright square that moves with the action, and its exact tracks.

Imported by test_amplify.py, test_preprocess.py and test_eval_libero.py; not part of the method.
"""
import numpy as np

from amplify import grid_points, size_hw


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
