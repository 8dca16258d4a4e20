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
- Safety filter: a workspace box, an orientation cone around the home orientation and a maximum
  motion per tick, with targets clamped or refused (`safety.on_violation`). Limits are kinematic:
  at every tick the commanded speed and acceleration are within `max_step_*` and `max_accel` /
  `max_ang_accel` (soft start over `ramp_s`), and braking from there at the acceleration limit
  would stop inside the box and the cone, so the arm slows down before a wall instead of hitting
  it; a stop (servoStop at `robot.stop_decel` >= `safety.max_accel`) ends inside the box.
  Rotation vectors are kept continuous from robot.home's (UR's flip near a half turn never
  reaches the data or the policy). The policy is refused when its checkpoint's action statistics
  cannot be metres in this workspace and rotation vectors near home's.
- Checks a lab expects: the config's box is one a UR5 can work in (above its base, in reach,
  clear of the base axis); before an episode the controller's TCP offset and payload must be the
  config's, the joints clear of their limits and of singularities, and the controller's own
  check (isPoseWithinSafetyLimits) must accept every corner of the box; every tick the joints are
  checked again and each target is put to the controller before it is sent.
- Stops: an exception, Ctrl-C, SIGTERM/SIGHUP/SIGQUIT, a stale, frozen (same pixels) or lost
  camera frame, a non-finite action or reading, a stall (one tick 2 periods late; its command is
  not sent) or a high overrun rate, a lost connection or frozen RTDE data, a safety stop, a
  stopped control script, a lowered speed slider, a tracking error (position or orientation) or
  a joint near a limit or singularity stop the arm (servoStop, stopL as fallback) before the
  program exits; the RTDE watchdog stops it if this process dies. The hardware is closed before
  the log, so a full disk cannot keep the control script running. Homing is checked first (start
  inside the box and the cone, end at home), asynchronous and interruptible; the gripper is
  activated (a full stroke when inactive) only after the operator starts the episode, and its
  commands are rate-limited. `--dry-run` runs everything (cameras, policy, safety filter, log)
  but opens the robot read-only, so no motion can be commanded. Without a terminal, moving the
  arm needs `--yes`.
- `--record OUT`: teleoperated or kinesthetic (`--kinesthetic`, freedrive) demonstrations, or
  human demonstrations without a robot (`--no-actions`), each episode saved to OUT.episodes/ as
  it ends, then written into the AMPLIFY dataset format by `preprocess.episodes_to_dataset`.
  An earlier recording is refused unless `--append` or `--overwrite` (which replaces it only with
  a recording that no error cut short). The robot is checked every frame.
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
    python real_robot.py --config real_robot.json --record data/cup_robot --append \
        --task "put the cup on the plate" --episodes 0      # rebuild the dataset from OUT.episodes/

Units: positions in metres, orientations as rotation vectors in radians (the UR convention),
gripper in [0, 1] with 0 open and 1 closed. Action/proprio layouts (`control.action`):
`xyz_gripper` -> [x, y, z, g] (orientation held at its value at the episode start) and
`xyz_rotvec_gripper` -> [x, y, z, rx, ry, rz, g]. Proprio uses the same layout, measured, with
rotation vectors continuous from `robot.home`'s orientation (required with `xyz_rotvec_gripper`;
`xyz_gripper` refers to each episode's first reading, which it only holds).
"""
import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
# Config: a JSON file validated by pydantic into typed models. Unknown keys, duplicate keys and
# numbers outside their range are errors, not ignored or clipped: a typo in a safety key (say
# "max_stp_m") must not silently fall back to a default, and a gain of 5000 must not reach servoL.

ACTION_LAYOUTS = {"xyz_gripper": 4, "xyz_rotvec_gripper": 7}
# What a UR5 can do (its data sheet), used to bound the config. Conservative on purpose: a number
# beyond these is a typo or another robot, and the controller's own check (check_workspace) only
# runs with the arm connected.
MAX_TCP_SPEED = 1.0  # m/s: the UR5's rated tool speed; max_step_m * rate_hz above it is a typo
MAX_TCP_ANG_SPEED = math.pi  # rad/s (180 deg/s, the UR5's wrist joint limit)
UR5_REACH_M = 0.85  # from the shoulder axis; the box's corners must be within it
UR5_SHOULDER = (0.0, 0.0, 0.089)  # base frame: the shoulder joint, 89 mm above the mounting plane
BASE_KEEPOUT_M = 0.2  # the box stays this far from the base's vertical axis: the base and shoulder
# are there, and a wrist above the base axis is the shoulder singularity (joint speeds blow up)


def _num(lo=None, hi=None, *, gt=None):
    """A finite number in [lo, hi] (or (gt, hi]); ints are accepted, bools and strings are not."""
    return Annotated[float, Field(ge=lo, le=hi, gt=gt, allow_inf_nan=False)]


def _int(lo, hi):
    return Annotated[int, Field(ge=lo, le=hi)]


def _numbers(n, lo=None, hi=None):
    return Annotated[list[_num(lo, hi)], Field(min_length=n, max_length=n)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RobotConfig(_Section):
    host: str
    servo_lookahead_s: _num(0.03, 0.2) = 0.1  # servoL smoothing (UR range); more = smoother, laggier
    servo_gain: _num(100, 2000) = 300.0  # servoL proportional gain (UR range)
    stop_decel: _num(0.5, 10) = 2.0  # m/s^2 for servoStop/stopL; at least safety.max_accel (checked)
    home: Optional[_numbers(6, -2 * math.pi, 2 * math.pi)] = None  # [x, y, z, rx, ry, rz], reached with
    # moveL before each episode; its orientation is the reference of safety.max_rot_from_home_rad
    home_speed: _num(gt=0, hi=0.25) = 0.1  # m/s of the homing moveL
    tcp_offset: _numbers(6, -0.5, 0.5)  # [x, y, z, rx, ry, rz] flange -> tool point, as set in the
    # robot's installation: the box bounds the controller's TCP, so it is checked against this
    payload_kg: _num(0, 5)  # tool + gripper mass as set in the installation (UR5: 5 kg at most);
    # a wrong payload makes freedrive drift and protective stops misfire. Checked, not set


class GripperConfig(_Section):
    kind: Literal["robotiq", "none"] = "none"  # "robotiq": its URCap socket (port 63352)
    host: str = ""
    port: _int(1, 65535) = 63352
    speed: _int(0, 255) = 255  # Robotiq units: 255 is full speed (150 mm/s on a 2F-85)
    force: _int(0, 255) = 100  # Robotiq units: 255 is full grip force (235 N on a 2F-85)
    min_interval_s: _num(0.05, 5) = 0.25  # at most one new position command per this interval: a
    # policy that flips open/closed every tick would otherwise chatter the fingers


class CameraConfig(_Section):
    name: str  # view name; must match the policy's `views`
    kind: Literal["opencv", "realsense"]
    device: Union[int, str]  # OpenCV index (int) or path (str); RealSense serial (str)
    width: _int(1, 8192) = 640
    height: _int(1, 8192) = 480
    fps: _int(1, 1000) = 30
    crop: Optional[Annotated[list[_int(0, 8192)], Field(min_length=4, max_length=4)]] = None
    # [x, y, w, h] in pixels of the raw frame, applied before resizing
    rotate: Literal[0, 90, 180, 270] = 0  # degrees clockwise, for cameras mounted sideways/upside down

    @field_validator("device", mode="before")
    @classmethod
    def _int_or_str(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError("expected an int (OpenCV index) or a string (path, RealSense serial)")
        return v


class ControlConfig(_Section):
    rate_hz: _num(1, 500) = 20.0  # 500 Hz: the e-series controller's own rate
    episode_s: _num(gt=0, hi=3600) = 90.0
    action: Literal[tuple(ACTION_LAYOUTS)] = "xyz_gripper"
    max_frame_age_s: _num(gt=0, hi=2) = 0.2  # older frame at the time of use -> stop (a frozen camera)
    max_consecutive_overruns: _int(1, 100) = 5  # this many late ticks in a row -> stop
    max_late_periods: _num(0.5, 10) = 2.0  # one tick later than this many periods -> stop (a stall)
    overrun_window: _int(2, 10000) = 20  # ticks over which the overrun rate is measured
    max_overrun_fraction: _num(gt=0, hi=0.5) = 0.25  # more late ticks than this in the window -> stop
    # (1 would turn the check off)
    min_speed_scaling: _num(0.5, 1) = 0.9  # pendant speed slider below this -> stop (the arm lags;
    # 0 would turn the check off)
    camera_timeout_s: _num(gt=0, hi=120) = 5.0  # wait for the first frame of every camera at start-up


class SafetyConfig(_Section):
    workspace_min: _numbers(3, -UR5_REACH_M, UR5_REACH_M + UR5_SHOULDER[2])  # [x, y, z] metres,
    # robot base frame, z >= 0; within the UR5's reach and clear of its base (checked in parse_config)
    workspace_max: _numbers(3, -UR5_REACH_M, UR5_REACH_M + UR5_SHOULDER[2])
    max_step_m: _num(gt=0, hi=0.5) = 0.02  # per tick: 0.02 m at 20 Hz = 0.4 m/s
    max_step_rad: _num(gt=0, hi=1) = 0.1  # per tick, orientation (2 rad/s at 20 Hz)
    max_accel: _num(gt=0, hi=3) = 1.5  # m/s^2: limit on the change of the commanded velocity
    max_ang_accel: _num(gt=0, hi=10) = 4.0  # rad/s^2
    ramp_s: _num(0.25, 10) = 1.0  # speed limits rise linearly from 0 over the first ramp_s of an episode
    max_rot_from_home_rad: _num(0.05, math.pi / 2) = 0.8  # orientation cone around the reference
    # (robot.home's orientation, else the episode's start orientation); a quarter turn at most
    max_tracking_error_m: _num(gt=0, hi=0.15) = 0.08  # measured vs commanded position -> stop
    max_tracking_error_rad: _num(gt=0, hi=1.0) = 0.3  # measured vs commanded orientation -> stop
    # (servoL lags by about its lookahead: 0.1 s at the 2 rad/s limit is 0.2 rad)
    on_violation: Literal["clamp", "refuse"] = "clamp"  # see SafetyFilter


class RecordConfig(_Section):
    img_size: Annotated[list[_int(16, 1024)], Field(min_length=2, max_length=2)] = [128, 128]
    # [H, W] stored in the dataset


class Config(_Section):
    robot: RobotConfig
    gripper: GripperConfig = Field(default_factory=GripperConfig)
    cameras: Annotated[list[CameraConfig], Field(min_length=1)]  # the dataset's view order when recording
    control: ControlConfig = Field(default_factory=ControlConfig)
    safety: SafetyConfig
    record: RecordConfig = Field(default_factory=RecordConfig)
    task: str = ""  # default task text; --task overrides
    comment: str = ""

    @property
    def period(self):
        return 1.0 / self.control.rate_hz


def _typename(value):
    return {bool: "bool", int: "int", float: "number", str: "str", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _config_error(err):
    """One pydantic error -> 'config error: <key path>: expected ..., found ...'."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    kind, msg, value = err["type"], err["msg"], err["input"]
    if kind == "missing":
        return f"config error: missing key '{path}'"
    if kind == "extra_forbidden":
        return f"config error: {path.rsplit('.', 1)[0] or 'top level'}: unknown key '{err['loc'][-1]}'"
    bounds = {"too_short": ("a list of at least", "min_length", " items"),
              "too_long": ("a list of at most", "max_length", " items"),
              "greater_than_equal": ("a number >=", "ge", ""), "less_than_equal": ("a number <=", "le", ""),
              "greater_than": ("a number >", "gt", ""), "less_than": ("a number <", "lt", "")}
    if kind in bounds:
        words, key, unit = bounds[kind]
        msg = f"{words} {err['ctx'][key]}{unit}"
        if kind == "too_short" and err["ctx"][key] == 1:
            msg = "a non-empty list"
    expected = msg.removeprefix("Input should be ").removeprefix("Value error, ").removeprefix("expected ")
    found = json.dumps(value, default=str)[:40]
    return f"config error: {path or 'top level'}: expected {expected}, found {_typename(value)} ({found})"


