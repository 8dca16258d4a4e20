"""Run a trained AMPLIFY policy on a UR5 arm, safely and at a fixed rate; record demonstrations.

The paper's real-world setup (AMPLIFY, Collins et al., CoRL 2025, arXiv 2506.14198, Sec. 5):
a UR5, three static RGB cameras cropped and resized to the training size, actions that are
absolute end-effector positions plus the gripper, 20 Hz control with temporal ensembling, 90 s
episodes. Normalization and ensembling live inside `amplify.Policy`; this file only moves data
between the hardware and `policy.act`, and keeps the arm inside the limits of a config file.

Notable features:
- Fixed rate without drift: ticks are scheduled on absolute deadlines `start + k * period` of a
  monotonic clock; a late tick is counted as an overrun and missed deadlines are dropped, never
  caught up in a burst. Per-step latency goes to a JSON-lines log.
- Safety: a workspace box and a maximum motion per tick, with targets either clamped or refused
  (`safety.on_violation`). An exception, Ctrl-C, a stale or lost camera frame, a non-finite
  action or too many consecutive overruns stop the arm (servoStop, stopL as fallback) before the
  program exits. `--dry-run` runs everything (cameras, policy, safety filter, log) but opens the
  robot read-only, so no motion can be commanded.
- `--record OUT`: teleoperated or kinesthetic (`--kinesthetic`, freedrive) demonstrations, or
  human demonstrations without a robot (`--no-actions`), written straight into the AMPLIFY
  dataset format by `preprocess.episodes_to_dataset`.
- Hardware is duck-typed and injected (robot, gripper, cameras, clock), so the loop is tested
  without hardware (test_real_robot.py). `rtde_control`/`rtde_receive`, `cv2` and
  `pyrealsense2` are imported lazily, only when real hardware is opened.

Examples:
    python real_robot.py --config real_robot.json --policy runs/real/policy.pt \
        --task "put the cup on the plate" --dry-run --log steps.jsonl
    python real_robot.py --config real_robot.json --policy runs/real/policy.pt \
        --task "put the cup on the plate" --episodes 3
    python real_robot.py --config real_robot.json --record data/cup_robot \
        --task "put the cup on the plate" --episodes 10 --kinesthetic
    python real_robot.py --config real_robot.json --record data/cup_human \
        --task "put the cup on the plate" --episodes 10 --no-actions

Units: positions in metres, orientations as rotation vectors in radians (the UR convention),
gripper in [0, 1] with 0 open and 1 closed. Action/proprio layouts (`control.action`):
`xyz_gripper` -> [x, y, z, g] (orientation held at its value at the episode start) and
`xyz_rotvec_gripper` -> [x, y, z, rx, ry, rz, g]. Proprio uses the same layout, measured.
"""
import argparse
import json
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

# -----------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """Bad config file: the message names the key and the expected vs found value."""


class SafetyStop(RuntimeError):
    """A condition that must stop the arm: stale/lost frame, overrun budget, bad action."""


class StaleFrame(SafetyStop):
    pass


class CameraLost(SafetyStop):
    pass


class OverrunBudget(SafetyStop):
    pass


# -----------------------------------------------------------------------------
# Config: a JSON file, validated into dataclasses. Unknown keys are errors, not ignored: a typo
# in a safety key (say "max_stp_m") must not silently fall back to a default.

ACTION_LAYOUTS = {"xyz_gripper": 4, "xyz_rotvec_gripper": 7}
_REQUIRED = object()


@dataclass
class RobotConfig:
    host: str
    servo_lookahead_s: float = 0.1  # servoL smoothing, UR range [0.03, 0.2]; more = smoother, laggier
    servo_gain: float = 300.0  # servoL proportional gain, UR range [100, 2000]
    stop_decel: float = 1.0  # m/s^2 (servoStop/stopL deceleration); gentle but prompt
    home: list = None  # optional [x, y, z, rx, ry, rz] reached with moveL before each episode


@dataclass
class GripperConfig:
    kind: str = "none"  # "robotiq" (socket, port 63352) or "none"
    host: str = ""
    port: int = 63352


@dataclass
class CameraConfig:
    name: str  # view name; must match the policy's `views`
    kind: str  # "opencv" or "realsense"
    device: object  # OpenCV index (int) or path (str); RealSense serial (str)
    width: int = 640
    height: int = 480
    fps: int = 30
    crop: list = None  # [x, y, w, h] in pixels of the raw frame, applied before resizing
    rotate: int = 0  # 0/90/180/270 degrees clockwise, for cameras mounted sideways/upside down


@dataclass
class ControlConfig:
    rate_hz: float = 20.0
    episode_s: float = 90.0
    action: str = "xyz_gripper"
    max_frame_age_s: float = 0.2  # older frame at the time of use -> stop (a frozen camera)
    max_consecutive_overruns: int = 5  # this many late ticks in a row -> stop
    camera_timeout_s: float = 5.0  # wait for the first frame of every camera at start-up


@dataclass
class SafetyConfig:
    workspace_min: list  # [x, y, z] metres, robot base frame
    workspace_max: list
    max_step_m: float = 0.02  # per tick: 0.02 m at 20 Hz = 0.4 m/s
    max_step_rad: float = 0.1  # per tick, orientation (xyz_rotvec_gripper only)
    on_violation: str = "clamp"  # "clamp" or "refuse", see SafetyFilter


