"""Optional helpers of amplify.py, imported only where a run asks for them, so the method reads plainly.

  - chunked_linear_cross_entropy: the tokenizer's loss when its features are narrower than its 225
    window classes (the cpu preset); the paper preset computes the plain head instead.
  - draw_tracks, label_image, track_picture, plot_curves: pictures of tracks and training curves
    (--vis, the curves at the end of a stage, eval videos). Pillow is imported when one is drawn.
  - DiffusionHead, FlowHead: the inverse model's other action heads (--action-head diffusion | flow),
    ours rather than the published ones (amplify.py holds the published Gaussian head).
  - Tracker: --log-to tensorboard or wandb.

Needs torch, numpy and einops (and Pillow, TensorBoard or wandb for what uses them); imports nothing of
this project, so it can be copied beside amplify.py or left out where those features are not used.
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# -----------------------------------------------------------------------------
# Linear head + cross-entropy in row chunks: the tokenizer's logits are never held whole


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss *and* the gradients chunk by chunk (the loss is a scalar, so the
    backward pass only has to scale them): one pass over the logits instead of the five that
    linear + log_softmax + nll (+ their backward) make over a (M, G*C) tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk_rows, need_grad):
        M, G = target.shape
        C = weight.shape[0] // G
        n = M * G
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # bf16 under autocast
        acc = torch.promote_types(x.dtype, torch.float32)  # the softmax: fp32 at least
        with torch.autocast(dev, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype)
            total = torch.zeros((), dtype=acc, device=x.device)
            if need_grad:
                gx = torch.empty_like(x)
                gw = torch.zeros(weight.shape, dtype=acc, device=x.device)
                gb = torch.zeros(bias.shape, dtype=acc, device=x.device)
            for i in range(0, M, chunk_rows):
                xc, t = x[i:i + chunk_rows].to(dtype), target[i:i + chunk_rows, :, None]  # (m, D), (m, G, 1)
                z = torch.addmm(b, xc, w.t()).to(acc).view(-1, G, C)  # (m, G, C) logits
                z_true = z.gather(-1, t)
                z_max = z.amax(-1, keepdim=True)
                p = z.sub_(z_max).exp_()  # in place: the chunk's logits become unnormalized probabilities
                s = p.sum(-1, keepdim=True)
                total += (z_max + s.log() - z_true).sum()  # sum of -log softmax at the true class
                if need_grad:  # d(mean CE)/d logits = (softmax - onehot) / n
                    p.div_(s).scatter_add_(-1, t, p.new_full(t.shape, -1.0)).mul_(1.0 / n)
                    g = p.view(-1, G * C)  # (m, G*C)
                    gb += g.sum(0)
                    g = g.to(dtype)
                    gx[i:i + chunk_rows] = g @ w
                    gw += g.t() @ xc
        if need_grad:
            ctx.save_for_backward(gx, gw.to(weight.dtype), gb.to(bias.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gx, gw, gb = ctx.saved_tensors
        return gx * grad, gw * grad, gb * grad, None, None, None


def chunked_linear_cross_entropy(x, weight, bias, target, chunk_rows=None):
    """Mean cross-entropy of the linear head `x @ weight.T + bias` against `target`, without ever
    materialising the whole (M, G*C) logits tensor; loss and gradients equal the plain computation.

    x (M, D) features; weight (G*C, D), bias (G*C,): each row of x is classified G times into C
    classes (G = 1: an ordinary head); target (M,) or (M, G) long. Under autocast the matmuls run
    in its dtype, the softmax in fp32. chunk_rows: rows per chunk (default: ~2 MB of logits on CPU).
    """
    target = target.reshape(x.shape[0], -1)  # (M, G)
    M, G = target.shape
    if weight.shape[0] % G or bias.shape != weight.shape[:1] or weight.shape[1] != x.shape[1]:
        raise ValueError(f"chunked_linear_cross_entropy: expected weight ({G}*C, {x.shape[1]}) and bias ({G}*C,), "
                         f"found {tuple(weight.shape)} and {tuple(bias.shape)}")
    budget = 2 ** 19 if x.device.type == "cpu" else 2 ** 26  # logits per chunk: cache-sized on CPU, big on GPUs
    chunk_rows = chunk_rows or max(1, budget // weight.shape[0])
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(x, weight, bias, target, chunk_rows, need_grad)


# -----------------------------------------------------------------------------
# Action heads besides the Gaussian: inputs and losses as amplify.GaussianHead's
# Diffusion and flow sum each step's error over action dims and the weighted steps, averaged over
# the batch (their loss is on a T*A larger scale than the Gaussian's mean).


def discounted_sum(per_step, weights):
    """per_step (B, T), weights (B, T) -> sum_k w_k l_k, averaged over the batch."""
    return (per_step * weights).sum(1).mean()


def timestep_embedding(t, dim, max_period=10_000):
    """t (B,) noise level or flow time -> (B, dim) sinusoids, like positions in a Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# -----------------------------------------------------------------------------