def parse_config(raw):
    """Validate a config dict (parsed JSON) into a `Config`; raises ConfigError."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_config_error(e.errors()[0])) from None

    # cross-field checks: values that type-check but make no sense together
    robot, safety, control, cameras = cfg.robot, cfg.safety, cfg.control, cfg.cameras
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        raise ConfigError(f"config error: cameras: expected unique names, found {names}")
    lo, hi = np.array(safety.workspace_min), np.array(safety.workspace_max)
    if not np.all(lo < hi):
        raise ConfigError(f"config error: safety: expected workspace_min < workspace_max in every "
                          f"axis, found {safety.workspace_min} and {safety.workspace_max}")
    check_workspace_geometry(lo, hi)
    if control.action == "xyz_rotvec_gripper" and robot.home is None:
        raise ConfigError("config error: robot.home: expected a home pose with control.action "
                          "'xyz_rotvec_gripper' (its orientation is the one reference of the rotation "
                          "vectors in recordings, proprio and the orientation cone; per-episode "
                          "references came out at +pi and -pi), found none")
    if robot.stop_decel < safety.max_accel:  # the filter keeps the stop at max_accel inside the box
        raise ConfigError(f"config error: robot.stop_decel: expected at least safety.max_accel "
                          f"{safety.max_accel:g} m/s^2 (the safety filter brakes for the walls at "
                          f"max_accel; a gentler stop ends beyond them), found {robot.stop_decel:g}")
    speed, ang_speed = safety.max_step_m * control.rate_hz, safety.max_step_rad * control.rate_hz
    if speed > MAX_TCP_SPEED:
        raise ConfigError(f"config error: safety.max_step_m: expected at most {MAX_TCP_SPEED} m/s at "
                          f"control.rate_hz {control.rate_hz:g}, found {safety.max_step_m:g} m a tick "
                          f"= {speed:g} m/s")
    if ang_speed > MAX_TCP_ANG_SPEED:
        raise ConfigError(f"config error: safety.max_step_rad: expected at most {MAX_TCP_ANG_SPEED:.2f} "
                          f"rad/s at control.rate_hz {control.rate_hz:g}, found {safety.max_step_rad:g} "
                          f"rad a tick = {ang_speed:g} rad/s")
    home = None if robot.home is None else np.array(robot.home[:3])
    if home is not None and not (np.all(lo + HOME_TOL_M <= home) and np.all(home <= hi - HOME_TOL_M)):
        # homing ends within HOME_TOL_M of home, and the episode must start inside the box
        raise ConfigError(f"config error: robot.home: expected a position at least {1e3 * HOME_TOL_M:g} mm "
                          f"inside the workspace {safety.workspace_min}..{safety.workspace_max}, found "
                          f"{robot.home[:3]}")
    if cfg.gripper.kind == "robotiq" and not cfg.gripper.host:
        raise ConfigError("config error: gripper.host: expected a host name for kind 'robotiq', found ''")
    for c in cameras:
        if c.crop is not None and (c.crop[2] <= 0 or c.crop[3] <= 0):
            raise ConfigError(f"config error: cameras '{c.name}'.crop: expected positive w, h, "
                              f"found {c.crop}")
    return cfg


def check_workspace_geometry(lo, hi):
    """The box must be one a UR5 can work in: above its mounting plane, every corner within reach
    of the shoulder, and clear of the column above the base (see BASE_KEEPOUT_M). Raises ConfigError."""
    box = f"{np.round(lo, 4).tolist()}..{np.round(hi, 4).tolist()}"
    if lo[2] < 0:
        raise ConfigError(f"config error: safety.workspace_min: expected z >= 0 (above the robot's "
                          f"mounting plane), found {lo[2]:g} (box {box})")
    corners = np.array(np.meshgrid(*zip(lo, hi))).T.reshape(-1, 3)  # (8, 3)
    far = float(np.linalg.norm(corners - np.array(UR5_SHOULDER), axis=1).max())
    if far > UR5_REACH_M:
        raise ConfigError(f"config error: safety: expected every workspace corner within the UR5's "
                          f"reach {UR5_REACH_M} m of the shoulder, found one at {far:.3f} m (box {box})")
    near = float(np.linalg.norm(np.clip([0.0, 0.0], lo[:2], hi[:2])))  # box to the base axis
    if near < BASE_KEEPOUT_M:
        raise ConfigError(f"config error: safety: expected the workspace at least {BASE_KEEPOUT_M} m "
                          f"from the robot base's vertical axis (base, shoulder singularity), found "
                          f"{near:.3f} m (box {box})")


def _no_duplicate_keys(pairs):
    """json object_pairs_hook: plain json.load keeps the last of two equal keys, silently."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ConfigError(f"config error: duplicate key '{key}': expected each key once, found it twice")
        obj[key] = value
    return obj


def load_config(path):
    try:
        with open(path) as f:
            raw = json.load(f, object_pairs_hook=_no_duplicate_keys)
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

    def late(self):
        """How far past the current tick's deadline the clock is now (negative: in time)."""
        return self.clock.now() - (self.start + (self.k + 1) * self.period)


class OverrunMonitor:
    """Stops a loop whose time base is broken: one tick later than `max_late_periods` periods (a
    stall), `max_consecutive_overruns` late ticks in a row, or more than `max_overrun_fraction`
    of the last `overrun_window` ticks late (alternating slow and fast ticks never overrun twice
    in a row, yet miss half their deadlines)."""

    def __init__(self, ctl: ControlConfig, period, what="the control loop"):
        self.ctl, self.period, self.what = ctl, period, what
        self.consecutive = 0
        self.window = deque(maxlen=ctl.overrun_window)

    def check_stall(self, late, when="ended"):
        """Called at the end of a tick, and before a command goes out: a command computed from
        observations older than the stall limit must not be sent at all."""
        ctl, ms = self.ctl, 1e3 * self.period
        if late > ctl.max_late_periods * self.period:
            raise OverrunBudget(f"{self.what} stalled: a tick {when} {1e3 * late:.0f} ms late, more than "
                                f"{ctl.max_late_periods:g} periods of {ms:.0f} ms (control.max_late_periods)")

    def update(self, late):
        ctl, ms = self.ctl, 1e3 * self.period
        self.check_stall(late)
        self.consecutive = self.consecutive + 1 if late > 0 else 0
        if self.consecutive >= ctl.max_consecutive_overruns:
            raise OverrunBudget(f"{self.consecutive} consecutive overruns of the {ms:.0f} ms period in "
                                f"{self.what} (control.max_consecutive_overruns)")
        self.window.append(late > 0)
        n = sum(self.window)
        if n > ctl.max_overrun_fraction * ctl.overrun_window:
            raise OverrunBudget(f"{n} of the last {len(self.window)} ticks of {self.what} overran the "
                                f"{ms:.0f} ms period (control.max_overrun_fraction "
                                f"{ctl.max_overrun_fraction:g} of {ctl.overrun_window})")


# -----------------------------------------------------------------------------
# Rotations. UR reports orientations as rotation vectors with angles in [0, pi]. Near pi (a gripper
# pointing straight down, the usual home) the reported vector jumps between about v and -v from one
# reading to the next although the wrist barely moves; recorded as is, such data averages to the
# identity rotation, half a turn away. So every measured rotation vector is re-expressed as the
# equivalent vector nearest to the previous one, starting from a fixed reference (robot.home).


