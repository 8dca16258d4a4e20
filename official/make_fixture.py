"""Regenerate official/fixture.pt: the published AMPLIFY models, small, on fixed inputs.

The fixture lets our tests check parity with the published code (pairlab/AMPLIFY) without that
code installed: each published model is built at a small config that keeps its structure (block
order, biases, masks, where positions are added, how codes enter), its weights are drawn at random,
it is run on fixed inputs in fp32 on the CPU, and its config, full state dict, inputs and outputs are
saved as plain dicts and tensors (torch.load(..., weights_only=True) reads them).

This script only imports and calls the published modules from a local clone; nothing of that code
is copied here. See official/README.md for the environment it needs and docs/PUBLISHED_ARCHITECTURE.md
for what the models are.

    python official/make_fixture.py --official /path/to/AMPLIFY            # writes official/fixture.pt
    python official/make_fixture.py --official /path/to/AMPLIFY --count-params   # paper-config sizes

What is in the file (B batch 2, V views 2, L = T-1 = 15 codes, N points 16, S image tokens per view 4):
  meta       official commit, package versions, the small config's numbers, rounding margins
  tokenizer  config, state_dict, inputs {traj, velocities}, outputs {z, fsq_codes, codes, indices,
             logits, target_classes, velocities_recon, traj_recon, loss}
  forward    config, args, state_dict, inputs {image_tokens, text_emb, targets}, outputs {logits,
             loss, pred_indices, ar_indices}
  inverse    config, tokenizer_config, state_dict, inputs {image_tokens, proprio, code_indices,
             codes, actions}, outputs {mean, std, nll, loss}
  vision     config, resnet_recipe (the ResNet-18 weights are 45 MB, so they are stored as the
             seeded draws that rebuild them, with checksums), inputs {images}, outputs {tokens}
"""

import argparse
import importlib.metadata
import math
import os
import subprocess
import sys

import torch
from einops import rearrange

HERE = os.path.dirname(os.path.abspath(__file__))

# The small config. Everything else is the published YAML's value (cfg/*.yaml at the commit used).
SMALL = {
    "batch": 2,
    "hidden_dim": 32,  # tokenizer width; the forward and inverse models take the tokenizer's width
    "num_heads": 2,
    "tokenizer_layers": 2,  # encoder layers; the published decoder gets int(layers / 2) = 1
    "decoder_mlp_hidden_dim": 48,
    "num_tracks": 16,  # a 4x4 grid (published: 400 = 20x20)
    "forward_layers": 2,
    "inverse_layers": 2,
    "img_tokens_per_view": 4,  # a 2x2 feature map, as VisionEncoder(img_size=64) gives (published: 7x7 at 224)
    "text_dim": 512,  # T5-small's width; the embedding itself is drawn at random (no T5 weights offline)
}
WEIGHT_SEED, INPUT_SEED, RESNET_SEED = 0, 1000, 5000
MIN_MARGIN = 2e-4  # inputs are redrawn until no rounding or argmax decision is closer than this


# -----------------------------------------------------------------------------
# Importing the published code


_TORCHVISION_SHIM = []  # keeps the operator library alive for the whole run


def import_torchvision():
    """Import torchvision, working around a CPU-only torch.

    The torchvision wheels on PyPI carry CUDA-built operators that a CPU-only torch cannot load;
    torchvision then fails at import when it registers a fake kernel for torchvision::nms, an
    operator that was never defined. Declaring the schemas of the two unguarded operators first
    lets the rest (transforms, which the vision encoder uses) import. No operator is run.
    """
    try:
        import torchvision  # noqa: F401
        return "compiled operators loaded"
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM.append(lib)
    import torchvision  # noqa: F401
    return "compiled operators not loadable (CPU-only torch): nms/qnms schemas declared so the import succeeds"


