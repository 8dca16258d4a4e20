"""Tests for `preprocess.py lerobot`: `OMP_NUM_THREADS=1 pytest -q test_lerobot.py` (CPU, ~1 min).

The tests write small LeRobot datasets themselves, v3.0 (episodes sharing one parquet and one mp4,
spans given by from_timestamp) and v2.1 (one parquet and one mp4 per episode), in both codecs
LeRobot uses (AV1 through SVT-AV1, h264 through x264), then check what the import made of them:
frames (the video frame presented at each timestamp, compared with the same file decoded from
the start, and with the source pixels), actions and state (exactly the parquet's), tasks,
episode ends; and that bad input is refused in one line with nothing written.
"""
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import amplify
import preprocess as P
from conftest import need

HERE = Path(__file__).resolve().parent
FPS = 10
LENGTHS = (5, 7, 4)  # three episodes; the third in a second file (v3.0)
TASKS = ("pick up the cube", "open the drawer")
CODECS = {"h264": "libx264", "av1": "libsvtav1"}
SMALL = ["--tracker", "lk", "--T", "4", "--grid", "4", "--no-progress"]  # cheap tracking


def frames_for(e, n, h=32, w=32, seed=0):
    """Episode e's source frames: a smooth texture that slides 2 px per frame (so a frame off by
    one is far from the right one), uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed + e)
    coarse = rng.integers(0, 256, (h // 4 + 2 * n, w // 4 + 2 * n, 3)).astype(np.float32)
    tex = np.kron(coarse, np.ones((4, 4, 1)))
    tex = (tex + np.roll(tex, 1, 0) + np.roll(tex, 1, 1) + np.roll(tex, (1, 1), (0, 1))) / 4
    return np.stack([tex[t:t + h, 2 * t:2 * t + w] for t in range(n)]).astype(np.uint8)


def encode(path, clips, codec):
    """One mp4 holding the clips back to back at FPS (as LeRobot v3.0 concatenates episodes)."""
    av = need("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = clips[0].shape[1:3]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODECS[codec], rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "av1":
            stream.options = {"preset": "12", "svtav1-params": "log-level=0"}
        i = 0
        for clip in clips:
            for img in clip:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, FPS)
                i += 1
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decoded(path):
    """Every frame of a video, decoded from the start without seeking: the reference."""
    av = need("av")
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def png(img):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_lerobot(root, version="v3.0", codec="h264", lengths=LENGTHS, image_key=False):
    """A LeRobot dataset on disk, written as LeRobot lays it out. Cameras: `top` 32x32 and `wrist`
    40x32 (not square: centre-cropped on import), both video; image_key: `wrist` is an image
    feature stored as PNG bytes in the parquet instead. Returns the source frames, state, actions."""
    pa = need("pyarrow")
    pq = need("pyarrow.parquet")
    root = Path(root)
    src = {"top": [frames_for(e, n) for e, n in enumerate(lengths)],
           "wrist": [frames_for(e, n, h=40, seed=50) for e, n in enumerate(lengths)]}
    rng = np.random.default_rng(1)
    state = [rng.normal(size=(n, 3)).astype(np.float32) for n in lengths]
    action = [rng.normal(size=(n, 2)).astype(np.float32) for n in lengths]
    kinds = {"top": "video", "wrist": "image" if image_key else "video"}
    features = {f"observation.images.{c}": {"dtype": kinds[c], "shape": [*src[c][0].shape[1:]],
                                            "names": ["height", "width", "channels"]} for c in src}
    features.update({"observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
                     "action": {"dtype": "float32", "shape": [2], "names": None},
                     "timestamp": {"dtype": "float32", "shape": [1]},
                     "frame_index": {"dtype": "int64", "shape": [1]},
                     "episode_index": {"dtype": "int64", "shape": [1]},
                     "index": {"dtype": "int64", "shape": [1]},
                     "task_index": {"dtype": "int64", "shape": [1]}})
    v3 = version == "v3.0"
    info = {"codebase_version": version, "robot_type": "test", "fps": FPS, "features": features,
            "total_episodes": len(lengths), "total_frames": sum(lengths), "total_tasks": len(TASKS),
            "chunks_size": 1000, "splits": {"train": f"0:{len(lengths)}"},
            "data_path": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3 else
                          "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
            "video_path": ("videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3 else
                           "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    vec = (lambda d: pa.list_(pa.float32(), d)) if v3 else (lambda d: pa.list_(pa.float32()))  # both occur

    def table(eps):
        starts = np.cumsum([0, *lengths])
        cols = {"observation.state": pa.array([r for e in eps for r in state[e].tolist()], vec(3)),
                "action": pa.array([r for e in eps for r in action[e].tolist()], vec(2)),
                "timestamp": pa.array([t / FPS for e in eps for t in range(lengths[e])], pa.float32()),
                "frame_index": pa.array([t for e in eps for t in range(lengths[e])], pa.int64()),
                "episode_index": pa.array([e for e in eps for _ in range(lengths[e])], pa.int64()),
                "index": pa.array([starts[e] + t for e in eps for t in range(lengths[e])], pa.int64()),
                "task_index": pa.array([e % 2 for e in eps for _ in range(lengths[e])], pa.int64())}
        if image_key:
            cols["observation.images.wrist"] = pa.array(
                [{"bytes": png(img), "path": f"frame_{t:06d}.png"} for e in eps
                 for t, img in enumerate(src["wrist"][e])],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        return pa.table(cols)

    videos = [c for c in src if kinds[c] == "video"]
    if v3:  # episodes 0, 1 share file 0 (parquet and mp4s); episode 2 is in file 1
        files = [[0, 1], [2]]
        rows = {k: [] for k in ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                                "dataset_from_index", "dataset_to_index",
                                "meta/episodes/chunk_index", "meta/episodes/file_index"]}
        for c in videos:
            for k in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
                rows[f"videos/observation.images.{c}/{k}"] = []
        for i, eps in enumerate(files):
            path = root / f"data/chunk-000/file-{i:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table(eps), path)
            for c in videos:
                encode(root / f"videos/observation.images.{c}/chunk-000/file-{i:03d}.mp4",
                       [src[c][e] for e in eps], codec)
            t0 = 0.0
            for e in eps:
                start = sum(lengths[:e])
                for k, v in [("episode_index", e), ("tasks", [TASKS[e % 2]]), ("length", lengths[e]),
                             ("data/chunk_index", 0), ("data/file_index", i), ("dataset_from_index", start),
                             ("dataset_to_index", start + lengths[e]), ("meta/episodes/chunk_index", 0),
                             ("meta/episodes/file_index", 0)]:
                    rows[k].append(v)
                for c in videos:
                    for k, v in [("chunk_index", 0), ("file_index", i), ("from_timestamp", t0),
                                 ("to_timestamp", t0 + lengths[e] / FPS)]:
                        rows[f"videos/observation.images.{c}/{k}"].append(v)
                t0 += lengths[e] / FPS
        rows["stats/action/mean"] = [[0.0, 0.0]] * len(lengths)  # LeRobot keeps stats here too
        (root / "meta/episodes/chunk-000").mkdir(parents=True)
        pq.write_table(pa.table(rows), root / "meta/episodes/chunk-000/file-000.parquet")
        pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "task": list(TASKS)}),
                       root / "meta/tasks.parquet")
    else:
        for e in range(len(lengths)):
            path = root / f"data/chunk-000/episode_{e:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([e]), path)
            for c in videos:
                encode(root / f"videos/chunk-000/observation.images.{c}/episode_{e:06d}.mp4", [src[c][e]], codec)
        lines = [json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": n}) for e, n in enumerate(lengths)]
        (root / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
        (root / "meta/tasks.jsonl").write_text("\n".join(json.dumps({"task_index": i, "task": t})
                                                         for i, t in enumerate(TASKS)) + "\n")
    return {"frames": src, "state": state, "action": action, "videos": videos}


def video_file(root, version, camera, e):
    """(file, index of the episode's first frame in it) for episode e."""
    if version == "v3.0":
        return (root / f"videos/observation.images.{camera}/chunk-000/file-{0 if e < 2 else 1:03d}.mp4",
                LENGTHS[0] if e == 1 else 0)
    return root / f"videos/chunk-000/observation.images.{camera}/episode_{e:06d}.mp4", 0


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return np.inf if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(HERE / "preprocess.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


# -----------------------------------------------------------------------------
# What the import makes of a dataset


@pytest.mark.parametrize("version, codec", [("v3.0", "h264"), ("v3.0", "av1"), ("v2.1", "h264"), ("v2.1", "av1")])
def test_lerobot_frames_actions_state_tasks_and_episode_ends(tmp_path, capsys, version, codec):
    need("cv2")
    root = tmp_path / "lr"
    src = write_lerobot(root, version, codec)
    out = tmp_path / "ds"
    assert P.main(["lerobot", str(root), "--out", str(out), "--img-size", "32", *SMALL]) == 0
    assert "episodes 3" in capsys.readouterr().out
    ds = amplify.load_dataset(str(out))
    assert ds.meta["views"] == ["top", "wrist"] and ds.meta["source_fps"] == FPS and ds.meta["fps"] == 20.0
    assert ds.meta["lerobot"]["version"] == version and ds.meta["lerobot"]["episode_index"] == [0, 1, 2]
    assert ds.meta["source"] == f"lerobot {version}: lr" and "'x', 'y', 'z'" in ds.meta["proprio"]
    np.testing.assert_array_equal(ds.episode_ends, np.cumsum(LENGTHS))
    assert ds.tasks == [TASKS[0], TASKS[1], TASKS[0]]
    images = ds.arrays["images"]
    assert images.shape == (sum(LENGTHS), 2, 32, 32, 3) and ds.arrays["tracks"].shape[1:] == (2, 4, 16, 2)
    for e, (a, b) in enumerate(zip([0, *ds.episode_ends[:-1]], ds.episode_ends)):
        # actions and state: the parquet's values, bit for bit
        np.testing.assert_array_equal(ds.arrays["actions"][a:b], src["action"][e])
        np.testing.assert_array_equal(ds.arrays["proprio"][a:b], src["state"][e])
        for v, camera in enumerate(["top", "wrist"]):
            got = images[a:b, v]
            # the frames presented at the episode's timestamps: the same decoder, run from the start
            path, first = video_file(root, version, camera, e)
            ref = decoded(path)[first:first + LENGTHS[e]]
            if camera == "wrist":
                ref = ref[:, 4:36]  # 40x32 centre-cropped to 32x32
            np.testing.assert_array_equal(got, ref, err_msg=f"episode {e} {camera}")
            # and close to the source pixels, each frame closer to its own source than to the next
            source = src["frames"][camera][e][:, 4:36] if camera == "wrist" else src["frames"][camera][e]
            for t in range(LENGTHS[e]):
                assert psnr(got[t], source[t]) > 18, (e, camera, t, psnr(got[t], source[t]))
                if t + 1 < LENGTHS[e]:
                    assert psnr(got[t], source[t]) > psnr(got[t], source[t + 1]) + 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "lr"]  # no work directory left


def test_lerobot_image_features_in_the_parquet(tmp_path):
    need("cv2")
    root = tmp_path / "lr"
    src = write_lerobot(root, "v3.0", "h264", image_key=True)
    out = tmp_path / "ds.npz"
    assert P.main(["lerobot", str(root), "--out", str(out), "--img-size", "32", "--views", "wrist", *SMALL]) == 0
    ds = amplify.load_dataset(str(out))
    assert ds.meta["views"] == ["wrist"] and ds.meta["lerobot"]["camera_keys"] == ["observation.images.wrist"]
    # PNG is lossless: the frames are the source's, centre-cropped
    expected = np.concatenate(src["frames"]["wrist"])[:, 4:36]
    np.testing.assert_array_equal(ds.arrays["images"][:, 0], expected)


def test_lerobot_views_episodes_and_shards_merge_to_the_unsharded_run(tmp_path):
    need("cv2")
    root = tmp_path / "lr"
    src = write_lerobot(root, "v3.0", "h264")
    run = ["lerobot", str(root), "--views", "observation.images.top", "--episodes", "2,1", "--img-size", "16", *SMALL]
    assert P.main([*run, "--out", str(tmp_path / "full")]) == 0
    full = amplify.load_dataset(str(tmp_path / "full"))
    assert full.meta["views"] == ["top"] and full.meta["lerobot"]["episode_index"] == [2, 1]
    assert full.tasks == [TASKS[0], TASKS[1]] and full.arrays["images"].shape[:2] == (LENGTHS[2] + LENGTHS[1], 1)
    np.testing.assert_array_equal(full.arrays["actions"][:LENGTHS[2]], src["action"][2])
    assert P.main([*run, "--out", str(tmp_path / "s0"), "--shard", "0/2"]) == 0
    assert P.main([*run, "--out", str(tmp_path / "s1"), "--shard", "1/2"]) == 0
    assert P.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "merged")]) == 0
    s1 = amplify.load_dataset(str(tmp_path / "s1"))  # meta: the whole run's episodes, and this shard's
    assert s1.meta["lerobot"]["episode_index"] == [2, 1] and s1.meta["shard"]["episodes"] == [1]
    merged = amplify.load_dataset(str(tmp_path / "merged"))
    for key, x in full.arrays.items():
        np.testing.assert_array_equal(merged.arrays[key], x, err_msg=key)
    assert merged.tasks == full.tasks