def rotvec_near(rotvec, ref):
    """The rotation vector of the same rotation as `rotvec` that is nearest to `ref`."""
    rotvec, ref = np.asarray(rotvec, np.float64), np.asarray(ref, np.float64)
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-12:  # the identity is axis * 2 pi k for any axis: take ref's
        n = float(np.linalg.norm(ref))
        if n < 1e-12:
            return rotvec.copy()
        axis, angle = ref / n, 0.0
    else:
        axis = rotvec / angle
    # the same rotation: axis * (angle + 2 pi k) for any integer k; pick the k nearest to ref
    k = round((float(axis @ ref) - angle) / (2 * math.pi))
    return axis * (angle + 2 * math.pi * k)


def rotation_angle(a, b):
    """Angle (rad) of the rotation between the orientations of rotation vectors a and b."""
    from scipy.spatial.transform import Rotation

    return float((Rotation.from_rotvec(a) * Rotation.from_rotvec(b).inv()).magnitude())


# -----------------------------------------------------------------------------
# Safety filter. Limits are kinematic facts: at every tick the commanded velocity (per tick,
# measured between commands) is within the speed limit, its change within the acceleration
# limit, and the motion can still stop inside the limits. The last one is what lets the box and
# the cone hold at their walls: a command that reaches a wall at speed would have to stop there
# in one tick (the review measured 6 m/s^2 against 1.5 at the box, 24 rad/s^2 against 4 at the
# cone). So every tick asks where the arm would stop if it braked from here along its current
# direction at the acceleration limit, and keeps that stop point inside the box and the cone.
# Braking along a straight line (a fixed rotation axis) stays on the segment (the geodesic) from
# here to the stop point, inside a convex set when both ends are; and braking is always possible,
# since slowing the previous velocity by one tick's worth keeps its stop point. A stop by the
# controller (servoStop at robot.stop_decel >= safety.max_accel, checked in the config) ends
# before that stop point: the arm stops inside.


def _stop_distance(v, a):
    """Distance covered from per-tick speed v when the speed then drops by a every tick to zero:
    v + (v - a) + (v - 2a) + ... (never less than the continuous v^2 / 2a)."""
    if v <= 0:
        return 0.0
    k = math.floor(v / a)  # ticks after this one with some speed left
    return (k + 1) * v - a * k * (k + 1) / 2


def _brake_speed(d, a):
    """The largest per-tick speed from which braking by a per tick covers at most d: the inverse
    of _stop_distance (piecewise linear between the multiples of a)."""
    if d <= 0:
        return 0.0
    k = math.floor((math.sqrt(1 + 8 * d / a) - 1) / 2)  # a k (k + 1) / 2 <= d
    return d / (k + 1) + a * k / 2


def _cap(v, vmax):
    n = float(np.linalg.norm(v))
    return v * (vmax / n) if n > vmax else v


def _shape_motion(desired, vel, vmax, dmax, goal_vel):
    """One tick's motion towards `desired` (the displacement to the goal) given last tick's `vel`
    and the goal's own motion per tick `goal_vel`: at most `vmax` per tick, changing by at most
    `dmax` per tick (acceleration), and closing in on the goal no faster than it can still match
    the goal's motion at that deceleration, so it neither overshoots a goal that stands still nor
    lags behind one that moves smoothly."""
    closing = desired - goal_vel  # reaching the goal this tick, beyond following its motion
    n, cap = float(np.linalg.norm(closing)), _brake_speed(float(np.linalg.norm(desired)), dmax)
    want = desired if n <= cap else goal_vel + closing * (cap / n)
    change = want - vel
    n = float(np.linalg.norm(change))
    if n > dmax:
        change = change * (dmax / n)
    return _cap(vel + change, vmax)


def _stoppable(v, vel, dmax, stops_inside, iterations=24):
    """`v` if the motion can still stop inside the limits after it (`stops_inside(v)`), else the
    velocity nearest to it on the segment from braking (`vel` slowed by `dmax` along its own
    direction, which stops where `vel` would have: inside) to `v` that still can. Both ends are
    within `dmax` of `vel` and within the speed limit, so every point between them is too."""
    if stops_inside(v):
        return v
    n = float(np.linalg.norm(vel))
    brake = vel * max(0.0, 1.0 - dmax / n) if n > 0 else np.zeros(3)
    lo, hi = 0.0, 1.0  # bisection: lo always feasible (brake), hi not (v)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if stops_inside(brake + mid * (v - brake)):
            lo = mid
        else:
            hi = mid
    return brake + lo * (v - brake)


class SafetyFilter:
    """Turns the policy's targets into commands that stay in the workspace and move smoothly.

    Where the arm may go: inside the workspace box, with an orientation within
    `max_rot_from_home_rad` of the reference (robot.home's orientation, else the episode start).
    A target outside those limits, or farther than one tick's `max_step_m` / `max_step_rad` from
    the previous command, is a violation:
      on_violation = "clamp": the target is clipped into the box and the orientation cone; the arm
        keeps moving towards it at bounded speed. Logged as "clamped".
      on_violation = "refuse": the target is not executed; the arm comes to rest at the previous
        command (and moves again as soon as the policy proposes a reachable target). Stricter: a
        policy that drifts out of range freezes the arm. Logged as "refused".
    How it gets there, for every target: the velocity (per tick, measured between commands, not
    from the measured pose, which lags behind servoL targets) changes by at most `max_accel` /
    `max_ang_accel`, the speed limits rise from zero over the first `ramp_s` of the episode (soft
    start), the arm slows down in time to stop at the target rather than overshoot it, and in time
    to stop at a wall of the box or the edge of the cone rather than hit it (see the section
    comment). A policy that alternates directions every tick gets a gentle wobble, not full-speed
    reversals. A non-finite target stops the arm (SafetyStop); so does a start outside the limits.
    """

    def __init__(self, cfg: SafetyConfig, period, start, reference_rotvec=None):
        from scipy.spatial.transform import Rotation

        self.lo = np.asarray(cfg.workspace_min, np.float64)
        self.hi = np.asarray(cfg.workspace_max, np.float64)
        self.mode = cfg.on_violation
        self.max_step, self.max_rad = cfg.max_step_m, cfg.max_step_rad
        self.max_dstep = cfg.max_accel * period ** 2  # change of the per-tick step, per tick
        self.max_drad = cfg.max_ang_accel * period ** 2
        self.ramp_ticks = cfg.ramp_s / period
        self.max_cone = cfg.max_rot_from_home_rad
        self.prev = np.asarray(start, np.float64).copy()  # the previous command
        ref = self.prev[3:] if reference_rotvec is None else np.asarray(reference_rotvec, np.float64)
        self.ref = Rotation.from_rotvec(ref)
        self.vel, self.ang_vel = np.zeros(3), np.zeros(3)  # per tick: m, rotation vector
        self.goal = None  # the previous goal (position, Rotation): how fast the goal itself moves
        self.ticks = 0
        cone = self.cone_angle(Rotation.from_rotvec(self.prev[3:]))
        if not self.inside(self.prev[:3]) or cone > self.max_cone + 1e-9:
            raise SafetyStop(f"start pose {np.round(self.prev, 4).tolist()} is outside the limits "
                             f"(workspace {self.lo.tolist()}..{self.hi.tolist()}, {cone:.3f} rad from the "
                             f"reference orientation, max {self.max_cone:g})")

    def inside(self, pos, eps=0.0):
        return bool(np.all(self.lo - eps <= pos) and np.all(pos <= self.hi + eps))

    def cone_angle(self, rot):
        """Angle (rad) between the orientation `rot` (a Rotation) and the reference."""
        return float((rot * self.ref.inv()).magnitude())

    def _into_cone(self, rot):
        """rot (a Rotation) limited to the cone around the reference; (rotation, was it limited)."""
        from scipy.spatial.transform import Rotation

        delta = (rot * self.ref.inv()).as_rotvec()
        angle = float(np.linalg.norm(delta))
        if angle <= self.max_cone + 1e-9:
            return rot, False
        return Rotation.from_rotvec(delta * (self.max_cone / angle)) * self.ref, True

    def stop_point(self, pos, vel):
        """Where braking at max_accel from `pos` at per-tick velocity `vel` ends."""
        n = float(np.linalg.norm(vel))
        return pos if n == 0 else pos + vel * (_stop_distance(n, self.max_dstep) / n)

    def stop_rotation(self, rot, ang_vel):
        """Where braking at max_ang_accel about the fixed axis of `ang_vel` ends (a Rotation), and
        the angle turned on the way."""
        from scipy.spatial.transform import Rotation

        n = float(np.linalg.norm(ang_vel))
        turn = _stop_distance(n, self.max_drad)
        return (rot if n == 0 else Rotation.from_rotvec(ang_vel * (turn / n)) * rot), turn

    def apply(self, target):
        """target: pose (6,) [x, y, z, rx, ry, rz]. Returns (command pose (6,), event or None)."""
        from scipy.spatial.transform import Rotation

        target = np.asarray(target, np.float64)
        if target.shape != (6,) or not np.all(np.isfinite(target)):
            raise SafetyStop(f"expected a finite pose (6,) as target, found {target.tolist()}")
        prev = self.prev
        r_prev, r_target = Rotation.from_rotvec(prev[3:]), Rotation.from_rotvec(target[3:])

        # where: the box, the orientation cone, one tick's reach
        pos = np.clip(target[:3], self.lo, self.hi)
        rot, coned = self._into_cone(r_target)
        eps = 1e-9
        violation = (not np.array_equal(pos, target[:3]) or coned
                     or np.linalg.norm(target[:3] - prev[:3]) > self.max_step + eps
                     or (r_target * r_prev.inv()).magnitude() > self.max_rad + eps)
        event = None
        if violation and self.mode == "refuse":
            pos, rot, event = prev[:3], r_prev, "refused"
        elif violation:
            event = "clamped"

        # how: speed (ramped in), acceleration, braking for the goal, then for the walls
        self.ticks += 1
        ramp = min(1.0, self.ticks / self.ramp_ticks) if self.ramp_ticks > 0 else 1.0
        vmax, wmax = self.max_step * ramp, self.max_rad * ramp
        goal_vel, goal_ang = np.zeros(3), np.zeros(3)
        if self.goal is not None and event != "refused":
            goal_vel = _cap(pos - self.goal[0], vmax)
            goal_ang = _cap((rot * self.goal[1].inv()).as_rotvec(), wmax)
        self.goal = None if event == "refused" else (pos, rot)  # a hold is no motion of the goal
        step = _shape_motion(pos - prev[:3], self.vel, vmax, self.max_dstep, goal_vel)
        step = _stoppable(step, self.vel, self.max_dstep,
                          lambda v: self.inside(self.stop_point(prev[:3] + v, v), eps))
        turn = _shape_motion((rot * r_prev.inv()).as_rotvec(), self.ang_vel, wmax, self.max_drad,
                             goal_ang)

        def turn_stops_in_cone(w):
            stop, angle = self.stop_rotation(Rotation.from_rotvec(w) * r_prev, w)
            # a turn of pi or more is not the shortest way between its ends: no convexity argument
            return angle + float(np.linalg.norm(w)) < math.pi and self.cone_angle(stop) <= self.max_cone + eps
        turn = _stoppable(turn, self.ang_vel, self.max_drad, turn_stops_in_cone)
        # the clip and the cone only undo rounding now: the stop points are inside
        new_pos = np.clip(prev[:3] + step, self.lo, self.hi)
        new_rot, _ = self._into_cone(Rotation.from_rotvec(turn) * r_prev)
        self.vel = new_pos - prev[:3]
        self.ang_vel = (new_rot * r_prev.inv()).as_rotvec()
        self.prev = np.concatenate([new_pos, rotvec_near(new_rot.as_rotvec(), prev[3:])])
        return self.prev.copy(), event


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