def load_official(path):
    """-> a namespace of the published classes and functions this script calls."""
    if not os.path.isfile(os.path.join(path, "amplify", "models", "motion_tokenizer.py")):
        sys.exit(f"--official: expected a clone of pairlab/AMPLIFY (amplify/models/motion_tokenizer.py), "
                 f"found none in {path}")
    torchvision_note = import_torchvision()
    # First on the path: the clone's package is also called `amplify`, like our amplify.py.
    sys.path.insert(0, os.path.abspath(path))
    hook = sys.excepthook
    from omegaconf import OmegaConf
    from amplify.models.motion_tokenizer import MotionTokenizer
    from amplify.models.forward_dynamics import ForwardDynamics
    from amplify.models.inverse_dynamics import InverseDynamics
    from amplify.models.encoders.vision_encoders import VisionEncoder
    from amplify.models.transformer import LayerNorm
    from amplify.utils.data_utils import (get_autoregressive_indices_efficient, points_to_velocities,
                                          velocities_to_points)
    from amplify.utils.kp_utils.query_utils import grid_queries
    # forward_dynamics.py installs an excepthook that opens pdb on any uncaught exception; a script
    # must fail with a traceback instead of waiting on stdin.
    sys.excepthook = hook
    return argparse.Namespace(
        OmegaConf=OmegaConf, MotionTokenizer=MotionTokenizer, ForwardDynamics=ForwardDynamics,
        InverseDynamics=InverseDynamics, VisionEncoder=VisionEncoder, LayerNorm=LayerNorm,
        get_autoregressive_indices_efficient=get_autoregressive_indices_efficient,
        points_to_velocities=points_to_velocities, velocities_to_points=velocities_to_points,
        grid_queries=grid_queries, torchvision_note=torchvision_note)


