"""Tests for `preprocess.py libero FILES --tracks-from DIR`: the authors' released LIBERO tracks
converted to our conventions (issue #24). CPU, a few seconds:

    OMP_NUM_THREADS=1 python -m pytest -q test_tracks_from.py

The released files are not downloadable here, so the tests write small files in their layout
(docs/PUBLISHED_ARCHITECTURE.md sections 8 and 10), building the points the way the published code
does (grid_queries + Query.cotracker, restated below), and check the conversion against numbers
worked out by hand: point order, units, the image flip, resizing, visibility, the end padding, and
every refusal (one line, nothing written).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import amplify
import preprocess as P
from conftest import need
from test_preprocess import assert_rejected, run_cli, write_libero

SIZE, T, G = 128, 16, 20
METHOD = "uniform_400_reinit_16"


def their_grid(size=SIZE, grid=G):
    """Where the published code starts point k, in CoTracker pixels (x, y): its grid_queries
    (meshgrid of the ticks, 'ij', stacked as (yy, xx) = (row, col)) then Query.cotracker (swap to
    (col, row), (u + 1) * size / 2). (N, 2) float32."""
    ticks = np.linspace(-1 + 1 / grid, 1 - 1 / grid, grid, dtype=np.float32)
    xx, yy = np.meshgrid(ticks, ticks, indexing="ij")
    rowcol = np.stack([yy, xx], -1).reshape(-1, 2)  # their "standard" (row, col), normalised
    return ((rowcol[:, [1, 0]] + 1) * size / 2).astype(np.float32)


def write_released(root, src, suite="libero_object", T=T):
    """Released-style files for every demo of LIBERO file `src`: still points on their grid, visible."""
    h5py = need("h5py")
    folder = Path(root) / suite / METHOD / Path(src).stem
    folder.mkdir(parents=True)
    with h5py.File(src) as f:
        lengths = {d: len(f["data"][d]["actions"]) for d in f["data"]}
    for d, F in lengths.items():
        with h5py.File(folder / f"{d}.hdf5", "w") as t:
            for v in ("agentview", "eye_in_hand"):
                t[f"root/{v}/tracks"] = np.broadcast_to(their_grid(), (F, T, G * G, 2)).astype(np.float32)
                t[f"root/{v}/vis"] = np.ones((F, T, G * G), np.float32)
    return folder


def nothing_written(tmp_path, name="out"):
    return not any(p.name.startswith(name) for p in tmp_path.iterdir())


# -----------------------------------------------------------------------------
# The conversion on its own


def test_their_grid_is_column_major():
    """The restated published grid: consecutive points go down a column (docs section 8)."""
    g = their_grid()
    np.testing.assert_allclose(g[0], [3.2, 3.2], atol=1e-4)
    np.testing.assert_allclose(g[1], [3.2, 9.6], atol=1e-4)  # k = 1: row 1, column 0
    np.testing.assert_allclose(g[20], [9.6, 3.2], atol=1e-4)  # k = 20: row 0, column 1
    order = P.released_point_order()
    assert order[1] == 20 and order[20] == 1 and order[21] == 21 and order[399] == 399
    # ours (row-major, normalised) is theirs reordered, in pixels of the 128 px frame
    np.testing.assert_allclose(P.pixels_to_normalized(g[order], SIZE, SIZE), amplify.grid_points(G), atol=1e-6)


def test_point_order_units_vis_and_end_padding_by_hand():
    F = 3
    tracks = np.broadcast_to(their_grid(), (F, T, G * G, 2)).copy()
    vis = np.ones((F, T, G * G), np.float32)
    tracks[0, 1:, 20] += [2.0, 0.0]  # their k = 20 (row 0, column 1): +2 px in x from step 1
    tracks[0, 1:, 1] += [0.0, 3.0]  # their k = 1 (row 1, column 0): +3 px in y from step 1
    tracks[0, 2, 20] += [0.5, 0.0]  # then step 2 of window 0 only: +0.5 more px in x
    tracks[1, 2:, 41] += [0.3, -0.2]  # window 1 runs past the end after step 1: jitter to be held
    vis[0, 1, 1], vis[0, 1, 20], vis[0, 1, 41] = 0.3, 0.7, 0.5  # threshold > 0.5
    out, seen, bad = P.released_to_ours(tracks, vis)
    assert out.dtype == np.float32 and out.shape == (F, T, G * G, 2) and seen.dtype == bool and bad == 0
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(amplify.grid_points(G), (F, G * G, 2)), atol=1e-6)
    # ours n = 1 (row 0, column 1) is their k = 20: pixel (9.6 + 2, 3.2) -> u = 2 * p / 128 - 1
    np.testing.assert_allclose(out[0, 1, 1], [2 * 11.6 / 128 - 1, 2 * 3.2 / 128 - 1], atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1], [-0.81875, -0.95], atol=1e-6)
    np.testing.assert_allclose(out[0, 2, 1], [2 * 12.1 / 128 - 1, -0.95], atol=1e-6)  # step 2: real (window 0 has 3 real steps)
    # ours n = 20 (row 1, column 0) is their k = 1: pixel (3.2, 9.6 + 3); x stays x, y stays y
    np.testing.assert_allclose(out[0, 1, 20], [-0.95, 2 * 12.6 / 128 - 1], atol=1e-6)
    # past the end (window 0: steps >= 3; window 1: >= 2; window 2: >= 1) the last real step is held
    for w, real in ((0, 3), (1, 2), (2, 1)):
        np.testing.assert_array_equal(out[w, real:], np.broadcast_to(out[w, real - 1], out[w, real:].shape))
    # their k = 41 (row 1, column 2) is ours n = 22: its jitter past the end is gone
    np.testing.assert_array_equal(out[1, 2:, 22], np.broadcast_to(amplify.grid_points(G)[22], (T - 2, 2)))
    assert not seen[0, 1, 20] and seen[0, 1, 1] and not seen[0, 1, 22]  # vis 0.3, 0.7, 0.5
    assert seen.sum() == seen.size - 2


def test_nonfinite_positions_stay_where_the_point_was_and_are_invisible():
    F = 6  # window 0 has 6 real steps, window 1 has 5
    tracks = np.broadcast_to(their_grid(), (F, T, G * G, 2)).copy()
    tracks[0, 1:, 20] += [4.0, 1.0]
    tracks[0, 3, 20, 0] = np.nan  # x only: the whole position is unknown
    tracks[0, 4, 20] = np.inf
    tracks[1, 0, 1] = np.nan  # step 0: the grid point
    vis = np.ones((F, T, G * G), np.float32)
    vis[0, 2, 7] = np.nan  # unknown visibility: not visible (their k = 7 is ours n = 140)
    out, seen, bad = P.released_to_ours(tracks, vis)
    assert bad == 3 and np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 3, 1], out[0, 2, 1])  # ours n = 1 is their k = 20
    np.testing.assert_allclose(out[0, 4, 1], out[0, 2, 1])
    np.testing.assert_allclose(out[0, 2, 1], [2 * 13.6 / 128 - 1, 2 * 4.2 / 128 - 1], atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 20], amplify.grid_points(G)[20], atol=1e-6)  # their k = 1
    assert not seen[0, 3, 1] and not seen[0, 4, 1] and not seen[1, 0, 20] and not seen[0, 2, 140]
    assert seen.sum() == seen.size - 4


def test_resize_maps_pixels_half_pixel_centred():
    """At another --img-size the point stays on the same scene point: p -> (p + 0.5) * s / 128 - 0.5."""
    tracks = np.broadcast_to(their_grid(), (2, T, G * G, 2)).copy()
    tracks[0, 1:, 0] = [10.5, 20.5]
    out, _, _ = P.released_to_ours(tracks, np.ones((2, T, G * G)), size=64)
    np.testing.assert_allclose(P.normalized_to_pixels(out[0, 1, 0], 64, 64), [5.0, 10.0], atol=1e-5)
    np.testing.assert_allclose(out[0, 0, 0] - amplify.grid_points(G)[0], [1 / 128 - 1 / 64] * 2, atol=1e-6)


# -----------------------------------------------------------------------------
# The command, end to end


def block_frames(F, size=SIZE, seed=0):
    """Black frames, each with a bright 2x2 block at a known place (moving): stored upside down in
    the file as LIBERO stores them. Returns the frames and the block's centre (x, y) in each *file*
    frame, in pixels (centres at integers)."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((F, size, size, 3), np.uint8)
    centres = []
    for t in range(F):
        r, c = 2 * rng.integers(4, 20), 2 * rng.integers(4, 60)  # even: a 2x2 block stays 1 px at 64
        frames[t, r:r + 2, c:c + 2] = 250
        centres.append([c + 0.5, r + 0.5])
    return frames, np.array(centres, np.float32)