class Views:
    """The newest frame of every camera as uint8 (V, H, W, 3) in `cam_cfgs` order, checked for age
    and for frozen pixels: a driver or buffer that is stuck can keep delivering the same image with
    fresh timestamps (the review ran 100 steps on one picture while the arm moved 0.25 m). A live
    sensor never gives two bit-identical frames (noise), so the same pixels for longer than
    `max_age` stop the arm like a stale frame; a black frame (lens cap) is frozen too."""

    def __init__(self, cameras, cam_cfgs, size, max_age):
        self.cameras, self.cam_cfgs, self.size, self.max_age = cameras, cam_cfgs, size, max_age
        self.changed = {}  # camera name -> (a copy of its last pixels, when they first arrived)

    def read(self, now):
        views = []
        for cam_cfg in self.cam_cfgs:
            name = cam_cfg.name
            frame = self.cameras[name].read()
            if frame is None:
                raise CameraLost(f"camera '{name}' returned no frame")
            age = now - frame.stamp
            if age > self.max_age:
                raise StaleFrame(f"stale frame from camera '{name}': age {age:.3f} s > max "
                                 f"{self.max_age:.3f} s (control.max_frame_age_s)")
            last = self.changed.get(name)
            if last is None or not np.array_equal(last[0], frame.image):
                self.changed[name] = (frame.image.copy(), frame.stamp)
            elif now - last[1] > self.max_age:
                raise StaleFrame(f"frozen camera '{name}': the same pixels for {now - last[1]:.3f} s > "
                                 f"max {self.max_age:.3f} s (control.max_frame_age_s) although its "
                                 f"frames are fresh: a stuck driver or buffer, or a covered lens")
            views.append(prepare_image(frame.image, cam_cfg, self.size))
        return np.stack(views)


def wait_for_cameras(cameras, timeout, idle=None):
    """Start-up: wait (real time) until every camera has delivered a frame; `idle()` is called
    while waiting (the robot's watchdog kick)."""
    deadline = time.monotonic() + timeout
    for cam in cameras.values():
        while True:
            try:
                cam.read()
                break
            except CameraLost:
                if time.monotonic() > deadline:
                    raise
                if idle is not None:
                    idle()
                time.sleep(0.01)


# -----------------------------------------------------------------------------
# Robot and gripper drivers. Interface used by the loop (tests inject fakes with the same methods):
#   robot: tcp_pose() -> (6,), joints() -> (6,), servo(pose (6,), period), move_to(pose, speed,
#          timeout), stop(), status() -> RobotStatus, kick() (the watchdog), teach(on), close(),
#          tcp_offset() -> (6,) or None, payload() -> kg, pose_allowed(pose) -> bool or None (the
#          controller's own check; None: opened read-only, it cannot be asked)
#   gripper: activate(idle) (may move the fingers), position() -> [0, 1], command(g in [0, 1]), close()

UR5_JOINT_LIMIT = 2 * math.pi  # rad, every joint of a UR5
JOINT_LIMIT_MARGIN = 0.1  # rad kept from the joint limits (a wound-up wrist ends in a protective stop)
SINGULARITY_MARGIN = 0.15  # rad: the elbow (q3) and wrist 2 (q5) are kept this far from 0 and pi,
# where the joint speeds a tool speed needs grow as 1 / sin(q) (6.7x at the margin). The shoulder
# singularity (wrist above the base axis) is kept out by the workspace (BASE_KEEPOUT_M)
TCP_TOL_M, TCP_TOL_RAD, PAYLOAD_TOL_KG = 0.001, 0.01, 0.1  # controller vs config
UR_SAFETY_MODES_OK = (1, 2)  # RTDE safety_mode: 1 normal, 2 reduced; 3 protective stop, 5 safeguard
# stop, 6/7 emergency stop, 8 violation, 9 fault, ...
HOME_ACCEL = 0.3  # m/s^2 of the homing moveL
HOME_TOL_M, HOME_TOL_RAD = 0.005, 0.02  # homing must end this close to robot.home


@dataclass
class RobotStatus:
    connected: bool
    program_running: Optional[bool]  # the control script; None when opened read-only
    protective_stop: bool
    emergency_stop: bool
    safety_mode: int  # see UR_SAFETY_MODES_OK
    speed_scaling: float  # the pendant's speed slider times any slowing by the controller, [0, 1]
    timestamp: Optional[float] = None  # controller time (s) of the RTDE data; None: not reported


def check_status(status: RobotStatus, ctl: ControlConfig, commanding=True, previous=None):
    """Raise SafetyStop unless the robot can (keep) moving under our commands; with `previous`
    (last tick's status), also unless its data are newer than last tick's: an RTDE receive that
    stalled keeps answering with the last pose it had (a recording saved 30 frames of one pose)."""
    if not status.connected:
        raise SafetyStop("robot connection lost (RTDE)")
    stamps = (getattr(previous, "timestamp", None), status.timestamp)
    if None not in stamps and stamps[1] <= stamps[0]:
        raise SafetyStop(f"robot data frozen: the controller's timestamp {stamps[1]:.3f} s has not "
                         f"advanced since the last tick (RTDE receive stalled; the pose is stale)")
    if not commanding:  # read-only: nothing this process does can move the arm
        return
    if status.emergency_stop or status.protective_stop or status.safety_mode not in UR_SAFETY_MODES_OK:
        raise SafetyStop(f"robot in a safety stop (protective {status.protective_stop}, emergency "
                         f"{status.emergency_stop}, safety mode {status.safety_mode}); clear it on "
                         f"the pendant")
    if status.program_running is False:
        raise SafetyStop("the control script is not running on the controller (stopped from the "
                         "pendant, or its watchdog fired)")
    if status.speed_scaling < ctl.min_speed_scaling:
        raise SafetyStop(f"speed scaling {status.speed_scaling:.2f} < control.min_speed_scaling "
                         f"{ctl.min_speed_scaling:g}: the speed slider is down or the arm is being "
                         f"slowed, so it lags behind the commands (and would lunge when it speeds up)")


def _controller_pose(pose):
    """The controller's own form of a pose, rotation angle in [0, pi], whatever continuous form the
    loop keeps; a list of floats for ur-rtde."""
    from scipy.spatial.transform import Rotation

    pose = np.asarray(pose, np.float64)
    return list(map(float, np.concatenate([pose[:3], Rotation.from_rotvec(pose[3:6]).as_rotvec()])))


def check_joints(q):
    """Measured joint angles (6,) must keep JOINT_LIMIT_MARGIN from the limits and
    SINGULARITY_MARGIN from the elbow and wrist singularities; raises SafetyStop."""
    q = np.asarray(q, np.float64)
    if q.shape != (6,) or not np.all(np.isfinite(q)):
        raise SafetyStop(f"robot reading: expected 6 finite joint angles, found {q.tolist()}")
    i = int(np.argmax(np.abs(q)))
    if abs(q[i]) > UR5_JOINT_LIMIT - JOINT_LIMIT_MARGIN:
        raise SafetyStop(f"joint {i + 1} at {q[i]:.3f} rad, expected at least {JOINT_LIMIT_MARGIN} rad "
                         f"inside its limit +-{UR5_JOINT_LIMIT:.3f}: unwind it on the pendant first")
    for i, name in ((2, "elbow"), (4, "wrist 2")):
        if abs(math.sin(q[i])) < math.sin(SINGULARITY_MARGIN):
            raise SafetyStop(f"{name} joint at {q[i]:.3f} rad, expected at least {SINGULARITY_MARGIN} rad "
                             f"from 0 and pi (a singularity: joint speeds blow up); shrink the "
                             f"workspace or change the home configuration")


def _refused(allowed):
    return allowed is not None and not allowed  # None: read-only, the controller cannot be asked