# Diffusion head (Diffusion Policy, Chi et al. 2023): a 1-D temporal U-Net predicts the noise in a chunk
#   forward process  x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps,  eps ~ N(0, I),  k ~ U{0..K-1}
#   loss             sum_t gamma^t || eps_theta(x_k, k, tokens)_t - eps_t ||^2        (DDPM, epsilon target)
#   sampling (DDIM, deterministic), S of the K levels from the top down, k -> k':
#                    x0_hat = clip((x_k - sqrt(1 - abar_k) eps_theta) / sqrt(abar_k))
#                    x_k'   = sqrt(abar_k') x0_hat + sqrt(1 - abar_k') eps_theta       (after level 0: abar = 1)
# Conditioning is per step: token t, with the noise-level embedding appended, sets a FiLM scale and shift of
# the U-Net's features at step t (average-pooled as the U-Net halves the time axis). Diffusion Policy feeds
# one pooled observation vector instead; here the inverse transformer has already made one token per step.

DIFFUSION_CLIP = 1.0  # |x0_hat| bound: actions are scaled to [-1, 1] (Normalizer), as Diffusion Policy clips them


def cosine_alpha_bar(K):
    """squaredcos_cap_v2 (Nichol & Dhariwal 2021): f(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
    beta_k = min(1 - f((k+1)/K) / f(k/K), 0.999), abar_k = prod_{j<=k} (1 - beta_j). Returns abar (K,)."""
    f = torch.cos((torch.arange(K + 1, dtype=torch.float64) / K + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def conv_block(c_in, c_out, kernel):
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(8, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    """conv -> FiLM (a scale and shift per step, from the condition) -> conv, plus a residual path."""

    def __init__(self, c_in, c_out, d_cond, kernel=5):
        super().__init__()
        self.conv1, self.conv2 = conv_block(c_in, c_out, kernel), conv_block(c_out, c_out, kernel)
        self.film = nn.Sequential(nn.Mish(), nn.Conv1d(d_cond, 2 * c_out, 1))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        """x (B, C_in, T'), cond (B, E, T') -> (B, C_out, T')"""
        scale, shift = self.film(cond).chunk(2, dim=1)  # (B, C_out, T') each
        return self.conv2(self.conv1(x) * (1 + scale) + shift) + self.skip(x)


class UNet1D(nn.Module):
    """Diffusion Policy's ConditionalUnet1D layout: per level two FiLM blocks, then halve T; mirrored back up."""

    def __init__(self, action_dim, d_cond, dims):
        super().__init__()
        self.d_time = dims[0]
        self.time_mlp = nn.Sequential(nn.Linear(dims[0], 4 * dims[0]), nn.Mish(), nn.Linear(4 * dims[0], dims[0]))
        E = d_cond + dims[0]
        levels = list(zip((action_dim,) + tuple(dims[:-1]), dims))  # (C_in, C_out) per level
        self.down = nn.ModuleList(  # the deepest level keeps its length
            nn.ModuleList([FiLMResBlock(c_in, c, E), FiLMResBlock(c, c, E),
                           nn.Conv1d(c, c, 3, stride=2, padding=1) if i < len(dims) - 1 else nn.Identity()])
            for i, (c_in, c) in enumerate(levels))
        self.mid = nn.ModuleList([FiLMResBlock(dims[-1], dims[-1], E), FiLMResBlock(dims[-1], dims[-1], E)])
        self.up = nn.ModuleList(
            nn.ModuleList([FiLMResBlock(2 * c, c_in, E), FiLMResBlock(c_in, c_in, E),
                           nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)])
            for c_in, c in reversed(levels[1:]))
        self.out = nn.Sequential(conv_block(dims[0], dims[0], 5), nn.Conv1d(dims[0], action_dim, 1))
        self.stride = 2 ** (len(dims) - 1)

    def forward(self, x, k, tokens):
        """x (B, T, A) noisy chunk, k (B,) noise levels, tokens (B, T, D) -> predicted noise (B, T, A)"""
        T = x.shape[1]
        temb = self.time_mlp(timestep_embedding(k, self.d_time))  # (B, Dt)
        cond = torch.cat([tokens, repeat(temb, "b e -> b t e", t=T)], dim=-1)  # (B, T, E)
        pad = -T % self.stride  # T is halved len(dims) - 1 times: pad it to a multiple, crop after
        x = F.pad(rearrange(x, "b t a -> b a t"), (0, pad), mode="replicate")  # (B, A, T+pad)
        cond = F.pad(rearrange(cond, "b t e -> b e t"), (0, pad), mode="replicate")  # (B, E, T+pad)
        skips = []
        for res1, res2, down in self.down:
            x = res2(res1(x, cond), cond)
            skips.append((x, cond))
            if not isinstance(down, nn.Identity):
                x, cond = down(x), F.avg_pool1d(cond, 2)
        for res in self.mid:
            x = res(x, cond)
        for (res1, res2, up), (skip, c) in zip(self.up, reversed(skips[1:])):  # the top skip goes unused, as in DP
            x = torch.cat([x, skip], dim=1)
            x = up(res2(res1(x, c), c))
        return rearrange(self.out(x)[..., :T], "b a t -> b t a")


class DiffusionHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.K, self.steps, self.action_dim = cfg.diffusion_train_steps, cfg.diffusion_sample_steps, cfg.action_dim
        self.unet = UNet1D(cfg.action_dim, cfg.d_model, cfg.unet_dims)
        self.register_buffer("alpha_bar", cosine_alpha_bar(self.K), persistent=False)

    def loss(self, tokens, actions, weights):
        k = torch.randint(0, self.K, (actions.shape[0],), device=actions.device)
        eps = torch.randn_like(actions)
        ab = self.alpha_bar[k][:, None, None]  # (B, 1, 1)
        err = ((self.unet(ab.sqrt() * actions + (1 - ab).sqrt() * eps, k, tokens) - eps) ** 2).sum(-1)  # (B, T)
        return discounted_sum(err, weights), {"noise_mse": err.mean().detach() / self.action_dim}

    @torch.no_grad()
    def sample(self, tokens, generator=None, steps=None):
        B, T = tokens.shape[:2]
        S = steps or self.steps
        # S levels K // S apart down to 0, as Diffusion Policy's DDIM scheduler spaces them (16 of 100: 90, 84, ..., 0).
        # Starting below the top level matters: at K - 1, abar = 2e-7 and x0_hat would magnify errors 2000-fold.
        levels = torch.arange(S - 1, -1, -1, device=tokens.device) * (self.K // S)
        x = torch.randn(B, T, self.action_dim, device=tokens.device, generator=generator)
        for i, k in enumerate(levels):
            ab = self.alpha_bar[k]
            ab_next = self.alpha_bar[levels[i + 1]] if i + 1 < S else torch.ones_like(ab)
            eps = self.unet(x, k.expand(B), tokens)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-DIFFUSION_CLIP, DIFFUSION_CLIP)
            x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
        return x


# -----------------------------------------------------------------------------
# Flow-matching head (rectified flow on the straight, optimal-transport path; Lipman et al. 2023)
#   path      x_t = (1 - t) x_0 + t x_1,   x_0 ~ N(0, I) noise, x_1 the action chunk, t ~ U[0, 1]
#   loss      sum_k gamma^k || v_theta(x_t, t, tokens)_k - (x_1 - x_0)_k ||^2
#   sampling  dx/dt = v_theta from t = 0 to 1, midpoint rule, h = 1 / steps (the paper: 10 steps):
#             x_{t+h} = x_t + h v_theta(x_t + h/2 v_theta(x_t, t), t + h/2)
# v_theta is a small DiT over the chunk's T steps: self-attention, cross-attention to the inverse
# transformer's T tokens, MLP. The flow time enters through adaptive LayerNorm: a shift, scale and
# gate per sublayer, the gate starting at zero so each block starts as the identity (adaLN-Zero).


class DiTBlock(nn.Module):
    def __init__(self, d, n_head, dropout, attention):
        super().__init__()
        self.attn, self.cross = attention(d, n_head, dropout), attention(d, n_head, dropout, cross=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=False) for _ in range(3))
        self.ada = nn.Linear(d, 9 * d)  # (shift, scale, gate) for each of the three sublayers
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, tokens, temb):
        """x (B, T, D) chunk features, tokens (B, T, D) to attend to, temb (B, D) flow-time embedding"""
        mods = rearrange(self.ada(F.silu(temb)), "b (n three d) -> n three b 1 d", n=3, three=3)
        sublayers = (self.attn, lambda h: self.cross(h, context=tokens), self.mlp)
        for norm, f, (shift, scale, gate) in zip(self.norms, sublayers, mods):
            x = x + gate * f(norm(x) * (1 + scale) + shift)
        return x