def test_lerobot_interrupted_run_resumes(tmp_path, monkeypatch):
    need("cv2")
    root = tmp_path / "lr"
    write_lerobot(root, "v2.1", "h264")
    real = P.load_tracker

    class Interrupted:  # tracks one episode, then the user presses ctrl-c
        name = "lk"

        def __init__(self):
            self.lk, self.calls = real("lk"), 0

        def track(self, frames, queries, span):
            self.calls += 1
            if self.calls > 2:  # two views of episode 0
                raise KeyboardInterrupt
            return self.lk.track(frames, queries, span)

    command = ["lerobot", str(root), "--out", str(tmp_path / "ds"), "--img-size", "16", *SMALL]
    monkeypatch.setattr(P, "load_tracker", lambda *a, **k: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        P.main(command)
    assert (tmp_path / "ds.work").is_dir() and not (tmp_path / "ds").exists()
    monkeypatch.setattr(P, "load_tracker", real)
    assert P.main(command) == 0
    assert amplify.load_dataset(str(tmp_path / "ds")).num_episodes == 3 and not (tmp_path / "ds.work").exists()


def test_decode_video_at_seeks_earlier_when_the_keyframe_index_overshoots(tmp_path, monkeypatch):
    """mp4 indexes keyframes by decode time: with MPEG-4 B-frames the first seek lands after the
    frame asked for; the decoder must start earlier, never return a later frame or give up."""
    av = need("av")
    clip = frames_for(0, 24)
    with av.open(str(tmp_path / "b.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"g": "5", "bf": "2"}
        for i, img in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ref = decoded(tmp_path / "b.mp4")
    starts, decode_from = [], P._decode_from
    monkeypatch.setattr(P, "_decode_from", lambda c, s, start, *a: starts.append(start) or decode_from(c, s, start, *a))
    retried = 0
    for k in range(22):
        starts.clear()
        got = P.decode_video_at(tmp_path / "b.mp4", [k / 30, (k + 2) / 30], 1e-4)
        np.testing.assert_array_equal(got, ref[[k, k + 2]], err_msg=f"from frame {k}")
        retried += len(starts) > 1
    assert retried > 0  # the case this test is for did occur


def test_decode_video_at_picks_frames_by_presentation_time(tmp_path):
    clip = frames_for(0, 6)
    encode(tmp_path / "v.mp4", [clip], "h264")
    ref = decoded(tmp_path / "v.mp4")
    got = P.decode_video_at(tmp_path / "v.mp4", [0.2, 0.3, 0.5], 1e-4)
    np.testing.assert_array_equal(got, ref[[2, 3, 5]])
    with pytest.raises(amplify.DataError, match=r"expected a frame at 0\.350000 s \(\+-0\.0001\), found the nearest at 0\.3"):
        P.decode_video_at(tmp_path / "v.mp4", [0.2, 0.35], 1e-4)
    with pytest.raises(amplify.DataError, match=r"expected a frame at 0\.600000 s"):  # past the end
        P.decode_video_at(tmp_path / "v.mp4", [0.5, 0.6], 1e-4)


# -----------------------------------------------------------------------------
# Bad input: one line naming what was expected and what was found, nothing written


def _set_info(root, **changes):
    info = json.loads((root / "meta/info.json").read_text())
    info.update(changes)
    (root / "meta/info.json").write_text(json.dumps(info))


def _drop_rows(root):  # episode 1's parquet rows lose their last frame
    pq = need("pyarrow.parquet")
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)


def _short_video(root):  # the shared mp4 lacks episode 1's last two frames
    encode(root / "videos/observation.images.top/chunk-000/file-000.mp4",
           [frames_for(0, LENGTHS[0]), frames_for(1, LENGTHS[1] - 2)], "h264")


def _wide_state(root):
    feats = json.loads((root / "meta/info.json").read_text())["features"]
    feats["observation.state"]["shape"] = [4]
    _set_info(root, features=feats)


BAD = {
    "not lerobot": (lambda root: shutil.rmtree(root / "meta"), [],
                    ["expected a LeRobot dataset (meta/info.json)", "no meta/info.json"]),
    "version": (lambda root: _set_info(root, codebase_version="v1.6"), [],
                ["codebase_version", "'v2.0', 'v2.1', 'v3.0'", "'v1.6'"]),
    "missing video": (lambda root: (root / "videos/observation.images.wrist/chunk-000/file-001.mp4").unlink(), [],
                      ["episode 2", "observation.images.wrist", "file-001.mp4", "no such file"]),
    "camera": (lambda root: None, ["--views", "top,side"],
               ["--views", "observation.images.top", "'side'"]),
    "lengths": (_drop_rows, [], ["episode 1", "expected 7 frames", "found 6 rows"]),
    "frames": (_short_video, [], ["episode 1: observation.images.top", "file-000.mp4", "expected a frame at 1.000000 s",
                                  "found the nearest at 0.900000 s", "2 of 7 frames missing"]),
    "state width": (_wide_state, [], ["observation.state", "expected 4 values per frame", "found 15 for 5"]),
    "episodes": (lambda root: None, ["--episodes", "1-5"], ["--episodes", "0..2, 3 episodes", "found 3"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_lerobot_bad_input_rejected_and_nothing_written(tmp_path, case):
    break_it, flags, words = BAD[case]
    root = tmp_path / "lr"
    write_lerobot(root, "v3.0", "h264")
    break_it(root)
    with pytest.raises(amplify.DataError) as e:
        P.main(["lerobot", str(root), "--out", str(tmp_path / "out"), "--img-size", "32", *flags, *SMALL])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr"]  # no dataset, no work directory


def test_lerobot_cli_refuses_in_one_line(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v3.0", "fps": 0}))
    result = run_cli("lerobot", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "fps: expected a positive number, found 0" in result.stderr