def check_robot_setup(robot, cfg: Config, reference_rotvec, commanding=True):
    """Before an episode: the controller's TCP offset and payload are the config's, the joints are
    clear of limits and singularities, and (commanding) the controller itself accepts every corner
    of the workspace at the reference orientation and robot.home: it has inverse kinematics for
    them, inside its own safety planes and limits. Read-only (dry run, teleoperated recording) the
    TCP offset and the corners cannot be asked."""
    tcp, want = robot.tcp_offset(), np.asarray(cfg.robot.tcp_offset, np.float64)
    if tcp is not None:
        tcp = np.asarray(tcp, np.float64)
        if (np.linalg.norm(tcp[:3] - want[:3]) > TCP_TOL_M
                or rotation_angle(tcp[3:], want[3:]) > TCP_TOL_RAD):
            raise SafetyStop(f"the controller's TCP offset {np.round(tcp, 4).tolist()} is not "
                             f"robot.tcp_offset {want.tolist()}: the box bounds the controller's TCP; "
                             f"set it in the installation (or correct the config)")
    payload = float(robot.payload())
    if not abs(payload - cfg.robot.payload_kg) <= PAYLOAD_TOL_KG:
        raise SafetyStop(f"the controller's payload {payload:g} kg is not robot.payload_kg "
                         f"{cfg.robot.payload_kg:g}: set it in the installation (or correct the config)")
    check_joints(robot.joints())
    if not commanding:
        return
    lo, hi = cfg.safety.workspace_min, cfg.safety.workspace_max
    corners = [np.r_[c, reference_rotvec] for c in np.array(np.meshgrid(*zip(lo, hi))).T.reshape(-1, 3)]
    for pose in corners + ([np.asarray(cfg.robot.home)] if cfg.robot.home is not None else []):
        if _refused(robot.pose_allowed(pose)):
            raise SafetyStop(f"the controller refuses the pose {np.round(pose, 4).tolist()} (a workspace "
                             f"corner or robot.home): out of reach or outside its safety limits "
                             f"(isPoseWithinSafetyLimits); shrink the workspace")


class UR5:
    """UR5 through ur-rtde. `control=False` opens only the receive interface: the controller keeps
    running whatever the pendant runs and this process cannot command motion (used by --dry-run
    and by teleoperated recording). `watchdog_hz`: the control script stops the arm by itself
    when kick() is not called this often (the process died or hangs). `interfaces`: already open
    (receive, control) objects, for tests."""

    def __init__(self, cfg: RobotConfig, control=True, *, watchdog_hz=None, interfaces=None):
        self.cfg, self.watchdog, self._moving = cfg, False, False
        if interfaces is not None:
            self.receive, self.control = interfaces
        else:
            import rtde_receive
            self.receive, self.control = rtde_receive.RTDEReceiveInterface(cfg.host), None
            if control:
                import rtde_control
                self.control = rtde_control.RTDEControlInterface(cfg.host)  # uploads the control script
        if self.control is not None and watchdog_hz:
            if self.control.setWatchdog(float(watchdog_hz)) is False:
                raise SafetyStop("the controller refused the RTDE watchdog (setWatchdog)")
            self.watchdog = True

    def tcp_pose(self):
        return np.asarray(self.receive.getActualTCPPose(), np.float64)

    def joints(self):
        return np.asarray(self.receive.getActualQ(), np.float64)

    def tcp_offset(self):
        return None if self.control is None else np.asarray(self.control.getTCPOffset(), np.float64)

    def payload(self):
        return float(self.receive.getPayload())

    def pose_allowed(self, pose):
        """isPoseWithinSafetyLimits: the controller's inverse kinematics reaches the pose, inside
        its safety planes, tool-orientation and joint limits. None when opened read-only."""
        if self.control is None:
            return None
        return bool(self.control.isPoseWithinSafetyLimits(_controller_pose(pose)))

    def status(self):
        r, c = self.receive, self.control
        connected = r.isConnected() and (c is None or c.isConnected())
        return RobotStatus(connected=bool(connected),
                           program_running=None if c is None else bool(c.isProgramRunning()),
                           protective_stop=bool(r.isProtectiveStopped()),
                           emergency_stop=bool(r.isEmergencyStopped()),
                           safety_mode=int(r.getSafetyMode()), speed_scaling=float(r.getSpeedScaling()),
                           timestamp=float(r.getTimestamp()))

    def kick(self):
        if self.watchdog:
            self.control.kickWatchdog()

    def servo(self, pose, period):
        # servoL(pose, speed, acceleration, time, lookahead_time, gain); speed and acceleration
        # are unused by servoL. `time` = the control period: the controller interpolates over it.
        ok = self.control.servoL(_controller_pose(pose), 0.0, 0.0, period,
                                 self.cfg.servo_lookahead_s, self.cfg.servo_gain)
        if ok is False:
            raise SafetyStop("servoL rejected by the controller (protective stop or script stopped?)")

    def move_to(self, pose, speed, timeout):
        """moveL, asynchronous: this process keeps the watchdog fed and stays interruptible
        (Ctrl-C lands in time.sleep, and stop() then calls stopL); a blocking moveL would hold
        Ctrl-C until the arm arrives. Returns when the move has ended (the caller checks where)."""
        pose = list(map(float, pose))
        if self.control.moveL(pose, speed, HOME_ACCEL, True) is False:
            raise SafetyStop("moveL to robot.home rejected by the controller")
        self._moving = True
        t0 = time.monotonic()
        while True:
            self.kick()
            running = self.control.getAsyncOperationProgressEx().isAsyncOperationRunning()
            near = np.linalg.norm(self.tcp_pose()[:3] - pose[:3]) < HOME_TOL_M
            # the operation may be reported as running only some ms after moveL returns
            if not running and (near or time.monotonic() - t0 > 0.5):
                break
            if time.monotonic() - t0 > timeout:
                raise SafetyStop(f"homing did not end within {timeout:.1f} s")
            time.sleep(0.01)
        self._moving = False

    def stop(self):
        if self.control is None:
            return
        if self._moving:  # an asynchronous moveL is stopped by stopL, not servoStop
            self._moving = False
            self.control.stopL(self.cfg.stop_decel)
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
    Opening it only reads. `activate()` must come before any command, and only once the operator
    has started an episode: activating an inactive gripper strokes its fingers fully open and
    closed, which is motion (run_episode calls it; dry runs and recordings never do). Only the
    protocol is tested here (against a local fake server); kept small on purpose."""

    def __init__(self, host, port=63352, speed=255, force=100, timeout=1.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.replies = self.sock.makefile("r")
        self.speed, self.force = speed, force
        self.active, self._last = False, None

    def _send(self, line):
        self.sock.sendall((line + "\n").encode())
        reply = self.replies.readline().strip()
        if line.startswith("SET") and reply != "ack":
            raise RuntimeError(f"gripper: '{line}' answered {reply!r}, expected 'ack'")
        return reply

    def _get(self, var):
        reply = self._send(f"GET {var}").split()
        if len(reply) != 2 or reply[0] != var:
            raise RuntimeError(f"gripper: 'GET {var}' answered {' '.join(reply)!r}, expected '{var} <int>'")
        return int(reply[1])

    def activate(self, idle=None, timeout=5.0):
        """Activate (if needed: STA 3 is 'activation complete'), then set speed and force. `idle()`
        is called while the activation stroke runs (the robot's watchdog kick)."""
        if self.active:
            return
        if self._get("ACT") != 1 or self._get("STA") != 3:
            self._send("SET ACT 1")  # the stroke starts here
            deadline = time.monotonic() + timeout
            while self._get("STA") != 3:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gripper: activation did not complete within {timeout:g} s "
                                       f"(GET STA {self._get('STA')}, expected 3)")
                if idle is not None:
                    idle()
                time.sleep(0.02)
        self._send(f"SET SPE {self.speed}")
        self._send(f"SET FOR {self.force}")
        self._send("SET GTO 1")
        self.active = True

    def position(self):
        return self._get("POS") / 255.0

    def command(self, g):
        if not self.active:
            raise RuntimeError("gripper not activated: no commands (dry runs and recordings only read)")
        pos = int(round(float(np.clip(g, 0.0, 1.0)) * 255))
        if pos != self._last:  # one socket round trip per change, not per tick
            self._send(f"SET POS {pos}")
            self._last = pos

    def close(self):
        self.replies.close()
        self.sock.close()


class NullGripper:
    """No gripper (or one driven elsewhere): reads as open, ignores commands."""

    def activate(self, idle=None):
        pass

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


WATCHDOG_TICKS = 4  # the controller stops the arm after this many control periods without a kick


def open_hardware(cfg: Config, *, robot="control", watchdog=False):
    """robot: "control" (commands motion), "read" (receive only: --dry-run, teleop recording),
    or None (no robot: human demonstrations). watchdog: arm the RTDE watchdog (running a policy;
    not while recording, where the arm is moved by hand and tracking runs after the episodes)."""
    opened = {}
    try:
        opened["cameras"] = {}
        for c in cfg.cameras:
            opener = open_realsense_camera if c.kind == "realsense" else open_opencv_camera
            opened["cameras"][c.name] = opener(c)
        if robot and cfg.gripper.kind == "robotiq":
            opened["gripper"] = RobotiqGripper(cfg.gripper.host, cfg.gripper.port,
                                               speed=cfg.gripper.speed, force=cfg.gripper.force)
        else:
            opened["gripper"] = NullGripper() if robot else None
        # the robot last: once its watchdog is armed, every wait must kick it
        opened["robot"] = UR5(cfg.robot, control=robot == "control",
                              watchdog_hz=cfg.control.rate_hz / WATCHDOG_TICKS if watchdog else None) \
            if robot else None
    except BaseException:
        Hardware(opened.get("robot"), opened.get("gripper"), opened.get("cameras", {})).close()
        raise
    return Hardware(opened["robot"], opened["gripper"], opened["cameras"])


# -----------------------------------------------------------------------------
# Observation and action layout


class Proprio:
    """Measured TCP pose (6,) + gripper -> proprio in the action layout (float32), with rotation
    vectors kept continuous from reading to reading (see rotvec_near), starting from `reference`
    (robot.home's orientation when set: the same reference when recording and when running)."""

    def __init__(self, layout, reference=None):
        self.layout, self.last = layout, None if reference is None else np.asarray(reference, np.float64)

    def pose(self, pose):
        """The measured pose with its rotation vector made continuous."""
        pose = np.asarray(pose, np.float64).copy()
        if self.last is not None:
            pose[3:6] = rotvec_near(pose[3:6], self.last)
        self.last = pose[3:6].copy()
        return pose

    def __call__(self, pose, grip):
        return proprio_from(self.pose(pose), grip, self.layout)


