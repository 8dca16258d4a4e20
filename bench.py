"""bench.py: throughput, memory and sampling latency of the three AMPLIFY models and the policy.

  python bench.py --preset paper             # Table 10 sizes; on a GPU under bf16 autocast
  python bench.py --preset cpu --steps 5     # (`python amplify.py --bench ...` runs the same)

Prints `name: value` lines on LIBERO-shaped random inputs (2 views, 128x128, A = 7, P = 9), then
the inverse model with each action head (gaussian, diffusion, flow) against the Gaussian one.
Speed-ups are ratios measured in the same run (cached vs uncached sampling), so they hold on any
machine; absolute figures are only comparable on the same machine.
"""
import argparse
import time
from dataclasses import asdict, replace

import numpy as np
import torch

import amplify as A


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource  # Unix; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, reps):
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_train_step(model, opt, loss_fn, use_amp):
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss = loss_fn(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench(args):
    """Print `name: value` lines for the preset on LIBERO-shaped inputs (2 views, 128x128, A=7, P=9)."""
    preset, device = A.PRESETS[args.preset], args.device
    B = args.batch_size or (preset["train"].batch_size if device.type == "cuda" else 8)
    reps = args.steps or 5
    V, size, A_, P = 2, (128, 128), 7, 9
    torch.manual_seed(args.seed)
    tok_cfg = replace(preset["tokenizer"], views=V, img_size=size)
    fwd_cfg = replace(preset["forward"], views=V, img_size=size, vision=replace(preset["forward"].vision, weights=""))
    inv_cfg = replace(preset["inverse"], views=V, img_size=size, action_dim=A_, proprio_dim=P,
                      vision=replace(preset["inverse"].vision, weights=""))
    models = {"tokenizer": A.MotionTokenizer(tok_cfg), "forward": A.ForwardDynamics(fwd_cfg),
              "inverse": A.InverseDynamics(inv_cfg)}
    start = torch.as_tensor(A.grid_points(tok_cfg.grid))
    steps = torch.randint(-2, 3, (B, V, tok_cfg.T - 1, tok_cfg.grid ** 2, 2)).float() * 2 / size[0]
    tracks = torch.cat([start.expand(B, V, 1, -1, -1), start + steps.cumsum(2)], dim=2).to(device)
    images = torch.randint(0, 256, (B, V, *size, 3), dtype=torch.uint8, device=device)
    tasks = [f"task {i % 4}" for i in range(B)]
    K, L = models["forward"].K, tok_cfg.T - 1
    codes = torch.randint(0, K, (B, L), device=device)
    proprio, actions = torch.randn(B, P, device=device), torch.randn(B, inv_cfg.T, A_, device=device)
    valid = torch.ones(B, inv_cfg.T, device=device)
    losses = {"tokenizer": lambda m: m.loss(tracks)[0],
              "forward": lambda m: m.loss(images, tasks, codes)[0],
              "inverse": lambda m: m.loss(images, proprio, codes, actions, valid)[0]}
    print(f"device: {device} | preset: {args.preset} | batch: {B} | threads: {torch.get_num_threads()}", flush=True)
    use_amp = device.type == "cuda"
    for name, model in models.items():
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: bench_train_step(model, opt, losses[name], use_amp), device, reps)
        print(f"{name}_params: {sum(p.numel() for p in model.parameters())}")
        print(f"{name}_train_samples_per_s: {B / seconds:.2f}")
        print(f"{name}_peak_memory_mb: {peak_memory_mb(device):.0f}", flush=True)
    forward = models["forward"].eval()
    one_image, one_task = images[:1], tasks[:1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        cached = forward.generate(one_image, one_task, use_cache=True)
        uncached = forward.generate(one_image, one_task, use_cache=False)
        t_cached = timed(lambda: forward.generate(one_image, one_task, use_cache=True), device, reps)
        t_uncached = timed(lambda: forward.generate(one_image, one_task, use_cache=False), device, reps)
    print(f"sample_ms_cached: {1000 * t_cached:.1f}")
    print(f"sample_ms_uncached: {1000 * t_uncached:.1f}")
    print(f"kv_cache_speedup: {t_uncached / t_cached:.2f}")
    print(f"kv_cache_identical_codes: {bool(torch.equal(cached, uncached))}", flush=True)
    data = {"views": [f"view{v}" for v in range(V)], "img_size": list(size), "T": tok_cfg.T, "grid": tok_cfg.grid}
    stats = {"actions": {"mean": [0.0] * A_, "std": [1.0] * A_}, "proprio": {"mean": [0.0] * P, "std": [1.0] * P}}
    ckpt = {name: {"stage": name, "format": A.CHECKPOINT_FORMAT, "config": asdict(m.cfg), "model": m.state_dict(),
                   "data": data, "stats": stats} for name, m in models.items()}
    policy = A.Policy(ckpt["inverse"], ckpt["tokenizer"], ckpt["forward"], device=str(device))
    obs, prop = images[0].cpu().numpy(), np.zeros(P, dtype=np.float32)
    t_policy = timed(lambda: policy.act(obs, prop, "task 0"), device, reps)
    print(f"policy_step_ms: {1000 * t_policy:.1f}")
    print(f"policy_hz: {1 / t_policy:.1f}")
    print(f"peak_memory_mb: {peak_memory_mb(device):.0f}", flush=True)
    bench_heads(args, inv_cfg, ckpt, losses["inverse"], (images, proprio, codes), (obs, prop), B, reps, use_amp)


def bench_heads(args, inv_cfg, ckpt, inverse_loss, batch, observation, B, reps, use_amp):
    """The inverse model with each action head: training samples/s, the model's own latency for one chunk,
    and the whole policy step (which adds the forward model's codes), as ratios to the Gaussian head."""
    device = args.device
    images, proprio, codes = batch
    train_rate, inverse_s, step_s = {}, {}, {}
    for head in ("gaussian", "diffusion", "flow"):
        torch.manual_seed(args.seed)
        model = A.InverseDynamics(replace(inv_cfg, head=head)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_rate[head] = B / timed(lambda: bench_train_step(model, opt, inverse_loss, use_amp), device, reps)
        model.eval()
        with torch.no_grad():
            inverse_s[head] = timed(lambda: model(images[:1], proprio[:1], codes[:1]), device, reps)
        policy = A.Policy({**ckpt["inverse"], "config": asdict(model.cfg), "model": model.state_dict()},
                          ckpt["tokenizer"], ckpt["forward"], device=str(device))
        step_s[head] = timed(lambda: policy.act(*observation, "task 0"), device, reps)
        print(f"inverse_{head}_params: {sum(p.numel() for p in model.parameters())}")
        print(f"inverse_{head}_train_samples_per_s: {train_rate[head]:.2f}")
        print(f"inverse_{head}_chunk_ms: {1000 * inverse_s[head]:.1f}")
        print(f"policy_step_ms_{head}: {1000 * step_s[head]:.1f}", flush=True)
        del model, opt, policy
    for head in ("diffusion", "flow"):  # ratios measured in this run: they hold on any machine
        print(f"{head}_vs_gaussian_train_samples_per_s: {train_rate[head] / train_rate['gaussian']:.2f}")
        print(f"{head}_vs_gaussian_inverse_chunk_ms: {inverse_s[head] / inverse_s['gaussian']:.2f}")
        print(f"{head}_vs_gaussian_policy_step_ms: {step_s[head] / step_s['gaussian']:.2f}")


def build_parser():
    p = argparse.ArgumentParser(description="AMPLIFY benchmark: throughput, memory, latency.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(A.PRESETS), default="cpu", help="model sizes")
    p.add_argument("--steps", type=int, help="timed repetitions (default 5)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the preset's on CUDA, else 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="seeds the models and the random inputs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = A.pick_device(args.device)
    bench(args)


if __name__ == "__main__":
    main()