def centroid(img):
    """Brightness-weighted centre (x, y) of one uint8 (H, W, 3) frame, in pixels."""
    w = img[..., 0].astype(np.float64)
    rows, cols = np.indices(w.shape)
    return np.array([(w * cols).sum() / w.sum(), (w * rows).sum() / w.sum()])


@pytest.mark.parametrize("img_size", [None, 64])
def test_released_track_lands_on_the_bright_point_in_our_image(tmp_path, capsys, img_size):
    """The orientation, on content: the authors tracked frame[::-1] (preprocess_libero.py:162); a
    point they tracked onto the bright block must land on the block in the frame we store."""
    h5py = need("h5py")
    src = write_libero(tmp_path / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", demos=1, F=6, size=SIZE)
    F = 6
    frames, _ = block_frames(F)
    with h5py.File(src, "a") as f:
        for v in ("agentview", "eye_in_hand"):
            del f[f"data/demo_0/obs/{v}_rgb"]
            f[f"data/demo_0/obs/{v}_rgb"] = frames if v == "agentview" else frames[:, :, ::-1]
    folder = write_released(tmp_path / "released", src)
    k0 = 7 * 20 + 5  # their point: row 5, column 7 -> ours n0 = 5 * 20 + 7
    n0 = 5 * 20 + 7
    with h5py.File(folder / "demo_0.hdf5", "a") as t:
        for v, view_frames in (("agentview", frames), ("eye_in_hand", frames[:, :, ::-1])):
            tracked = np.ascontiguousarray(view_frames[:, ::-1])  # what the authors gave CoTracker
            at = np.stack([centroid(im) for im in tracked])  # (F, 2) the block, in their pixels
            tr = t[f"root/{v}/tracks"][()]
            for w in range(F):
                for s in range(1, T):  # past the end: the block on the repeated last frame
                    tr[w, s, k0] = at[min(w + s, F - 1)] if w < F - 1 else tr[w, 0, k0]
            t[f"root/{v}/tracks"][...] = tr
    out = tmp_path / "out"
    argv = ["libero", src, "--tracks-from", tmp_path / "released", "--out", out, "--no-progress"]
    assert P.main(argv + (["--img-size", img_size] if img_size else [])) == 0
    assert "nonfinite_replaced 0" in capsys.readouterr().out
    ds = amplify.load_dataset(str(out))
    size = img_size or SIZE
    assert ds.meta["img_size"] == [size, size] and ds.meta["tracker"] == "released:" + METHOD
    assert ds.meta["released_tracks"]["suites"] == ["libero_object"] and ds.arrays["vis"].dtype == bool
    images, tracks = ds.arrays["images"], ds.arrays["tracks"]
    for v in range(2):
        for w in range(F):
            for s in range(1, F - w):  # the steps on real frames (past them: held, pinned above)
                want = centroid(images[w + s, v])  # the block in the frame we store
                got = P.normalized_to_pixels(tracks[w, v, s, n0], size, size)
                np.testing.assert_allclose(got, want, atol=0.02, err_msg=f"view {v} window {w} step {s}")
    # every other point stayed on the grid (at 128 px exactly; at 64 the same scene points)
    others = np.delete(np.asarray(tracks), n0, axis=3)
    start = np.delete(amplify.grid_points(G), n0, axis=0) + (1 / SIZE - 1 / size)
    np.testing.assert_allclose(others, np.broadcast_to(start, others.shape), atol=1e-6)


def test_shards_merge_to_the_unsharded_run_and_suite_is_found(tmp_path):
    a = write_libero(tmp_path / "a_demo.hdf5", demos=3, F=4, size=SIZE)
    b = write_libero(tmp_path / "b_demo.hdf5", demos=2, F=5, size=SIZE, instruction="open the drawer")
    write_released(tmp_path / "rel", a, suite="libero_goal")
    write_released(tmp_path / "rel", b, suite="libero_10")
    run = ["libero", a, b, "--tracks-from", tmp_path / "rel", "--no-progress", "--out"]
    assert P.main(run + [tmp_path / "full"]) == 0
    assert P.main(run + [tmp_path / "s0", "--shard", "0/2"]) == 0
    assert P.main(run + [tmp_path / "s1", "--shard", "1/2"]) == 0
    assert P.main(["merge", tmp_path / "s1", tmp_path / "s0", "--out", tmp_path / "joined"]) == 0
    full, joined = amplify.load_dataset(str(tmp_path / "full")), amplify.load_dataset(str(tmp_path / "joined"))
    assert full.meta["released_tracks"]["suites"] == ["libero_10", "libero_goal"]
    for k in ("images", "tracks", "vis", "actions"):
        np.testing.assert_array_equal(full.arrays[k], joined.arrays[k])


def test_interrupted_run_resumes_and_a_changed_track_file_is_converted_again(tmp_path, monkeypatch, capsys):
    h5py = need("h5py")
    src = write_libero(tmp_path / "a_demo.hdf5", demos=2, F=4, size=SIZE)
    folder = write_released(tmp_path / "rel", src)
    convert = P.ReleasedTracks.episode_tracks

    def interrupted(self, ep, **kw):
        if ep["images"].shape[0] == 5:  # demo_1
            raise KeyboardInterrupt
        return convert(self, ep, **kw)

    for out, change in (("same", False), ("changed", True)):
        run = ["libero", src, "--tracks-from", tmp_path / "rel", "--no-progress", "--out", tmp_path / out]
        monkeypatch.setattr(P.ReleasedTracks, "episode_tracks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            P.main(run)
        monkeypatch.setattr(P.ReleasedTracks, "episode_tracks", convert)
        if change:  # demo_0's track file changed meanwhile: its episode is converted again
            with h5py.File(folder / "demo_0.hdf5", "a") as t:
                t["root/agentview/tracks"][0, 1, 0] += 1.0  # +1 px in x and y
        capsys.readouterr()
        assert P.main(run) == 0
        assert ("resumed: 1 of 2" in capsys.readouterr().err) == (not change)
        tracks = amplify.load_dataset(str(tmp_path / out)).arrays["tracks"]
        np.testing.assert_allclose(tracks[0, 0, 1, 0] - tracks[0, 0, 0, 0], [2 / 128 * change] * 2, atol=1e-6)


# -----------------------------------------------------------------------------
# Refusals: one line, expected vs found, nothing written


@pytest.fixture
def demo(tmp_path):
    src = write_libero(tmp_path / "pick_up_the_ketchup_demo.hdf5", demos=2, F=4, size=SIZE)
    return src, write_released(tmp_path / "rel", src)


def edit(folder, name, fn):
    h5py = need("h5py")
    with h5py.File(folder / name, "a") as t:
        fn(t)


def replace(key, value):
    def fn(t):
        del t[key]
        t[key] = value
    return fn


def refused(tmp_path, src, *words, extra=()):
    with pytest.raises(amplify.DataError) as e:
        P.main(["libero", src, "--tracks-from", tmp_path / "rel", "--out", tmp_path / "out",
                "--no-progress", *extra])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert nothing_written(tmp_path), sorted(os.listdir(tmp_path))
    return msg


def test_missing_track_file_names_the_path(tmp_path, demo):
    src, folder = demo
    (folder / "demo_1.hdf5").unlink()
    result = run_cli("libero", src, "--tracks-from", tmp_path / "rel", "--out", tmp_path / "out")
    assert_rejected(result, str(folder / "demo_1.hdf5"), "data/demo_1", "no such file")
    assert nothing_written(tmp_path)


def test_window_count_differing_from_the_demo_is_refused(tmp_path, demo):
    src, folder = demo  # demo_1 has 5 frames
    edit(folder, "demo_1.hdf5", replace("root/eye_in_hand/tracks", np.zeros((4, T, 400, 2), np.float32)))
    refused(tmp_path, src, "demo_1.hdf5: root/eye_in_hand/tracks", "expected 5 windows", "data/demo_1",
            "found 4")


@pytest.mark.parametrize("key, value, words", [
    ("root/agentview/tracks", np.zeros((4, T, 400, 2), np.int64), ["tracks", "expected float32, found int64"]),
    ("root/agentview/tracks", np.zeros((4, T, 400, 3), np.float32), ["expected shape (4, 16, 400, 2)",
                                                                     "found (4, 16, 400, 3)"]),
    ("root/agentview/vis", np.zeros((4, T, 400, 1), np.float32), ["vis: expected shape (4, 16, 400)",
                                                                   "found (4, 16, 400, 1)"]),
    ("root/agentview/tracks", np.zeros((4, 8, 400, 2), np.float32), ["expected windows of --T 16 steps",
                                                                     "found 8"]),
])
def test_wrong_shapes_and_dtypes_are_refused(tmp_path, demo, key, value, words):
    src, folder = demo
    edit(folder, "demo_0.hdf5", replace(key, value))
    refused(tmp_path, src, "demo_0.hdf5", *words)


@pytest.mark.parametrize("group, key, words", [
    ("root/agentview", "vis", ["root/agentview/vis: expected, missing"]),
    ("root", "eye_in_hand", ["expected the group root/eye_in_hand", "found ['agentview']"]),
])
def test_missing_view_and_missing_vis_are_refused(tmp_path, demo, group, key, words):
    src, folder = demo
    edit(folder, "demo_0.hdf5", lambda t: t[group].__delitem__(key))
    refused(tmp_path, src, "demo_0.hdf5", *words)


def test_row_major_points_are_refused_at_step_0(tmp_path, demo):
    """A file in another point order (or in normalised units) does not start on their grid."""
    src, folder = demo
    ours_px = P.normalized_to_pixels(amplify.grid_points(G), SIZE, SIZE)  # row-major
    edit(folder, "demo_0.hdf5", replace("root/agentview/tracks",
                                        np.broadcast_to(ours_px, (4, T, 400, 2)).astype(np.float32)))
    refused(tmp_path, src, "step 0", "column-major", "median distance")


def test_other_image_size_window_length_and_tracker_are_refused(tmp_path, demo):
    src, _ = demo
    refused(tmp_path, src, "--T 16", "found --T 8", extra=["--T", "8"])
    refused(tmp_path, src, "no --tracker", "--tracker lk", extra=["--tracker", "lk"])
    small = write_libero(tmp_path / "small_demo.hdf5", demos=1, F=4, size=16)
    write_released(tmp_path / "rel", small)
    refused(tmp_path, small, "128 x 128", "found 16 x 16")
    with pytest.raises(amplify.DataError, match="--suite libero_goal: expected only with --tracks-from"):
        P.main(["libero", src, "--suite", "libero_goal", "--out", tmp_path / "out"])


def test_suite_not_found_or_ambiguous(tmp_path, demo, capsys):
    src, folder = demo
    msg = refused(tmp_path, src, "found none", extra=["--suite", "libero_90"])
    assert str(tmp_path / "rel" / "libero_90" / METHOD / "pick_up_the_ketchup_demo") in msg
    write_released(tmp_path / "rel", src, suite="libero_90")
    refused(tmp_path, src, "expected one suite", "libero_90, libero_object", "--suite")
    assert P.main(["libero", src, "--tracks-from", tmp_path / "rel", "--suite", "libero_object",
                   "--out", tmp_path / "ok", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["released_tracks"]["suites"] == ["libero_object"]
    with pytest.raises(amplify.DataError, match="--tracks-from: expected a directory, found nothing"):
        P.main(["libero", src, "--tracks-from", tmp_path / "nowhere", "--out", tmp_path / "out2"])