def read_state(robot, gripper):
    """The measured TCP pose (6,) and gripper position, checked: a NaN reading must not reach the
    policy's proprio or a recording."""
    pose = np.asarray(robot.tcp_pose(), np.float64)
    if pose.shape != (6,) or not np.all(np.isfinite(pose)):
        raise SafetyStop(f"robot reading: expected a finite TCP pose (6,), found {pose.tolist()}")
    grip = float(gripper.position())
    if not (math.isfinite(grip) and -0.01 <= grip <= 1.01):  # 1 % for rounding in drivers
        raise SafetyStop(f"gripper reading: expected a position in [0, 1], found {grip}")
    return pose, min(max(grip, 0.0), 1.0)


def proprio_from(pose, grip, layout):
    """TCP pose (6,) + gripper -> proprio in the action layout (float32)."""
    parts = [pose[:3]] + ([pose[3:6]] if layout == "xyz_rotvec_gripper" else []) + [[grip]]
    return np.concatenate(parts).astype(np.float32)


def target_from(action, hold_rotvec, layout):
    """Policy action (A,) in data units -> (pose (6,), gripper). `xyz_gripper` holds orientation.
    The whole action must be finite: a NaN gripper would reach the gripper and the log."""
    action = np.asarray(action, np.float64).reshape(-1)
    if action.shape[0] != ACTION_LAYOUTS[layout]:
        raise SafetyStop(f"policy action has {action.shape[0]} dims, expected "
                         f"{ACTION_LAYOUTS[layout]} for control.action = '{layout}'")
    if not np.all(np.isfinite(action)):
        raise SafetyStop(f"policy returned a non-finite action {action.tolist()}")
    rot = action[3:6] if layout == "xyz_rotvec_gripper" else hold_rotvec
    return np.concatenate([action[:3], rot]), float(action[-1])


# -----------------------------------------------------------------------------
# Control loop


def check_policy(policy, cfg: Config):
    """The checkpoint must match the config: views, action and proprio layouts, and an action range
    that can be absolute positions (metres) in this workspace, rotation vectors near robot.home's
    and a gripper in [0, 1].

    The range comes from the action statistics in the checkpoint (`policy.action_stats`: mean
    and std per action dimension of the training data). A policy trained on normalized actions,
    deltas or joint angles has position means near 0 or spreads wider than the box, and "clamp"
    would otherwise drive the arm into a corner of the box."""
    names = [c.name for c in cfg.cameras]
    missing = [v for v in policy.views if v not in names]
    if missing:
        raise ConfigError(f"config error: cameras: expected views {list(policy.views)} (from the "
                          f"policy), found {names}")
    layout, A = cfg.control.action, ACTION_LAYOUTS[cfg.control.action]
    for attr in ("action_dim", "proprio_dim"):
        value = getattr(policy, attr, None)
        if value is not None and value != A:
            raise ConfigError(f"config error: control.action: '{layout}' has {A} dims, "
                              f"the policy's {attr} is {value}")
    recorded = getattr(policy, "action_layout", None)  # recordings of this file store it (meta.json)
    if recorded is not None and recorded != layout:
        raise ConfigError(f"config error: control.action: expected the policy's action layout "
                          f"'{recorded}', found '{layout}'")
    stats = getattr(policy, "action_stats", None)
    if stats is None:
        raise ConfigError("policy: expected action statistics in the checkpoint (action_stats: mean, std), "
                          "found none: its action units cannot be checked against the workspace")
    mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    lo, hi = np.asarray(cfg.safety.workspace_min), np.asarray(cfg.safety.workspace_max)
    bad = [f"{axis}: mean {mean[i]:.3g} std {std[i]:.3g}" for i, axis in enumerate("xyz")
           if not (lo[i] <= mean[i] <= hi[i]) or std[i] > hi[i] - lo[i]]
    if bad:
        raise ConfigError(f"policy: expected actions in metres inside the workspace "
                          f"{cfg.safety.workspace_min}..{cfg.safety.workspace_max} (mean inside, "
                          f"spread within the box), found {'; '.join(bad)}: trained on other units "
                          f"(normalized, deltas, joint angles) or another workspace")
    if layout == "xyz_rotvec_gripper":
        # recordings of this file hold rotation vectors continuous from robot.home's (required for
        # this layout): their mean is near home's as a vector, not only as a rotation, and they
        # spread no wider than the cone. Twice the cone is loose (near a half turn a rotation vector
        # moves up to pi/2 times as far as the rotation) and still refuses degrees, Euler angles and
        # data mixing the two forms of a half turn (mean 0, std 3.1)
        home, cone = np.asarray(cfg.robot.home[3:], np.float64), cfg.safety.max_rot_from_home_rad
        rmean, rstd = mean[3:6], std[3:6]
        off = float(np.linalg.norm(rmean - home))
        angle = rotation_angle(rmean, home) if off < 100 else math.inf
        if off > 2 * cone or angle > cone or np.any(rstd > 2 * cone):
            raise ConfigError(f"policy: expected rotation vectors (rad) continuous from robot.home's "
                              f"{np.round(home, 4).tolist()}: mean within {cone:g} rad of it, std at most "
                              f"{2 * cone:g}; found mean {np.round(rmean, 3).tolist()} ({angle:.2f} rad "
                              f"away) std {np.round(rstd, 3).tolist()}: degrees, Euler angles, or rotation "
                              f"vectors that flip near a half turn")
    if not (0 <= mean[-1] <= 1) or std[-1] > 1:
        raise ConfigError(f"policy: expected a gripper action in [0, 1], found mean {mean[-1]:.3g} "
                          f"std {std[-1]:.3g}")


@dataclass
class EpisodeResult:
    steps: int
    log: list  # one dict per step


def check_start(pose, cfg: Config):
    """Before homing (and in a dry run, which does not home): the start must be inside the box and,
    with robot.home, within the orientation cone around home's orientation. moveL goes in a straight
    line and turns about one axis, so it stays inside the (convex) box and cone only if it starts
    inside; a tool half a turn from home would swing the wrist by pi on the way."""
    pose = np.asarray(pose, np.float64)
    lo, hi = cfg.safety.workspace_min, cfg.safety.workspace_max
    if not (np.all(lo <= pose[:3]) and np.all(pose[:3] <= hi)):
        raise SafetyStop(f"start position {np.round(pose[:3], 4).tolist()} is outside the "
                         f"workspace {lo}..{hi}; move the arm inside first (freedrive)")
    if cfg.robot.home is not None:
        angle, cone = rotation_angle(pose[3:], cfg.robot.home[3:]), cfg.safety.max_rot_from_home_rad
        if angle > cone:
            raise SafetyStop(f"start orientation {angle:.3f} rad from robot.home's, expected within "
                             f"safety.max_rot_from_home_rad {cone:g}: homing would turn the wrist that "
                             f"far; turn it closer first (freedrive)")


def go_home(robot, cfg: Config):
    """moveL to robot.home (the caller has checked that the straight line stays in the box), then
    check where the arm is: a move that was blocked or stopped must not start the episode."""
    home = np.asarray(cfg.robot.home, np.float64)
    dist = float(np.linalg.norm(robot.tcp_pose()[:3] - home[:3]))
    robot.move_to(home, cfg.robot.home_speed, timeout=2 * dist / cfg.robot.home_speed + 5.0)
    pose = robot.tcp_pose()
    err, angle = float(np.linalg.norm(pose[:3] - home[:3])), rotation_angle(pose[3:], home[3:])
    if err > HOME_TOL_M or angle > HOME_TOL_RAD:
        raise SafetyStop(f"homing ended {1e3 * err:.1f} mm and {angle:.3f} rad from robot.home "
                         f"(expected within {1e3 * HOME_TOL_M:g} mm, {HOME_TOL_RAD:g} rad): blocked, "
                         f"or stopped from the pendant")


def _round(a, n=5):
    return np.round(np.asarray(a, np.float64), n).tolist()