class FlowHead(nn.Module):
    """`attention`: amplify.Attention (its self- and cross-attention, passed in: this file imports nothing of amplify)."""

    def __init__(self, cfg, attention):
        super().__init__()
        D, self.steps, self.action_dim = cfg.d_model, cfg.flow_steps, cfg.action_dim
        self.inp = nn.Linear(cfg.action_dim, D)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.T, D))
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.n_head, cfg.dropout, attention) for _ in range(cfg.dit_layers))
        self.ln_f = nn.LayerNorm(D)
        self.out = nn.Linear(D, cfg.action_dim)

    def velocity(self, x, t, tokens):
        """x (B, T, A) a point on the path, t (B,) in [0, 1], tokens (B, T, D) -> v (B, T, A)"""
        temb = self.time_mlp(timestep_embedding(1000 * t, self.pos.shape[1]))  # t on the scale of noise levels
        h = self.inp(x) + self.pos  # (B, T, D)
        for block in self.blocks:
            h = block(h, tokens, temb)
        return self.out(self.ln_f(h))

    def loss(self, tokens, actions, weights):
        x0 = torch.randn_like(actions)
        t = torch.rand(actions.shape[0], device=actions.device)
        xt = torch.lerp(x0, actions, t[:, None, None])  # (1 - t) x0 + t x1
        err = ((self.velocity(xt, t, tokens) - (actions - x0)) ** 2).sum(-1)  # (B, T)
        return discounted_sum(err, weights), {"velocity_mse": err.mean().detach() / self.action_dim}

    @torch.no_grad()
    def sample(self, tokens, generator=None, steps=None):
        B, T = tokens.shape[:2]
        steps = steps or self.steps
        x = torch.randn(B, T, self.action_dim, device=tokens.device, generator=generator)
        h = 1.0 / steps
        for i in range(steps):
            t = torch.full((B,), i * h, device=tokens.device)
            x_mid = x + h / 2 * self.velocity(x, t, tokens)
            x = x + h * self.velocity(x_mid, t + h / 2, tokens)
        return x