def git_commit(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions():
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ["torchvision", "timm", "vector-quantize-pytorch", "positional-encodings", "omegaconf",
                 "hydra-core", "einops"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# -----------------------------------------------------------------------------
# Configs: the published YAMLs, with the small sizes above


def configs(off, path):
    O = off.OmegaConf
    tok = O.load(os.path.join(path, "cfg", "train_motion_tokenizer.yaml"))
    tok.hidden_dim = SMALL["hidden_dim"]
    tok.num_heads = SMALL["num_heads"]
    tok.num_layers = SMALL["tokenizer_layers"]
    tok.decoder_mlp_hidden_dim = SMALL["decoder_mlp_hidden_dim"]
    tok.num_tracks = SMALL["num_tracks"]
    fwd = O.load(os.path.join(path, "cfg", "train_forward_dynamics.yaml"))
    fwd.forward_dynamics.transformer.n_layer = SMALL["forward_layers"]
    fwd.forward_dynamics.transformer.n_head = SMALL["num_heads"]
    inv = O.load(os.path.join(path, "cfg", "train_inverse_dynamics.yaml"))
    inv.num_layers = SMALL["inverse_layers"]
    inv.num_heads = SMALL["num_heads"]
    # train_inverse_dynamics.py fills these from the vision and text encoders before building the
    # model, and they are saved with the checkpoint's config.
    views = len(tok.cond_cameraviews)
    inv.num_img_tokens = SMALL["img_tokens_per_view"]
    inv.img_embed_dim = 512 * views  # ResNet-18 channels, the views stacked in the embedding
    inv.text_embed_dim = SMALL["text_dim"]
    return tok, fwd, inv


def plain(cfg):
    """An OmegaConf config -> plain dicts and lists, interpolations resolved (as the training scripts save it)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


# -----------------------------------------------------------------------------
# Random weights and inputs


def randomize(model, off, gen, skip=(), scales=None):
    """Redraw every parameter: LayerNorm gains 1 + 0.1 n, other vectors 0.1 n, matrices n / sqrt(fan_in).

    The published init (std 0.02 matrices, unit gains, zero biases) would leave gains and biases
    unchecked by a parity test; these draws make every parameter matter. `scales` overrides the
    std of named matrices.
    """
    gains = {id(m.weight) for m in model.modules() if isinstance(m, off.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(skip):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if id(p) in gains:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (scales or {}).get(name, 1 / math.sqrt(p.shape[-1])))


def random_tracks(off, gen, B, V, T, N, img_size):
    """(B, V, T, N, 2) normalized (row, col) tracks starting on the published query grid (column-major).

    Half the points stay still (most of a real scene does); the others take random steps of a few
    pixels, some beyond the 7-pixel window edge so the class clamping is exercised.
    """
    start = off.grid_queries(views=V, n_tracks=N, device="cpu").standard()[:, None]  # (V, 1, N, 2) (row, col)
    steps = 3.0 * torch.randn(B, V, T - 1, N, 2, generator=gen)  # pixels
    steps = steps * (torch.rand(B, V, 1, N, 1, generator=gen) < 0.5)  # half of the points move
    steps = steps * 2 / torch.tensor(img_size, dtype=torch.float32)  # -> normalized units
    traj = torch.cat([start.expand(B, V, 1, N, 2), start + torch.cumsum(steps, dim=2)], dim=2)
    return traj.clamp(-1, 1)  # as the published normalize_traj clamps


def top2_gap(logits):
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def rounding_margin(bounded):
    """Distance of FSQ's bounded latents from a rounding boundary (x.5)."""
    return float((bounded - bounded.floor() - 0.5).abs().min())


# -----------------------------------------------------------------------------
# The three models and the vision encoder


def build_models(off, tok_cfg, fwd_cfg, inv_cfg):
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    torch.manual_seed(WEIGHT_SEED)  # the published constructors draw with the global generator
    views = len(tok_cfg.cond_cameraviews)
    tok = off.MotionTokenizer(tok_cfg).eval()
    # Velocities are ~0.05 in normalized units: a larger input projection lets them, not just the
    # biases and positions, decide the codes, so a wrong point order or axis shows in the codes.
    randomize(tok, off, gen, scales={"encoder.encoder_proj.weight": 2.0})
    fwd_args = {
        "hidden_dim": tok_cfg.hidden_dim,
        "img_dim": 512,
        "text_dim": SMALL["text_dim"],
        "cond_seq_len": SMALL["img_tokens_per_view"] * views + 1,
        "pred_seq_len": tok_cfg.track_pred_horizon - 1,
        "codebook_size": tok_cfg.codebook_size,
    }
    # As train_forward_dynamics.py builds it: the tokenizer's FSQ module is shared, so the forward
    # model's state dict holds quantize.* too (the same tensors as the tokenizer's).
    fwd = off.ForwardDynamics(trunk_cfg=fwd_cfg.forward_dynamics.transformer, quantize=tok.quantize, **fwd_args).eval()
    randomize(fwd, off, gen, skip=("quantize.",))
    inv = off.InverseDynamics(tok_cfg, inv_cfg).eval()
    randomize(inv, off, gen)
    return tok, fwd, inv, fwd_args


def run_tokenizer(off, tok, tok_cfg, gen):
    B, V, T, N = SMALL["batch"], len(tok_cfg.cond_cameraviews), tok_cfg.track_pred_horizon, tok_cfg.num_tracks
    img_size = tuple(tok_cfg.img_shape)
    traj = random_tracks(off, gen, B, V, T, N, img_size)  # (B, V, T, N, 2)
    vel = off.points_to_velocities(traj, time_dim=2)  # (B, V, T-1, N, 2), as train_motion_tokenizer.py
    with torch.no_grad():
        z = tok.encode(vel)  # (B, L, D): encoder output before FSQ
        bounded = tok.quantize.bound(tok.quantize.project_in(z))  # (B, L, levels)
        codes, indices = tok.quantize(z)  # project_out(FSQ codes) (B, L, D), indices (B, L)
        velocities_recon, logits = tok.decode(codes)  # (B, V, L, N, 2) argmax readout, (B, V*L*N, W*W)
        loss = tok.get_loss(x_recon=velocities_recon, rel_logits=logits, gt_vel=vel, gt_traj=traj)
        target = off.get_autoregressive_indices_efficient(traj[:, :, :-1], traj[:, :, 1:], img_size=img_size,
                                                          rel_img_size=tok_cfg.loss.rel_cls_img_size)["relative"]
        traj_recon = off.velocities_to_points(velocities_recon, time_dim=2, init_points=traj[:, :, [0]])
        # the point order matters: transposing the 4x4 grid of the input must change the codes
        g = int(math.isqrt(N))
        moved = rearrange(vel, "b v t (c r) d -> b v t (r c) d", c=g)
        order_sensitive = int((tok.quantize(tok.encode(moved))[1] != indices).sum())
    inputs = {"traj": traj, "velocities": vel}
    outputs = {"z": z, "fsq_codes": tok.quantize._indices_to_codes(indices).float(), "codes": codes,
               "indices": indices, "logits": logits, "target_classes": target,
               "velocities_recon": velocities_recon, "traj_recon": traj_recon, "loss": loss}
    margins = {"fsq_rounding": rounding_margin(bounded), "decoder_argmax": top2_gap(logits)}
    return inputs, outputs, margins, order_sensitive


def run_forward(fwd, tok_cfg, tok_out, gen):
    B, S, views = SMALL["batch"], SMALL["img_tokens_per_view"], len(tok_cfg.cond_cameraviews)
    # ResNet features are post-ReLU, so non-negative; (B, V*S, 512), view-major, cells row-major
    image_tokens = torch.relu(torch.randn(B, views * S, 512, generator=gen))
    text_emb = 0.2 * torch.randn(B, 1, SMALL["text_dim"], generator=gen)  # stands in for T5-small's first token
    targets = tok_out["indices"].long()  # the tokenizer's codes of the same windows, as in training
    calls = []
    hook = fwd.unembed.register_forward_hook(lambda mod, args, out: calls.append(out.detach()))
    with torch.no_grad():
        pred_indices, loss = fwd({"image": image_tokens}, {"text_emb": text_emb}, targets=targets)
        logits = calls[-1]  # (B, L, K) teacher-forced
        calls.clear()
        ar_indices, _ = fwd({"image": image_tokens}, {"text_emb": text_emb})  # argmax, one step at a time
        ar_gap = min(top2_gap(c) for c in calls)
    hook.remove()
    inputs = {"image_tokens": image_tokens, "text_emb": text_emb, "targets": targets}
    outputs = {"logits": logits, "loss": loss, "pred_indices": pred_indices, "ar_indices": ar_indices}
    return inputs, outputs, {"teacher_forced_argmax": top2_gap(logits), "autoregressive_argmax": ar_gap}


def run_inverse(inv, tok, tok_cfg, tok_in, tok_out, gen):
    B, S, views = SMALL["batch"], SMALL["img_tokens_per_view"], len(tok_cfg.cond_cameraviews)
    # (B, S, V*512): the views stacked in the embedding, as train_inverse_dynamics.py arranges them
    image_tokens = torch.relu(torch.randn(B, S, views * 512, generator=gen))
    proprio = torch.randn(B, 1, inv.cfg.proprio_dim, generator=gen)
    actions = 1.8 * torch.rand(B, inv.action_pred_horizon, inv.cfg.action_dim, generator=gen) - 0.9
    with torch.no_grad():
        codes, _ = tok.quantize(tok.encode(tok_in["velocities"]))  # ground-truth codes, as in training
        batch = {"img_tokens": image_tokens, "proprioception": proprio, "codes": codes}
        dist = inv(batch)
        loss = inv.loss_fn(dist, actions)
        nll = inv.head.loss(dist, actions)  # (B, T, A) before the discount and the mean
    inputs = {"image_tokens": image_tokens, "proprio": proprio, "code_indices": tok_out["indices"],
              "codes": codes, "actions": actions}
    std = dist.scale.flatten()[0]  # the fixed std (0.1), broadcast by the distribution to the mean's shape
    outputs = {"mean": dist.mean, "std": std, "nll": nll, "loss": loss}
    return inputs, outputs


def resnet_recipe(state):
    """How to redraw each float tensor of the ResNet-18 state dict: offset + scale * randn/rand(shape)
    from torch.Generator().manual_seed(seed). Convolutions He-normal; BatchNorm gains near 1, shifts
    and running means near 0, running variances in [1, 1.5)."""
    recipe = []
    for i, (key, t) in enumerate(state.items()):
        if not t.is_floating_point():
            continue  # num_batches_tracked
        if t.ndim == 4:
            kind, offset, scale = "normal", 0.0, math.sqrt(2.0 / t[0].numel())
        elif key.endswith("running_var"):
            kind, offset, scale = "uniform", 1.0, 0.5
        elif key.endswith("weight"):
            kind, offset, scale = "normal", 1.0, 0.1
        else:
            kind, offset, scale = "normal", 0.0, 0.1
        recipe.append({"key": key, "shape": list(t.shape), "kind": kind, "seed": RESNET_SEED + i,
                       "offset": offset, "scale": scale})
    return recipe


def recipe_tensor(entry):
    g = torch.Generator().manual_seed(entry["seed"])
    draw = torch.randn if entry["kind"] == "normal" else torch.rand
    return entry["offset"] + entry["scale"] * draw(entry["shape"], generator=g)


def run_vision(off, fwd_cfg, gen):
    cfg = dict(plain(fwd_cfg.forward_dynamics.vision_encoder), pretrained=False)
    venc = off.VisionEncoder(**cfg).eval()  # img_size 224: 128 px images are resized to 224
    state = venc.state_dict()  # model.* (the ResNet as an nn.Sequential), as a bundle's img_encoder.model.*
    recipe = resnet_recipe(state)
    for entry in recipe:
        state[entry["key"]] = recipe_tensor(entry)
    venc.load_state_dict(state)
    checksums = {e["key"]: [float(state[e["key"]].double().sum()), float(state[e["key"]].double().abs().sum())]
                 for e in recipe}
    # smooth random pictures: low-resolution noise, upsampled, as uint8 frames arrive
    low = torch.rand(1, 2, 3, 16, 16, generator=gen)
    big = torch.nn.functional.interpolate(low.flatten(0, 1), size=(128, 128), mode="bilinear", align_corners=False)
    images = (rearrange(big, "(b v) c h w -> b v h w c", v=2) * 255).round().to(torch.uint8)  # (1, V, 128, 128, 3)
    with torch.no_grad():
        tokens = venc(rearrange(images, "b v h w c -> (b v) h w c").float() / 255)  # (B*V, 49, 512)
    config = {"vision_encoder": cfg, "seq_len": venc.seq_len, "embed_dim": venc.embed_dim, "img_size": venc.img_size}
    return config, recipe, checksums, {"images": images}, {"tokens": tokens}


# -----------------------------------------------------------------------------
# Parameter counts at the paper config (the published YAMLs as they are)


def count_params(off, path):
    O = off.OmegaConf
    tok_cfg = O.load(os.path.join(path, "cfg", "train_motion_tokenizer.yaml"))
    fwd_cfg = O.load(os.path.join(path, "cfg", "train_forward_dynamics.yaml"))
    inv_cfg = O.load(os.path.join(path, "cfg", "train_inverse_dynamics.yaml"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tok = off.MotionTokenizer(tok_cfg)
    venc = off.VisionEncoder(**dict(plain(fwd_cfg.forward_dynamics.vision_encoder), pretrained=False))
    views = len(tok_cfg.cond_cameraviews)
    fwd = off.ForwardDynamics(trunk_cfg=fwd_cfg.forward_dynamics.transformer, hidden_dim=tok_cfg.hidden_dim,
                              img_dim=venc.embed_dim, text_dim=512, cond_seq_len=venc.seq_len * views + 1,
                              pred_seq_len=tok_cfg.track_pred_horizon - 1, codebook_size=tok_cfg.codebook_size,
                              quantize=tok.quantize)
    inv_cfg.num_img_tokens, inv_cfg.img_embed_dim, inv_cfg.text_embed_dim = venc.seq_len, venc.embed_dim * views, 512
    inv = off.InverseDynamics(tok_cfg, inv_cfg)
    fsq, resnet = n(tok.quantize), n(venc)
    rows = [
        ("tokenizer (incl. FSQ project_in/out)", n(tok)),
        ("  of which FSQ project_in + project_out", fsq),
        ("forward, as its module counts (incl. the shared FSQ)", n(fwd)),
        ("forward without the shared FSQ", n(fwd) - fsq),
        ("forward without FSQ + ResNet-18 (frozen, not in its checkpoint)", n(fwd) - fsq + resnet),
        ("inverse (Gaussian head)", n(inv)),
        ("inverse + ResNet-18", n(inv) + resnet),
        ("ResNet-18 feature extractor (timm, no pool/fc)", resnet),
    ]
    print()
    for name, count in rows:
        print(f"{name:66s} {count:>12,d}  {count / 1e6:6.2f}M")


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="path to a clone of pairlab/AMPLIFY (f4bcc46)")
    p.add_argument("--out", default=os.path.join(HERE, "fixture.pt"), help="where to write the fixture")
    p.add_argument("--count-params", action="store_true", help="print the paper-config parameter counts and exit")
    args = p.parse_args()

    off = load_official(args.official)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.count_params:
        count_params(off, args.official)
        return

    tok_cfg, fwd_cfg, inv_cfg = configs(off, args.official)
    tok, fwd, inv, fwd_args = build_models(off, tok_cfg, fwd_cfg, inv_cfg)
    for attempt in range(50):  # redraw inputs until no decision sits on a rounding or argmax tie
        gen = torch.Generator().manual_seed(INPUT_SEED + attempt)
        tok_in, tok_out, tok_margins, order_sensitive = run_tokenizer(off, tok, tok_cfg, gen)
        fwd_in, fwd_out, fwd_margins = run_forward(fwd, tok_cfg, tok_out, gen)
        margins = {**tok_margins, **fwd_margins}
        if min(margins.values()) >= MIN_MARGIN:
            break
    else:
        sys.exit(f"no input draw kept every margin above {MIN_MARGIN}: {margins}")
    inv_in, inv_out = run_inverse(inv, tok, tok_cfg, tok_in, tok_out, gen)
    vis_config, recipe, checksums, vis_in, vis_out = run_vision(off, fwd_cfg, gen)

    fixture = {
        "meta": {
            "official_repo": "pairlab/AMPLIFY",
            "official_commit": git_commit(args.official),
            "versions": versions(),
            "torchvision_import": off.torchvision_note,
            "small": dict(SMALL),
            "seeds": {"weights": WEIGHT_SEED, "inputs": INPUT_SEED + attempt, "resnet": RESNET_SEED},
            "margins": margins,
            "tokenizer_order_sensitive_codes": order_sensitive,
            "dtype": "float32, CPU, every model in eval() (dropout off)",
        },
        "tokenizer": {"config": plain(tok_cfg), "state_dict": tok.state_dict(), "inputs": tok_in, "outputs": tok_out},
        "forward": {"config": plain(fwd_cfg),
                    "args": {**fwd_args, "trunk_cfg": plain(fwd_cfg.forward_dynamics.transformer)},
                    "state_dict": fwd.state_dict(), "inputs": fwd_in, "outputs": fwd_out},
        "inverse": {"config": plain(inv_cfg), "tokenizer_config": plain(tok_cfg), "state_dict": inv.state_dict(),
                    "inputs": inv_in, "outputs": inv_out},
        "vision": {"config": vis_config, "resnet_recipe": recipe, "resnet_checksums": checksums,
                   "inputs": vis_in, "outputs": vis_out},
    }
    fixture = to_plain(fixture)
    tmp = args.out + ".tmp"
    torch.save(fixture, tmp)
    torch.load(tmp, weights_only=True)  # must load without pickled classes
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.2f} MB, margins {margins}, "
          f"{order_sensitive} of {tok_out['indices'].numel()} codes change when the point grid is transposed")


def to_plain(x):
    """Detached, contiguous tensors and plain containers only (weights_only loading)."""
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if torch.is_tensor(x):
        return x.detach().clone().contiguous()
    if isinstance(x, str):
        return str(x)  # torch.__version__ is a str subclass that weights_only refuses
    return x


if __name__ == "__main__":
    main()