def run_episode(policy, hw: Hardware, cfg: Config, task, *, clock=None, dry_run=False,
                on_step=None, max_steps=None, should_end=None):
    """One episode: cameras -> policy -> safety filter -> servoL, at cfg.control.rate_hz.

    Whatever ends the episode (time limit, exception, Ctrl-C, SafetyStop), the arm is stopped
    before this returns or raises. In dry-run the robot was opened read-only: no homing, no servo,
    no gripper command. Before the episode: the start pose, the controller's setup and the box
    (check_start, check_robot_setup), then gripper activation and homing. Every tick: the watchdog
    is kicked, the robot's state checked (connection, fresh data, safety stops, speed scaling), the
    readings and joints checked, the measured pose compared with the last command (position and
    orientation), and the target put to the controller before it is sent.
    `on_step(entry)` receives each step's log entry as it happens; `should_end()`, polled every
    tick, ends the episode early (the CLI: the operator pressed Enter). Warm the policy up before
    (main does): its first call may take seconds, during which the watchdog is not kicked.
    """
    clock = clock or MonotonicClock()
    ctl, layout = cfg.control, cfg.control.action
    cams = [next(c for c in cfg.cameras if c.name == v) for v in policy.views]  # policy's order
    size = tuple(policy.img_size)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps: expected >= 1, found {max_steps}")
    n_steps = max_steps or int(round(ctl.episode_s * ctl.rate_hz))
    log = []
    robot, gripper = hw.robot, hw.gripper
    finished = False
    try:
        check_status(robot.status(), ctl, commanding=not dry_run)
        check_start(robot.tcp_pose(), cfg)
        check_robot_setup(robot, cfg, cfg.robot.home[3:] if cfg.robot.home is not None
                          else robot.tcp_pose()[3:], commanding=not dry_run)
        if not dry_run:  # after the operator's Enter (main): activation may stroke the fingers
            gripper.activate(idle=robot.kick)
        if cfg.robot.home is not None and not dry_run:
            go_home(robot, cfg)
        reference = None if cfg.robot.home is None else np.asarray(cfg.robot.home[3:], np.float64)
        measure = Proprio(layout, reference)
        start = measure.pose(robot.tcp_pose())
        safety = SafetyFilter(cfg.safety, cfg.period, start, reference)
        hold_rot = start[3:6].copy()

        views = Views(hw.cameras, cams, size, ctl.max_frame_age_s)
        rate, overruns = Rate(ctl.rate_hz, clock), OverrunMonitor(ctl, cfg.period)
        status, grip_sent, grip_sent_t = None, None, -math.inf
        for step in range(n_steps):
            t0 = clock.now()
            robot.kick()
            status, previous = robot.status(), status
            check_status(status, ctl, commanding=not dry_run, previous=previous)
            images = views.read(t0)
            pose, grip_measured = read_state(robot, gripper)
            pose = measure.pose(pose)
            check_joints(robot.joints())  # measured: a tick late, but the controller checks targets
            tracking = float(np.linalg.norm(pose[:3] - safety.prev[:3]))
            tracking_rad = rotation_angle(pose[3:], safety.prev[3:])
            if tracking > cfg.safety.max_tracking_error_m and not dry_run:
                raise SafetyStop(f"tracking error {1e3 * tracking:.0f} mm between the commanded and the "
                                 f"measured position > safety.max_tracking_error_m "
                                 f"{1e3 * cfg.safety.max_tracking_error_m:.0f} mm: the arm is blocked or "
                                 f"slowed")
            if tracking_rad > cfg.safety.max_tracking_error_rad and not dry_run:
                raise SafetyStop(f"orientation tracking error {tracking_rad:.3f} rad between the "
                                 f"commanded and the measured orientation > "
                                 f"safety.max_tracking_error_rad {cfg.safety.max_tracking_error_rad:g}: "
                                 f"the wrist is blocked or slowed")
            proprio = proprio_from(pose, grip_measured, layout)
            t1 = clock.now()
            action = np.asarray(policy.act(images, proprio, task))
            t2 = clock.now()
            target, grip = target_from(action, hold_rot, layout)
            target, event = safety.apply(target)
            grip = min(max(grip, 0.0), 1.0)
            # a new gripper position at most every gripper.min_interval_s; the latest request goes
            # out once the interval has passed
            send_grip = grip != grip_sent and t0 - grip_sent_t >= cfg.gripper.min_interval_s - 1e-9
            if send_grip:
                grip_sent, grip_sent_t = grip, t0
            overruns.check_stall(rate.late(), "was about to command")  # not sent: stale inputs
            if not dry_run and _refused(robot.pose_allowed(target)):  # a round trip: see latency_ms
                raise SafetyStop(f"the controller refuses the target {_round(target)}: out of reach or "
                                 f"outside its safety limits (isPoseWithinSafetyLimits)")
            if not dry_run:
                robot.servo(target, cfg.period)
                if send_grip:
                    gripper.command(grip)
            t3 = clock.now()
            entry = {"step": step, "t": round(t0 - rate.start, 5), "obs_ms": round(1e3 * (t1 - t0), 3),
                     "policy_ms": round(1e3 * (t2 - t1), 3), "latency_ms": round(1e3 * (t3 - t0), 3),
                     "event": event, "action": _round(action), "target": _round(target),
                     "gripper": round(grip, 4), "gripper_sent": send_grip, "measured": _round(pose),
                     "tracking_mm": round(1e3 * tracking, 2), "tracking_rad": round(tracking_rad, 4),
                     "speed_scaling": round(status.speed_scaling, 3)}
            late = rate.sleep()
            entry["late_ms"] = round(1e3 * late, 3)
            log.append(entry)
            if on_step:
                on_step(entry)
            overruns.update(late)
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
    tracking = max(e.get("tracking_mm", 0.0) for e in log)
    tracking_rad = max(e.get("tracking_rad", 0.0) for e in log)
    return (f"steps {len(log)} | latency ms p50 {np.percentile(lat, 50):.1f} "
            f"p99 {np.percentile(lat, 99):.1f} max {lat.max():.1f} | "
            f"period ms mean {periods.mean():.2f} std {periods.std():.2f} "
            f"(target {1e3 * period:.1f}) | overruns {overruns} | "
            f"clamped {events['clamped']} refused {events['refused']} | max tracking error "
            f"{tracking:.1f} mm {tracking_rad:.3f} rad")


# -----------------------------------------------------------------------------
# Recording demonstrations


def record_episode(hw: Hardware, cfg: Config, *, with_actions=True, clock=None, should_end=None):
    """Record one demonstration at the control rate; the arm is moved by a person (freedrive) or a
    teleoperation program, never by this function.

    Returns a dict for preprocess.episodes_to_dataset: `images` uint8 (F, V, H, W, 3) in the
    config's camera order, and with a robot `proprio` (F, P) and `actions` (F, A) float32.
    The action at frame t is the measured pose (and gripper) at frame t+1 in the action layout,
    i.e. the absolute target the policy will learn to command; the last frame repeats its own
    pose (a "stay" action). Rotation vectors are continuous (see rotvec_near), referred to
    robot.home's orientation when set, as in run_episode. Every frame the robot's connection,
    the freshness of its data and the readings are checked (SafetyStop: the episode is discarded).
    Without actions (human demonstrations) the robot is not read at all.
    """
    clock = clock or MonotonicClock()
    ctl, layout = cfg.control, cfg.control.action
    size = tuple(cfg.record.img_size)
    n_steps = int(round(ctl.episode_s * ctl.rate_hz))
    measure = Proprio(layout, None if cfg.robot.home is None else cfg.robot.home[3:])
    images, proprio = [], []
    views = Views(hw.cameras, cfg.cameras, size, ctl.max_frame_age_s)
    rate, overruns = Rate(ctl.rate_hz, clock), OverrunMonitor(ctl, cfg.period, "recording")
    status = None
    for _ in range(n_steps):
        images.append(views.read(clock.now()))
        if with_actions:  # the robot is only read: its connection and fresh data are what count
            status, previous = hw.robot.status(), status
            check_status(status, ctl, commanding=False, previous=previous)
            proprio.append(measure(*read_state(hw.robot, hw.gripper)))
        overruns.update(rate.sleep())  # the time base of the demonstration must hold
        if should_end is not None and should_end():
            break
    episode = {"images": np.stack(images)}
    if with_actions:
        p = np.stack(proprio)
        episode["proprio"] = p
        episode["actions"] = np.concatenate([p[1:], p[-1:]]).astype(np.float32)
    return episode


def _save_episode(path, episode):
    """One episode as .npz, atomically (amplify.atomic_write) and synced to disk before the rename:
    a crash or power cut leaves the previous episodes and no half file."""
    import amplify

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in episode.items()})
            f.flush()
            os.fsync(f.fileno())

    amplify.atomic_write(path, write)


def _load_episodes(paths):
    for p in paths:  # one episode in memory at a time
        with np.load(p, allow_pickle=False) as z:
            ep = {k: z[k] for k in z.files}
        ep["task"] = str(ep["task"])
        yield ep


def check_recording_target(out, existing):
    """Refuse to record over an earlier recording unless told to; returns the episode directory."""
    raw = os.path.abspath(out) + ".episodes"
    if existing not in ("refuse", "append", "overwrite"):
        raise ValueError(f"existing: expected 'refuse', 'append' or 'overwrite', found {existing!r}")
    found = [p for p in (out, raw) if os.path.exists(p)]
    if found and existing == "refuse":
        raise ConfigError(f"argument error: --record: expected a new recording, found {found[0]} "
                          f"(--append adds episodes to it, --overwrite replaces it)")
    return raw