# -----------------------------------------------------------------------------
# Pictures of tracks and curves


def draw_tracks(image, tracks, color=None, fade=True, min_motion_px=1.0):
    """image uint8 (H, W_img, 3), tracks (T, N, 2) normalized -> a copy with each track drawn as a polyline.

    Colour follows the point's start position (hue by x) unless `color` is given; with `fade`,
    older steps are dimmer so the direction of motion reads at a glance. Points that move less
    than `min_motion_px` are not drawn: on a 20x20 grid they would cover the image.
    """
    from PIL import Image, ImageDraw

    tracks = np.asarray(tracks, dtype=np.float32)
    h, w = np.shape(image)[:2]
    px = (tracks + 1) * np.array([w, h], dtype=np.float32) / 2 - 0.5  # (T, N, 2) pixel centres
    moving = np.abs(px - px[:1]).max(axis=(0, 2)) >= min_motion_px
    px = np.rint(px[:, moving])
    T, N = px.shape[:2]
    if color is None:
        hue = (tracks[0, moving, 0] + 1) / 2
        colors = np.stack([np.clip(np.abs(hue * 6 - 3) - 1, 0, 1), np.clip(2 - np.abs(hue * 6 - 2), 0, 1),
                           np.clip(2 - np.abs(hue * 6 - 4), 0, 1)], -1) * 255  # (N, 3) hue wheel
    else:
        colors = np.tile(np.asarray(color, dtype=np.float32), (N, 1))
    canvas = Image.fromarray(np.array(image, dtype=np.uint8))
    pen = ImageDraw.Draw(canvas)
    for t in range(T - 1):
        strength = (0.4 + 0.6 * (t + 1) / (T - 1)) if fade else 1.0
        for n in range(N):
            pen.line([tuple(px[t, n]), tuple(px[t + 1, n])], fill=tuple(int(c) for c in colors[n] * strength))
    return np.asarray(canvas)


def label_image(image, text, height=12):
    """uint8 (H, W_img, 3) -> the same with a black strip of `height` px on top holding `text`."""
    from PIL import Image, ImageDraw

    image = np.asarray(image, dtype=np.uint8)
    strip = Image.new("RGB", (image.shape[1], height))
    ImageDraw.Draw(strip).text((2, 0), text, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), image], axis=0)