@dataclass
class RecordConfig:
    img_size: list = field(default_factory=lambda: [128, 128])  # [H, W] stored in the dataset


@dataclass
class Config:
    robot: RobotConfig
    gripper: GripperConfig
    cameras: list  # list[CameraConfig], in the dataset's view order when recording
    control: ControlConfig
    safety: SafetyConfig
    record: RecordConfig
    task: str = ""  # default task text; --task overrides

    @property
    def period(self):
        return 1.0 / self.control.rate_hz


def _typename(value):
    return {bool: "bool", int: "int", float: "number", str: "str", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check(value, kind, path):
    """Check one value against `kind`; returns it converted (ints accepted as numbers)."""
    def fail(expected):
        raise ConfigError(f"config error: {path}: expected {expected}, found {_typename(value)} "
                          f"({json.dumps(value)[:40]})")
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an int")
        return value
    if kind == "str":
        if not isinstance(value, str):
            fail("a string")
        return value
    if kind == "int|str":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            fail("an int or a string")
        return value
    if isinstance(kind, tuple) and kind[0] == "numbers":  # ("numbers", length)
        n = kind[1]
        if not isinstance(value, list) or len(value) != n:
            fail(f"a list of {n} numbers")
        return [_check(v, "number", f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(kind, tuple) and kind[0] == "ints":
        n = kind[1]
        if not isinstance(value, list) or len(value) != n:
            fail(f"a list of {n} ints")
        return [_check(v, "int", f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(kind, tuple) and kind[0] == "one of":
        if value not in kind[1]:
            raise ConfigError(f"config error: {path}: expected one of {list(kind[1])}, "
                              f"found {json.dumps(value)[:40]}")
        return value
    raise AssertionError(kind)


def _kind_name(kind):
    if isinstance(kind, tuple):
        return f"one of {list(kind[1])}" if kind[0] == "one of" else f"a list of {kind[1]} {kind[0]}"
    return {"number": "a number", "int": "an int", "str": "a string",
            "int|str": "an int or a string"}[kind]


def _section(raw, path, cls, spec):
    """Validate the dict `raw` against `spec` {key: (kind, default)} and build `cls`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path}: expected an object, found {_typename(raw)}")
    unknown = sorted(set(raw) - set(spec))
    if unknown:
        raise ConfigError(f"config error: {path}: unknown key '{unknown[0]}' "
                          f"(expected keys: {', '.join(spec)})")
    kwargs = {}
    for key, (kind, default) in spec.items():
        where = f"{path}.{key}" if path else key
        if key not in raw:
            if default is _REQUIRED:
                raise ConfigError(f"config error: missing key '{where}' (expected {_kind_name(kind)})")
            continue
        if raw[key] is None and default is None:  # optional keys may be null
            continue
        kwargs[key] = _check(raw[key], kind, where)
    return cls(**kwargs)


def parse_config(raw):
    """Validate a config dict (parsed JSON) into a `Config`; raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: top level: expected an object, found {_typename(raw)}")
    top = {"robot": ("object", _REQUIRED), "gripper": ("object", None), "cameras": ("list", _REQUIRED),
           "control": ("object", None), "safety": ("object", _REQUIRED),
           "record": ("object", None), "task": ("str", None), "comment": ("str", None)}
    unknown = sorted(set(raw) - set(top))
    if unknown:
        raise ConfigError(f"config error: unknown top-level key '{unknown[0]}' "
                          f"(expected keys: {', '.join(top)})")
    for key, (_, default) in top.items():
        if default is _REQUIRED and key not in raw:
            raise ConfigError(f"config error: missing key '{key}'")
    R = _REQUIRED
    robot = _section(raw["robot"], "robot", RobotConfig, {
        "host": ("str", R), "servo_lookahead_s": ("number", 0.1), "servo_gain": ("number", 300.0),
        "stop_decel": ("number", 1.0), "home": (("numbers", 6), None)})
    gripper = _section(raw.get("gripper", {}), "gripper", GripperConfig, {
        "kind": (("one of", ("robotiq", "none")), "none"), "host": ("str", ""), "port": ("int", 63352)})
    if not isinstance(raw["cameras"], list) or not raw["cameras"]:
        found = "an empty list" if raw["cameras"] == [] else _typename(raw["cameras"])
        raise ConfigError(f"config error: cameras: expected a non-empty list, found {found}")
    cameras = [_section(c, f"cameras[{i}]", CameraConfig, {
        "name": ("str", R), "kind": (("one of", ("opencv", "realsense")), R), "device": ("int|str", R),
        "width": ("int", 640), "height": ("int", 480), "fps": ("int", 30),
        "crop": (("ints", 4), None), "rotate": (("one of", (0, 90, 180, 270)), 0)})
        for i, c in enumerate(raw["cameras"])]
    control = _section(raw.get("control", {}), "control", ControlConfig, {
        "rate_hz": ("number", 20.0), "episode_s": ("number", 90.0),
        "action": (("one of", tuple(ACTION_LAYOUTS)), "xyz_gripper"),
        "max_frame_age_s": ("number", 0.2), "max_consecutive_overruns": ("int", 5),
        "camera_timeout_s": ("number", 5.0)})
    safety = _section(raw["safety"], "safety", SafetyConfig, {
        "workspace_min": (("numbers", 3), R), "workspace_max": (("numbers", 3), R),
        "max_step_m": ("number", 0.02), "max_step_rad": ("number", 0.1),
        "on_violation": (("one of", ("clamp", "refuse")), "clamp")})
    record = _section(raw.get("record", {}), "record", RecordConfig, {"img_size": (("ints", 2), None)})
    task = _check(raw["task"], "str", "task") if raw.get("task") is not None else ""

    # cross-field checks: values that type-check but make no sense
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        raise ConfigError(f"config error: cameras: expected unique names, found {names}")
    lo, hi = np.array(safety.workspace_min), np.array(safety.workspace_max)
    if not np.all(lo < hi):
        raise ConfigError(f"config error: safety: expected workspace_min < workspace_max in every "
                          f"axis, found {safety.workspace_min} and {safety.workspace_max}")
    for key in ("max_step_m", "max_step_rad"):
        if getattr(safety, key) <= 0:
            raise ConfigError(f"config error: safety.{key}: expected > 0, found {getattr(safety, key)}")
    for key in ("rate_hz", "episode_s", "max_frame_age_s", "camera_timeout_s"):
        if getattr(control, key) <= 0:
            raise ConfigError(f"config error: control.{key}: expected > 0, found {getattr(control, key)}")
    if control.max_consecutive_overruns < 1:
        raise ConfigError(f"config error: control.max_consecutive_overruns: expected >= 1, "
                          f"found {control.max_consecutive_overruns}")
    if robot.home is not None and not (np.all(lo <= robot.home[:3]) and np.all(robot.home[:3] <= hi)):
        raise ConfigError(f"config error: robot.home: expected a position inside the workspace "
                          f"{safety.workspace_min}..{safety.workspace_max}, found {robot.home[:3]}")
    if gripper.kind == "robotiq" and not gripper.host:
        raise ConfigError("config error: gripper.host: expected a host name for kind 'robotiq', found ''")
    for c in cameras:
        if c.crop is not None and (c.crop[2] <= 0 or c.crop[3] <= 0):
            raise ConfigError(f"config error: cameras '{c.name}'.crop: expected positive w, h, "
                              f"found {c.crop}")
    return Config(robot, gripper, cameras, control, safety, record, task)


def load_config(path):
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config error: {path}: expected JSON, found a syntax error "
                          f"at line {e.lineno} column {e.colno}: {e.msg}") from None
    return parse_config(raw)


# -----------------------------------------------------------------------------
# Clock and fixed-rate scheduler


class MonotonicClock:
    """Wall time for the control loop. Injected so tests can run the loop on a fake clock."""

    def now(self):
        return time.monotonic()

    def sleep_until(self, t):
        # time.sleep oversleeps (by milliseconds on a loaded machine): sleep most of the way, spin
        # the last millisecond
        while True:
            dt = t - time.monotonic()
            if dt <= 0:
                return
            time.sleep(dt - 0.001 if dt > 0.002 else 0)


class Rate:
    """Ticks on absolute deadlines `start + k * period`, so errors never accumulate into drift.

    `sleep()` ends a tick: it waits for the next deadline and returns 0, or, when the tick's work
    ran past that deadline (an overrun), returns how late it is and does not wait; deadlines
    missed entirely are dropped rather than caught up with a burst of short ticks.
    """

    def __init__(self, hz, clock):
        self.period = 1.0 / hz
        self.clock = clock
        self.start = clock.now()
        self.k = 0  # index of the deadline that ends the current tick, minus one

    def sleep(self):
        self.k += 1
        deadline = self.start + self.k * self.period
        late = self.clock.now() - deadline
        if late <= 0:
            self.clock.sleep_until(deadline)
            return 0.0
        self.k += int(late // self.period)  # drop the deadlines that have passed entirely
        return late


# -----------------------------------------------------------------------------
# Safety filter


def _rotvec_step(prev, target, max_rad):
    """Rotation from `prev` towards `target` (rotation vectors), limited to `max_rad`.

    Returns (limited rotvec, angle of the requested rotation)."""
    from scipy.spatial.transform import Rotation

    r_prev = Rotation.from_rotvec(prev)
    delta = (Rotation.from_rotvec(target) * r_prev.inv()).as_rotvec()  # in the base frame
    angle = float(np.linalg.norm(delta))
    if angle > max_rad:
        delta = delta * (max_rad / angle)
    return (Rotation.from_rotvec(delta) * r_prev).as_rotvec(), angle


class SafetyFilter:
    """Keeps commanded targets inside the workspace box and within a maximum motion per tick.

    The step is measured from the previous *commanded* target (the first one is the measured pose
    at the episode start), not from the measured pose, which lags behind servoL targets: limiting
    against the lagging pose would let the commanded target run away over several ticks.

    on_violation = "clamp": the position is clipped into the box, then the step towards it is
      shortened to `max_step_m` (same direction); the rotation is shortened to `max_step_rad`.
      The arm keeps moving, towards the policy's target, at bounded speed.
    on_violation = "refuse": a target outside the box or farther than one step is not executed;
      the arm holds the previous target for this tick (and moves again as soon as the policy
      proposes a reachable target). Stricter: a policy that drifts out of range freezes the arm.
    A non-finite target always stops (SafetyStop). The loop clips the gripper to [0, 1].
    """

    def __init__(self, cfg: SafetyConfig):
        self.lo = np.asarray(cfg.workspace_min, np.float64)
        self.hi = np.asarray(cfg.workspace_max, np.float64)
        self.max_step = cfg.max_step_m
        self.max_rad = cfg.max_step_rad
        self.mode = cfg.on_violation

    def inside(self, pos):
        return bool(np.all(self.lo <= pos) and np.all(pos <= self.hi))

    def apply(self, target, prev):
        """target, prev: pose (6,) [x, y, z, rx, ry, rz]. Returns (pose (6,), event or None)."""
        target, prev = np.asarray(target, np.float64), np.asarray(prev, np.float64)
        if not np.all(np.isfinite(target)):
            raise SafetyStop(f"policy returned a non-finite target {target.tolist()}")
        pos, rot = target[:3], target[3:]
        step = pos - prev[:3]
        dist = float(np.linalg.norm(step))
        rot_limited, angle = _rotvec_step(prev[3:], rot, self.max_rad) if np.any(rot != prev[3:]) \
            else (prev[3:], 0.0)
        eps = 1e-9
        violates = (not self.inside(pos)) or dist > self.max_step + eps or angle > self.max_rad + eps
        if not violates:
            return target, None
        if self.mode == "refuse":
            return prev.copy(), "refused"
        pos = np.clip(pos, self.lo, self.hi)
        step = pos - prev[:3]
        dist = float(np.linalg.norm(step))
        if dist > self.max_step:
            pos = prev[:3] + step * (self.max_step / dist)
        return np.concatenate([pos, rot_limited]), "clamped"


# -----------------------------------------------------------------------------
# Cameras. `read()` returns the newest Frame without blocking; a background thread keeps grabbing,
# because OpenCV queues frames and a blocking read would hand the policy an old one.


@dataclass
class Frame:
    image: np.ndarray  # uint8 (H, W, 3) RGB, raw camera size
    stamp: float  # MonotonicClock time at which the frame arrived on the host


class ThreadedCamera:
    """Runs `grab() -> RGB uint8 image or None` in a thread and keeps the newest frame."""

    def __init__(self, name, grab, close=lambda: None, clock=None):
        self.name, self._grab, self._close = name, grab, close
        self.clock = clock or MonotonicClock()
        self._frame, self._error = None, None
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"camera-{name}", daemon=True)
        self._thread.start()

    def _loop(self):
        try:
            while self._running:
                image = self._grab()
                if image is not None:  # a failed grab just leaves the old frame to go stale
                    self._frame = Frame(image, self.clock.now())
                else:
                    time.sleep(0.005)
        except Exception as e:  # device unplugged, driver error: reported by read()
            self._error = e

    def read(self):
        if self._error is not None:
            raise CameraLost(f"camera '{self.name}' lost: {self._error}")
        if self._frame is None:
            raise CameraLost(f"camera '{self.name}' has produced no frame")
        return self._frame

    def close(self):
        self._running = False
        self._thread.join(timeout=1.0)
        self._close()


def open_opencv_camera(cfg: CameraConfig):
    import cv2

    cap = cv2.VideoCapture(cfg.device)
    if not cap.isOpened():
        raise CameraLost(f"camera '{cfg.name}': cannot open OpenCV device {cfg.device!r}")
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
    cap.set(cv2.CAP_PROP_FPS, cfg.fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # not honoured by every backend, hence the thread

    def grab():
        ok, bgr = cap.read()
        return np.ascontiguousarray(bgr[..., ::-1]) if ok else None

    return ThreadedCamera(cfg.name, grab, cap.release)


def open_realsense_camera(cfg: CameraConfig):
    import pyrealsense2 as rs

    pipeline, rs_cfg = rs.pipeline(), rs.config()
    rs_cfg.enable_device(str(cfg.device))
    rs_cfg.enable_stream(rs.stream.color, cfg.width, cfg.height, rs.format.rgb8, cfg.fps)
    pipeline.start(rs_cfg)

    def grab():
        frames = pipeline.wait_for_frames(1000)  # raises after 1 s without frames -> CameraLost
        color = frames.get_color_frame()
        return np.asanyarray(color.get_data()).copy() if color else None

    return ThreadedCamera(cfg.name, grab, pipeline.stop)


def resize(image, size):
    """uint8 (H, W, 3) -> (size[0], size[1], 3) with amplify.resize_images, the resize that made the
    training data: the policy sees camera frames as it saw its dataset."""
    import amplify

    return amplify.resize_images(image, size)


def prepare_image(image, cam: CameraConfig, size):
    """Raw camera frame -> training view: crop [x, y, w, h], rotate clockwise, resize to (H, W)."""
    if cam.crop is not None:
        x, y, w, h = cam.crop
        if y + h > image.shape[0] or x + w > image.shape[1]:
            raise ValueError(f"camera '{cam.name}': crop {cam.crop} exceeds the frame size "
                             f"{image.shape[1]}x{image.shape[0]} (w x h)")
        image = image[y:y + h, x:x + w]
    if cam.rotate:
        image = np.rot90(image, k=-cam.rotate // 90)  # negative k: clockwise
    return resize(np.ascontiguousarray(image), size)


def read_views(cameras, cam_cfgs, size, now, max_age):
    """Newest frame of every camera, checked for age, as uint8 (V, H, W, 3) in `cam_cfgs` order."""
    views = []
    for cam_cfg in cam_cfgs:
        frame = cameras[cam_cfg.name].read()
        if frame is None:
            raise CameraLost(f"camera '{cam_cfg.name}' returned no frame")
        age = now - frame.stamp
        if age > max_age:
            raise StaleFrame(f"stale frame from camera '{cam_cfg.name}': age {age:.3f} s > "
                             f"max {max_age:.3f} s (control.max_frame_age_s)")
        views.append(prepare_image(frame.image, cam_cfg, size))
    return np.stack(views)


def wait_for_cameras(cameras, timeout):
    """Start-up: wait (real time) until every camera has delivered a frame."""
    deadline = time.monotonic() + timeout
    for cam in cameras.values():
        while True:
            try:
                cam.read()
                break
            except CameraLost:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


# -----------------------------------------------------------------------------
# Robot and gripper drivers. Interface used by the loop (tests inject fakes with the same methods):
#   robot: tcp_pose() -> (6,), servo(pose (6,), period), move_to(pose), stop(), teach(on), close()
#   gripper: position() -> [0, 1], command(g in [0, 1]), close()


class UR5:
    """UR5 through ur-rtde. `control=False` opens only the receive interface: the controller keeps
    running whatever the pendant runs and this process cannot command motion (used by --dry-run
    and by teleoperated recording)."""

    def __init__(self, cfg: RobotConfig, control=True):
        import rtde_receive

        self.cfg = cfg
        self.receive = rtde_receive.RTDEReceiveInterface(cfg.host)
        self.control = None
        if control:
            import rtde_control
            self.control = rtde_control.RTDEControlInterface(cfg.host)  # uploads the control script

    def tcp_pose(self):
        return np.asarray(self.receive.getActualTCPPose(), np.float64)

    def servo(self, pose, period):
        # servoL(pose, speed, acceleration, time, lookahead_time, gain); speed and acceleration
        # are unused by servoL. `time` = the control period: the controller interpolates over it.
        ok = self.control.servoL(list(map(float, pose)), 0.0, 0.0, period,
                                 self.cfg.servo_lookahead_s, self.cfg.servo_gain)
        if ok is False:
            raise SafetyStop("servoL rejected by the controller (protective stop or script stopped?)")

    def move_to(self, pose, speed=0.1, acceleration=0.3):
        self.control.moveL(list(map(float, pose)), speed, acceleration)

    def stop(self):
        if self.control is None:
            return
        try:
            if self.control.servoStop(self.cfg.stop_decel) is not False:
                return
        except Exception:
            pass
        self.control.stopL(self.cfg.stop_decel)  # fallback when servoStop fails

    def teach(self, on):
        (self.control.teachMode if on else self.control.endTeachMode)()

    def close(self):
        if self.control is not None:
            self.control.stopScript()
            self.control.disconnect()
        self.receive.disconnect()


class RobotiqGripper:
    """Robotiq 2F gripper through the URCap socket (port 63352): ASCII lines 'SET <VAR> <int>'
    (answer 'ack') and 'GET <VAR>' (answer '<VAR> <int>'); POS 0 = open, 255 = closed.
    `activate=False` (dry-run, teleoperated recording) only reads: activating an inactive
    gripper makes it open and close fully, which is motion. Only the protocol is tested here
    (against a local fake server); kept small on purpose."""

    def __init__(self, host, port=63352, activate=True, speed=255, force=100, timeout=1.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.replies = self.sock.makefile("r")
        self.active, self._last = activate, None
        if activate:
            self._send("SET ACT 1")  # a no-op if already active
            self._send(f"SET SPE {speed}")
            self._send(f"SET FOR {force}")
            self._send("SET GTO 1")

    def _send(self, line):
        self.sock.sendall((line + "\n").encode())
        reply = self.replies.readline().strip()
        if line.startswith("SET") and reply != "ack":
            raise RuntimeError(f"gripper: '{line}' answered {reply!r}, expected 'ack'")
        return reply

    def position(self):
        var, value = self._send("GET POS").split()
        return int(value) / 255.0

    def command(self, g):
        if not self.active:
            raise RuntimeError("gripper opened read-only (activate=False): no commands")
        pos = int(round(float(np.clip(g, 0.0, 1.0)) * 255))
        if pos != self._last:  # one socket round trip per change, not per tick
            self._send(f"SET POS {pos}")
            self._last = pos

    def close(self):
        self.replies.close()
        self.sock.close()


class NullGripper:
    """No gripper (or one driven elsewhere): reads as open, ignores commands."""

    def position(self):
        return 0.0

    def command(self, g):
        pass

    def close(self):
        pass


@dataclass
class Hardware:
    robot: object  # None when recording human demonstrations
    gripper: object
    cameras: dict  # name -> camera with read() -> Frame

    def close(self):
        """Close everything; one failing device does not keep the others open."""
        for device in [self.robot, self.gripper, *self.cameras.values()]:
            if device is None:
                continue
            try:
                device.close()
            except Exception as e:
                print(f"WARNING: closing {type(device).__name__} failed: {e}", file=sys.stderr)


def open_hardware(cfg: Config, *, robot="control"):
    """robot: "control" (commands motion), "read" (receive only: --dry-run, teleop recording),
    or None (no robot: human demonstrations)."""
    opened = {}
    try:
        opened["cameras"] = {}
        for c in cfg.cameras:
            opener = open_realsense_camera if c.kind == "realsense" else open_opencv_camera
            opened["cameras"][c.name] = opener(c)
        opened["robot"] = UR5(cfg.robot, control=robot == "control") if robot else None
        if robot and cfg.gripper.kind == "robotiq":
            opened["gripper"] = RobotiqGripper(cfg.gripper.host, cfg.gripper.port,
                                               activate=robot == "control")
        else:
            opened["gripper"] = NullGripper() if robot else None
    except BaseException:
        Hardware(opened.get("robot"), opened.get("gripper"), opened.get("cameras", {})).close()
        raise
    return Hardware(opened["robot"], opened["gripper"], opened["cameras"])


# -----------------------------------------------------------------------------
# Observation and action layout


def proprio_from(pose, grip, layout):
    """Measured TCP pose (6,) + gripper -> proprio in the action layout (float32)."""
    parts = [pose[:3]] + ([pose[3:6]] if layout == "xyz_rotvec_gripper" else []) + [[grip]]
    return np.concatenate(parts).astype(np.float32)


def target_from(action, hold_rotvec, layout):
    """Policy action (A,) in data units -> (pose (6,), gripper). `xyz_gripper` holds orientation."""
    action = np.asarray(action, np.float64).reshape(-1)
    if action.shape[0] != ACTION_LAYOUTS[layout]:
        raise SafetyStop(f"policy action has {action.shape[0]} dims, expected "
                         f"{ACTION_LAYOUTS[layout]} for control.action = '{layout}'")
    rot = action[3:6] if layout == "xyz_rotvec_gripper" else hold_rotvec
    return np.concatenate([action[:3], rot]), float(action[-1])


# -----------------------------------------------------------------------------
# Control loop


def check_policy(policy, cfg: Config):
    """The checkpoint must match the config: views, action and proprio layouts."""
    names = [c.name for c in cfg.cameras]
    missing = [v for v in policy.views if v not in names]
    if missing:
        raise ConfigError(f"config error: cameras: expected views {list(policy.views)} (from the "
                          f"policy), found {names}")
    A = ACTION_LAYOUTS[cfg.control.action]
    for attr in ("action_dim", "proprio_dim"):
        value = getattr(policy, attr, None)
        if value is not None and value != A:
            raise ConfigError(f"config error: control.action: '{cfg.control.action}' has {A} dims, "
                              f"the policy's {attr} is {value}")


@dataclass
class EpisodeResult:
    steps: int
    log: list  # one dict per step


def run_episode(policy, hw: Hardware, cfg: Config, task, *, clock=None, dry_run=False,
                on_step=None, max_steps=None, should_end=None):
    """One episode: cameras -> policy -> safety filter -> servoL, at cfg.control.rate_hz.

    Whatever ends the episode (time limit, exception, Ctrl-C, SafetyStop), the arm is stopped
    before this returns or raises. In dry-run the robot was opened read-only: no servo, no
    gripper command. `on_step(entry)` receives each step's log entry as it happens;
    `should_end()`, polled every tick, ends the episode early (the CLI: the operator pressed Enter).
    """
    clock = clock or MonotonicClock()
    ctl, layout = cfg.control, cfg.control.action
    cams = [next(c for c in cfg.cameras if c.name == v) for v in policy.views]  # policy's order
    size = tuple(policy.img_size)
    safety = SafetyFilter(cfg.safety)
    n_steps = max_steps or int(round(ctl.episode_s * ctl.rate_hz))
    log = []
    robot, gripper = hw.robot, hw.gripper
    finished = False
    try:
        if cfg.robot.home is not None and not dry_run:
            robot.move_to(cfg.robot.home)
        start = robot.tcp_pose()
        if not safety.inside(start[:3]):
            raise SafetyStop(f"start position {np.round(start[:3], 4).tolist()} is outside the "
                             f"workspace {cfg.safety.workspace_min}..{cfg.safety.workspace_max}")
        prev, hold_rot = start.copy(), start[3:6].copy()

        # warm-up call outside the timed loop: the first call pays for CUDA init and allocation
        images = read_views(hw.cameras, cams, size, clock.now(), ctl.max_frame_age_s)
        policy.act(images, proprio_from(start, gripper.position(), layout), task)
        policy.reset()

        rate, overruns = Rate(ctl.rate_hz, clock), 0
        for step in range(n_steps):
            t0 = clock.now()
            images = read_views(hw.cameras, cams, size, t0, ctl.max_frame_age_s)
            pose = robot.tcp_pose()
            proprio = proprio_from(pose, gripper.position(), layout)
            t1 = clock.now()
            action = policy.act(images, proprio, task)
            t2 = clock.now()
            target, grip = target_from(action, hold_rot, layout)
            target, event = safety.apply(target, prev)
            grip = min(max(grip, 0.0), 1.0)
            if not dry_run:
                robot.servo(target, cfg.period)
                gripper.command(grip)
            prev = target
            t3 = clock.now()
            entry = {"step": step, "t": round(t0 - rate.start, 5), "obs_ms": round(1e3 * (t1 - t0), 3),
                     "policy_ms": round(1e3 * (t2 - t1), 3), "latency_ms": round(1e3 * (t3 - t0), 3),
                     "event": event, "target": np.round(target, 5).tolist(), "gripper": round(grip, 4)}
            late = rate.sleep()
            entry["late_ms"] = round(1e3 * late, 3)
            log.append(entry)
            if on_step:
                on_step(entry)
            overruns = overruns + 1 if late > 0 else 0
            if overruns >= ctl.max_consecutive_overruns:
                raise OverrunBudget(f"{overruns} consecutive overruns of the {1e3 * cfg.period:.0f} ms "
                                    f"period (last latency {entry['latency_ms']:.1f} ms; "
                                    f"control.max_consecutive_overruns)")
            if should_end is not None and should_end():
                break
        finished = True
    finally:
        # every exit path (time limit, exception, Ctrl-C, SafetyStop) stops the arm; on a normal
        # end too, so servo mode is left decelerating rather than mid-motion. Read-only (dry-run)
        # robots ignore it.
        try:
            robot.stop()
        except Exception as e:
            print(f"WARNING: stopping the robot failed: {type(e).__name__}: {e}", file=sys.stderr)
            if finished:  # otherwise the exception in flight is the one to report
                raise
    return EpisodeResult(len(log), log)


def latency_summary(log, period):
    """Human-readable figures of one episode's log."""
    if not log:
        return "no steps"
    lat = np.array([e["latency_ms"] for e in log])
    t = np.array([e["t"] for e in log])
    periods = np.diff(t) * 1e3 if len(t) > 1 else np.array([period * 1e3])
    overruns = sum(e["late_ms"] > 0 for e in log)
    events = {k: sum(e["event"] == k for e in log) for k in ("clamped", "refused")}
    return (f"steps {len(log)} | latency ms p50 {np.percentile(lat, 50):.1f} "
            f"p99 {np.percentile(lat, 99):.1f} max {lat.max():.1f} | "
            f"period ms mean {periods.mean():.2f} std {periods.std():.2f} "
            f"(target {1e3 * period:.1f}) | overruns {overruns} | "
            f"clamped {events['clamped']} refused {events['refused']}")


# -----------------------------------------------------------------------------
# Recording demonstrations


def record_episode(hw: Hardware, cfg: Config, *, with_actions=True, clock=None, should_end=None):
    """Record one demonstration at the control rate; the arm is moved by a person (freedrive) or a
    teleoperation program, never by this function.

    Returns a dict for preprocess.episodes_to_dataset: `images` uint8 (F, V, H, W, 3) in the
    config's camera order, and with a robot `proprio` (F, P) and `actions` (F, A) float32.
    The action at frame t is the measured pose (and gripper) at frame t+1 in the action layout,
    i.e. the absolute target the policy will learn to command; the last frame repeats its own
    pose (a "stay" action). Without actions (human demonstrations) the robot is not read at all.
    """
    clock = clock or MonotonicClock()
    ctl, layout = cfg.control, cfg.control.action
    size = tuple(cfg.record.img_size)
    n_steps = int(round(ctl.episode_s * ctl.rate_hz))
    images, proprio = [], []
    rate, overruns = Rate(ctl.rate_hz, clock), 0
    for _ in range(n_steps):
        images.append(read_views(hw.cameras, cfg.cameras, size, clock.now(), ctl.max_frame_age_s))
        if with_actions:
            proprio.append(proprio_from(hw.robot.tcp_pose(), hw.gripper.position(), layout))
        late = rate.sleep()
        overruns = overruns + 1 if late > 0 else 0
        if overruns >= ctl.max_consecutive_overruns:  # the time base of the demonstration is broken
            raise OverrunBudget(f"{overruns} consecutive overruns while recording")
        if should_end is not None and should_end():
            break
    episode = {"images": np.stack(images)}
    if with_actions:
        p = np.stack(proprio)
        episode["proprio"] = p
        episode["actions"] = np.concatenate([p[1:], p[-1:]]).astype(np.float32)
    return episode


def record(hw: Hardware, cfg: Config, out, task, *, episodes, with_actions=True, tracker="auto",
           clock=None, wait_start=None, should_end=None, kinesthetic=False):
    """Record `episodes` demonstrations and write them as an AMPLIFY dataset at `out`.

    wait_start(i): called before episode i (the CLI waits for Enter); should_end(): polled every
    tick (the CLI: Enter pressed). Ctrl-C discards the episode in progress (usually a botched
    demonstration) and writes the ones completed.
    """
    import preprocess

    recorded, stop = [], None
    try:
        if kinesthetic:
            hw.robot.teach(True)
        for i in range(episodes):
            if wait_start is not None:
                wait_start(i)
            ep = record_episode(hw, cfg, with_actions=with_actions, clock=clock, should_end=should_end)
            ep["task"] = task
            recorded.append(ep)
            print(f"episode {i}: {len(ep['images'])} frames", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"interrupted: discarding the episode in progress, keeping {len(recorded)}",
              file=sys.stderr)
    except SafetyStop as e:  # a camera died mid-episode: keep what was complete, then report it
        print(f"stopped: {e}; discarding the episode in progress, keeping {len(recorded)}",
              file=sys.stderr)
        stop = e
    finally:
        if kinesthetic:
            hw.robot.teach(False)
    if not recorded:
        raise stop or SafetyStop("no complete episode recorded; nothing written")
    summary = preprocess.episodes_to_dataset(
        recorded, out, views=[c.name for c in cfg.cameras], fps=cfg.control.rate_hz,
        source="real_robot" if with_actions else "real_human", tracker=tracker, progress=False)
    if stop is not None:
        raise stop
    return summary


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description="Run an AMPLIFY policy on a UR5, or record demonstrations.")
    p.add_argument("--config", required=True, help="JSON config (see real_robot.example.json)")
    p.add_argument("--task", default=None, help="task text (default: the config's 'task')")
    p.add_argument("--episodes", type=int, default=1,
                   help="episodes to run or record, each control.episode_s long (Enter ends one early)")
    # running a policy
    p.add_argument("--policy", help="policy checkpoint (DIR/policy.pt from amplify.py --stage all)")
    p.add_argument("--dry-run", action="store_true",
                   help="everything but motion: robot opened read-only, no servoL, no gripper commands")
    p.add_argument("--device", default="auto", help="torch device for the policy: auto, cpu, cuda, cuda:1")
    p.add_argument("--log", help="append one JSON line per step (latency, target, safety events)")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per episode (bring-up)")
    # recording demonstrations
    p.add_argument("--record", metavar="OUT", help="record demonstrations into a dataset at OUT")
    p.add_argument("--no-actions", action="store_true",
                   help="with --record: human demonstrations, cameras only (no robot, no actions)")
    p.add_argument("--kinesthetic", action="store_true",
                   help="with --record: put the arm in freedrive (teach mode) while recording")
    p.add_argument("--tracker", default="auto", choices=["auto", "cotracker", "lk"],
                   help="with --record: point tracker of preprocess.py (auto: CoTracker when available)")
    return p


class EnterKey:
    """Enter presses on stdin, read by one daemon thread (a thread per wait would race for lines)."""

    def __init__(self):
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            self.lines.put(line)

    def wait(self, prompt):
        while not self.lines.empty():  # forget presses from before the prompt
            self.lines.get_nowait()
        print(prompt, file=sys.stderr, flush=True)
        self.lines.get()

    def pressed(self):
        try:
            self.lines.get_nowait()
            return True
        except queue.Empty:
            return False


def main(argv=None, *, hardware=None, policy=None, clock=None, interactive=True):
    """Entry point; returns the exit code. Tests inject `hardware` (a Hardware or a callable
    (cfg, robot_mode) -> Hardware), `policy` and `clock`."""
    args = build_parser().parse_args(argv)
    # args error checking
    try:
        cfg = load_config(args.config)
        task = args.task if args.task is not None else cfg.task
        if not task:
            raise ConfigError("config error: task: expected a task text (--task or the config's "
                              "'task'), found none")
        if args.record is None and args.policy is None and policy is None:
            raise ConfigError("argument error: expected --policy (run) or --record OUT, found neither")
        if args.record is not None and (args.policy or args.dry_run):
            raise ConfigError("argument error: --record: expected no --policy/--dry-run "
                              "(recording commands no motion), found them")
        if (args.no_actions or args.kinesthetic) and args.record is None:
            raise ConfigError("argument error: --no-actions/--kinesthetic: expected with --record, "
                              "found without")
        if args.no_actions and args.kinesthetic:
            raise ConfigError("argument error: expected --no-actions (human, no robot) or "
                              "--kinesthetic (robot in freedrive), found both")
        if args.episodes < 1:
            raise ConfigError(f"argument error: --episodes: expected >= 1, found {args.episodes}")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    if args.record is not None:
        mode = None if args.no_actions else ("control" if args.kinesthetic else "read")
    else:
        mode = "read" if args.dry_run else "control"
    hw = None
    log_file = open(args.log, "a") if args.log else None
    try:
        if policy is None and args.record is None:
            import amplify
            policy = amplify.load_policy(args.policy, args.device)
            print(f"policy {args.policy}: views {policy.views}, {policy.img_size[0]}x{policy.img_size[1]}, "
                  f"device {policy.device}", file=sys.stderr)
        if policy is not None and args.record is None:
            check_policy(policy, cfg)
        if hardware is None:
            hw = open_hardware(cfg, robot=mode)
        else:
            hw = hardware(cfg, mode) if callable(hardware) else hardware
        wait_for_cameras(hw.cameras, cfg.control.camera_timeout_s)

        # prompts only on a terminal; with stdin redirected, episodes follow back to back
        keys = EnterKey() if interactive and sys.stdin.isatty() else None
        if args.record is not None:
            def wait_start(i):
                if keys:
                    keys.wait(f"episode {i}: press Enter to start recording, Enter again to end it "
                              f"early (Ctrl-C: discard it and finish)")
            should_end = keys.pressed if keys else None
            summary = record(hw, cfg, args.record, task, episodes=args.episodes,
                             with_actions=not args.no_actions, tracker=args.tracker, clock=clock,
                             wait_start=wait_start, should_end=should_end, kinesthetic=args.kinesthetic)
            print(f"wrote {args.record}: {summary}", file=sys.stderr)
            return 0

        def on_step(entry):
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
        for ep in range(args.episodes):
            if keys:
                keys.wait(f"episode {ep}: reset the scene, press Enter to start, Enter again to end "
                          f"it early (Ctrl-C: stop)")
            policy.reset()
            result = run_episode(policy, hw, cfg, task, clock=clock, dry_run=args.dry_run,
                                 on_step=on_step, max_steps=args.max_steps,
                                 should_end=keys.pressed if keys else None)
            print(f"episode {ep}{' (dry run)' if args.dry_run else ''}: "
                  f"{latency_summary(result.log, cfg.period)}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): robot stopped", file=sys.stderr)
        return 130
    except (SafetyStop, ConfigError) as e:
        print(f"stopped: {e}" if isinstance(e, SafetyStop) else str(e), file=sys.stderr)
        return 1
    except Exception as e:  # hardware/driver errors: one line, the arm already stopped
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if log_file:
            log_file.close()
        if hw is not None and hardware is None:
            hw.close()


def _sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt  # a supervisor's kill stops the arm exactly like Ctrl-C


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    sys.exit(main())