def record(hw: Hardware, cfg: Config, out, task, *, episodes, with_actions=True, tracker="auto",
           clock=None, wait_start=None, should_end=None, kinesthetic=False, existing="refuse"):
    """Record `episodes` demonstrations, then write them as an AMPLIFY dataset at `out`.

    Each episode is saved when it ends, atomically, as OUT.episodes/episode_<n>.npz; the dataset
    is built from those files at the end. Whatever stops the recording (Ctrl-C, a camera lost, a
    gripper timeout), the episode in progress is discarded, the completed ones are kept and the
    dataset is built from them; the exception is then raised again. existing: what to do when OUT
    or OUT.episodes exists: "refuse", "append" (the dataset is rebuilt from the earlier episodes
    and the new ones; episodes=0 just rebuilds it) or "overwrite" (from the new ones only; the
    earlier episode files are removed once the new dataset is in place; a recording stopped by an
    error keeps the earlier one, dataset and episodes, unchanged).
    wait_start(i): called before episode i (the CLI waits for Enter); should_end(): polled every
    tick (the CLI: Enter pressed).
    """
    import glob
    import preprocess

    out = os.path.abspath(out)
    raw = check_recording_target(out, existing)
    os.makedirs(raw, exist_ok=True)
    earlier = sorted(glob.glob(os.path.join(raw, "episode_*.npz")))
    first = 1 + max([int(os.path.basename(p)[8:-4]) for p in earlier], default=-1)  # never reuse a name
    saved, error = [], None
    try:
        if with_actions:  # the recorded poses are the controller's TCP: it must be the config's
            check_robot_setup(hw.robot, cfg, None, commanding=False)
        if kinesthetic:
            hw.robot.teach(True)
        for i in range(episodes):
            if wait_start is not None:
                wait_start(i)
            ep = record_episode(hw, cfg, with_actions=with_actions, clock=clock, should_end=should_end)
            path = os.path.join(raw, f"episode_{first + i:06d}.npz")
            _save_episode(path, {**ep, "task": task})
            saved.append(path)
            print(f"episode {i}: {len(ep['images'])} frames -> {path}", file=sys.stderr)
    except (Exception, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped: {type(e).__name__}: {e}"
        print(f"{what}; discarding the episode in progress, keeping {len(saved)} in {raw}",
              file=sys.stderr)
        error = e
    finally:
        if kinesthetic:
            hw.robot.teach(False)
    if existing == "overwrite" and error is not None and not isinstance(error, KeyboardInterrupt):
        # replace a recording only with a complete one (Ctrl-C is the operator's choice to finish):
        # a gripper timeout in the second new episode deleted three earlier episodes for one
        print(f"--overwrite: the recording stopped early, so {out} and its {len(earlier)} episodes "
              f"are kept; the {len(saved)} new ones are beside them in {raw} (--append --episodes 0 "
              f"builds a dataset of all)", file=sys.stderr)
        raise error
    paths = earlier + saved if existing == "append" else saved
    if not paths:
        if isinstance(error, KeyboardInterrupt) or error is None:
            raise SafetyStop("no complete episode recorded; nothing written")
        raise error
    try:
        summary = preprocess.episodes_to_dataset(
            _load_episodes(paths), out, views=[c.name for c in cfg.cameras], fps=cfg.control.rate_hz,
            source="real_robot" if with_actions else "real_human", tracker=tracker, progress=False,
            extra_meta={"action_layout": cfg.control.action} if with_actions else None)
    except BaseException:
        print(f"the dataset was not written; the {len(paths)} episodes are kept in {raw} (build it "
              f"with --append --episodes 0)", file=sys.stderr)
        raise
    if existing == "overwrite":
        for p in earlier:
            os.remove(p)
    if error is not None and not isinstance(error, KeyboardInterrupt):
        raise error
    return summary

# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description="Run an AMPLIFY policy on a UR5, or record demonstrations.")
    p.add_argument("--config", required=True, help="JSON config (see real_robot.example.json)")
    p.add_argument("--task", default=None, help="task text (default: the config's 'task')")
    p.add_argument("--episodes", type=int, default=1,
                   help="episodes to run or record, each control.episode_s long (Enter ends one early)")
    p.add_argument("--yes", action="store_true",
                   help="run without a terminal: episodes (and homing) follow each other with no "
                        "Enter prompt; without it, moving the arm needs a terminal")
    # running a policy
    p.add_argument("--policy", help="policy checkpoint (DIR/policy.pt from amplify.py --stage all)")
    p.add_argument("--dry-run", action="store_true",
                   help="everything but motion: robot opened read-only, no servoL, no gripper commands")
    p.add_argument("--device", default="auto", help="torch device for the policy: auto, cpu, cuda, cuda:1")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="policy arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 for "
                        "models at least 256 wide (1.6x per paper-preset step there), else fp32")
    p.add_argument("--log", help="append one JSON line per step (latency, action, target, measured "
                                 "pose, safety events)")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per episode (bring-up)")
    # recording demonstrations
    p.add_argument("--record", metavar="OUT", help="record demonstrations into a dataset at OUT "
                                                   "(each episode is kept in OUT.episodes/ as it ends)")
    p.add_argument("--append", action="store_true",
                   help="with --record: add episodes to an existing recording (--episodes 0: only "
                        "rebuild the dataset from the kept episodes)")
    p.add_argument("--overwrite", action="store_true", help="with --record: replace an existing recording")
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

    def wait(self, prompt, idle=None):
        """Wait for Enter, calling `idle()` (the watchdog kick) every 20 ms meanwhile."""
        while not self.lines.empty():  # forget presses from before the prompt
            self.lines.get_nowait()
        print(prompt, file=sys.stderr, flush=True)
        while True:
            try:
                self.lines.get(timeout=0.02)
                return
            except queue.Empty:
                if idle is not None:
                    idle()

    def pressed(self):
        try:
            self.lines.get_nowait()
            return True
        except queue.Empty:
            return False


def warm_up(policy, task):
    """One call on black images before the robot is opened: the first call pays for CUDA init and
    allocation (seconds), which inside the loop would starve the watchdog and overrun."""
    V, (H, W) = len(policy.views), policy.img_size
    policy.act(np.zeros((V, H, W, 3), np.uint8), np.zeros(policy.proprio_dim, np.float32), task)
    policy.reset()


def main(argv=None, *, hardware=None, policy=None, clock=None, interactive=True):
    """Entry point; returns the exit code. Tests inject `hardware` (a Hardware or a callable
    (cfg, robot_mode) -> Hardware), `policy` and `clock`; interactive=False: no terminal."""
    args = build_parser().parse_args(argv)
    terminal = interactive and sys.stdin.isatty()
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
        if (args.no_actions or args.kinesthetic or args.append or args.overwrite) and args.record is None:
            raise ConfigError("argument error: --no-actions/--kinesthetic/--append/--overwrite: "
                              "expected with --record, found without")
        if args.no_actions and args.kinesthetic:
            raise ConfigError("argument error: expected --no-actions (human, no robot) or "
                              "--kinesthetic (robot in freedrive), found both")
        if args.append and args.overwrite:
            raise ConfigError("argument error: expected --append or --overwrite, found both")
        if args.episodes < (0 if args.append else 1):
            raise ConfigError(f"argument error: --episodes: expected >= 1 (0 only with --append), "
                              f"found {args.episodes}")
        if args.max_steps is not None and args.max_steps < 1:
            raise ConfigError(f"argument error: --max-steps: expected >= 1, found {args.max_steps}")
        if args.record is None and not args.dry_run and not terminal and not args.yes:
            raise ConfigError("argument error: expected a terminal to confirm each episode before the "
                              "arm moves (or --yes to run without prompts), found no terminal")
        existing = "append" if args.append else ("overwrite" if args.overwrite else "refuse")
        if args.record is not None:
            check_recording_target(args.record, existing)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    running = args.record is None
    if not running:
        mode = None if args.no_actions else ("control" if args.kinesthetic else "read")
    else:
        mode = "read" if args.dry_run else "control"
    hw = None
    log_file = open(args.log, "a") if args.log else None
    try:
        if policy is None and running:
            import amplify
            policy = amplify.load_policy(args.policy, args.device, precision=args.precision)
            print(f"policy {args.policy}: views {policy.views}, {policy.img_size[0]}x{policy.img_size[1]}, "
                  f"device {policy.device}, {'bf16' if policy.bf16 else 'fp32'}", file=sys.stderr)
        if running:
            check_policy(policy, cfg)
            warm_up(policy, task)
        if hardware is None:
            hw = open_hardware(cfg, robot=mode, watchdog=running and mode == "control")
        else:
            hw = hardware(cfg, mode) if callable(hardware) else hardware
        idle = hw.robot.kick if hw.robot is not None and hasattr(hw.robot, "kick") else None
        wait_for_cameras(hw.cameras, cfg.control.camera_timeout_s, idle=idle)

        # prompts only on a terminal; without one, --yes (checked above) lets episodes follow
        keys = EnterKey() if terminal else None
        if not running:
            def wait_start(i):
                if keys:
                    keys.wait(f"episode {i}: press Enter to start recording, Enter again to end it "
                              f"early (Ctrl-C: discard it and finish)", idle)
            should_end = keys.pressed if keys else None
            summary = record(hw, cfg, args.record, task, episodes=args.episodes,
                             with_actions=not args.no_actions, tracker=args.tracker, clock=clock,
                             wait_start=wait_start, should_end=should_end,
                             kinesthetic=args.kinesthetic, existing=existing)
            print(f"wrote {args.record}: {summary}", file=sys.stderr)
            return 0

        def on_step(entry):
            if log_file:
                try:
                    log_file.write(json.dumps(entry, allow_nan=False) + "\n")
                    log_file.flush()
                except OSError as e:  # a full disk: the run was asked to be logged, so it stops
                    raise SafetyStop(f"--log {args.log}: cannot write ({e})") from None
        for ep in range(args.episodes):
            if keys:
                homing = "the arm moves to robot.home, " if cfg.robot.home and not args.dry_run else ""
                keys.wait(f"episode {ep}: reset the scene, press Enter to start ({homing}Enter again "
                          f"ends it early, Ctrl-C stops)", idle)
            policy.reset()
            result = run_episode(policy, hw, cfg, task, clock=clock, dry_run=args.dry_run,
                                 on_step=on_step, max_steps=args.max_steps,
                                 should_end=keys.pressed if keys else None)
            print(f"episode {ep}{' (dry run)' if args.dry_run else ''}: "
                  f"{latency_summary(result.log, cfg.period)}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted: robot stopped", file=sys.stderr)
        return 130
    except (SafetyStop, ConfigError) as e:
        print(f"stopped: {e}" if isinstance(e, SafetyStop) else str(e), file=sys.stderr)
        return 1
    except Exception as e:  # hardware/driver errors: one line, the arm already stopped
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        # the hardware first (stopScript, cameras released): nothing that fails after it, such as
        # closing a log on a full disk, may keep the control script running
        if hw is not None and (hardware is None or callable(hardware)):
            hw.close()
        if log_file:
            try:
                log_file.close()
            except OSError as e:
                print(f"WARNING: --log {args.log}: closing failed ({e}); lines before it were "
                      f"flushed", file=sys.stderr)


def _stop_signal(signum, frame):
    raise KeyboardInterrupt  # stops the arm exactly like Ctrl-C


def install_stop_signals():
    """SIGTERM (a supervisor's kill), SIGHUP (the SSH session or terminal dropped) and SIGQUIT
    (Ctrl-\\) stop the arm like Ctrl-C instead of killing the process mid-motion. Returns the
    previous handlers, {signal: handler}."""
    import signal

    return {s: signal.signal(s, _stop_signal) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}


if __name__ == "__main__":
    install_stop_signals()
    sys.exit(main())