def plot_curves(title, log_rows, eval_rows, reference=None, panel=(300, 150)):
    """The training loss and each held-out metric against the step, one small panel each, as a PNG
    (Pillow only), uint8 (H, W_img, 3). `reference` = (name, {metric: value}) draws the trivial score
    as an orange line. None when there is nothing to plot."""
    from PIL import Image, ImageDraw

    series = [("train loss", [r["step"] for r in log_rows], [r["loss"] for r in log_rows], None)]
    ref_name, ref = reference or ("", {})
    for key in (eval_rows[0] if eval_rows else {}):
        if key != "step":
            series.append((f"held-out {key}", [r["step"] for r in eval_rows], [r[key] for r in eval_rows], ref.get(key)))
    series = [s for s in series if len(s[1])]
    if not series:
        return None
    cols = 2 if len(series) > 1 else 1
    rows = -(-len(series) // cols)
    pw, ph = panel
    canvas = Image.new("RGB", (cols * pw, 16 + rows * ph), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 2), f"{title}: x = step" + (f"; orange line: {ref_name}" if ref else ""), fill="black")
    for i, (name, xs, ys, ref_value) in enumerate(series):
        x0, y0 = (i % cols) * pw, 16 + (i // cols) * ph
        left, top, right, bottom = x0 + 46, y0 + 14, x0 + pw - 8, y0 + ph - 16
        values = [v for v in list(ys) + [ref_value] if v is not None and math.isfinite(v)] or [0.0]
        lo, hi = min(values), max(values)
        if hi - lo <= 1e-6 * max(1.0, abs(lo)):  # a flat curve: centre it (lo + 1e-9 == lo for large lo)
            pad = 0.01 * max(1.0, abs(lo))
            lo, hi = lo - pad, hi + pad
        sx = lambda x: left + (x - xs[0]) / max(1, xs[-1] - xs[0]) * (right - left)  # noqa: E731
        sy = lambda y: bottom - (y - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        pen.rectangle([left, top, right, bottom], outline=(180, 180, 180))
        pen.text((x0 + 4, y0 + 1), name, fill="black")
        pen.text((x0 + 2, top - 2), f"{hi:.3g}", fill="black")
        pen.text((x0 + 2, bottom - 10), f"{lo:.3g}", fill="black")
        pen.text((left, bottom + 2), str(xs[0]), fill="black")
        pen.text((right - 6 * len(str(xs[-1])), bottom + 2), str(xs[-1]), fill="black")
        if ref_value is not None and math.isfinite(ref_value):
            pen.line([(left, sy(ref_value)), (right, sy(ref_value))], fill=(230, 120, 0), width=2)
        points = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            pen.line(points, fill=(30, 90, 200), width=2)
        for x, y in points if len(points) <= 30 else points[-1:]:
            pen.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
    return np.asarray(canvas)


def track_picture(images, gt, pred, views):
    """images (V, H, W_img, 3) uint8, gt and pred (V, T, N, 2) tracks -> one picture: left true, right
    predicted, one row per view, each panel labelled with the view name, upscaled so small images are legible."""
    scale = max(1, 128 // images.shape[1])
    up = lambda im: np.kron(im, np.ones((scale, scale, 1), dtype=np.uint8))  # noqa: E731
    rows = [np.concatenate([label_image(up(draw_tracks(images[v], gt[v])), f"{view}: true"),
                            label_image(up(draw_tracks(images[v], pred[v])), f"{view}: predicted")], axis=1)
            for v, view in enumerate(views)]
    return np.concatenate(rows, axis=0)


# -----------------------------------------------------------------------------
# Experiment tracking


class Tracker:
    """--log-to: the JSONL's rows (train/...), the held-out metrics (val/...), the --vis pictures and
    the curves, also sent to TensorBoard or Weights & Biases. The JSONL stays the source of truth;
    the package is imported only when asked for. W&B runs offline (OUT/wandb; `wandb sync` uploads)
    unless WANDB_MODE says otherwise, so a run never waits on the network or a login."""

    def __init__(self, kind, out, label, config):
        self.kind = kind
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tensorboard", label))
        elif kind == "wandb":
            import wandb
            self.wandb = wandb
            self.run = wandb.init(project="amplify", name=label, group=os.path.basename(os.path.abspath(out)),
                                  dir=out, config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def scalars(self, prefix, row, step):
        values = {f"{prefix}/{k}": float(v) for k, v in row.items() if k != "step"}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.run.log(values, step=step)

    def image(self, name, path, step):
        """A PNG this run wrote (a --vis picture, the curves), if it was written."""
        if not self.kind or not os.path.exists(path):
            return
        from PIL import Image
        image = np.asarray(Image.open(path).convert("RGB"))  # (H, W_img, 3)
        if self.kind == "tensorboard":
            self.writer.add_image(name, image, step, dataformats="HWC")
        else:
            self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.run.finish()
