"""Throughput of the learned denoiser D(x; σ) in ensemble members per second, against the batch size.

CPU: float32 eager against torch.compile (compile time printed apart). CUDA, when available: float32 and bfloat16
autocast, eager and compiled, with the FLOP/s reached as a fraction of the GPU's peak (FLOPs counted by
torch.utils.flop_counter on one forward pass; H200 peaks by default: 989 TFLOP/s dense bf16, 495 TFLOP/s dense
TF32, which cuDNN uses for float32 convolutions by default). One call = `LearnedPrior.denoise` on a float32 batch on
the model's device; the time is the best of `--repeats`, each averaged over enough calls to last 0.2 s. Usage:
    python benchmarks/bench_denoiser.py [--checkpoint builtin:ns32|prior.pt|none] [--batches 1,4,16,64,256]
                                        [--no-compile]
The default is the shipped prior (32^2, 16 channels). With --checkpoint none: a randomly initialised UNet sized by
the options (default 32^2, 32 channels, mult 1,2,2, 1 block,
attention at 8^2); its speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from enkg_dist.priors.learned import LearnedPrior
from enkg_dist.priors.unet import EDMDenoiser, UNetConfig


def call_time(fn, sync, repeats: int) -> float:
    """Seconds per call: best of `repeats`, each averaged over enough calls to last 0.2 s."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def forward_flops(model: EDMDenoiser, batch: int, device) -> float:
    """FLOPs of one forward pass of `batch` members (convolutions, matmuls, attention; 2 per multiply-add)."""
    x = torch.zeros(batch, *model_shape(model), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.ones(batch, device=device))
    return float(counter.get_total_flops())


def model_shape(model: EDMDenoiser) -> tuple[int, int, int]:
    c = model.config
    return (c.in_channels, c.resolution, c.resolution)


def build(args) -> EDMDenoiser:
    if args.checkpoint != "none":
        return LearnedPrior.from_checkpoint(args.checkpoint, device="cpu").model
    mult = tuple(int(m) for m in args.channel_mult.split(","))
    cfg = UNetConfig(resolution=args.resolution, model_channels=args.model_channels, channel_mult=mult,
                     num_blocks=args.num_blocks,
                     attn_resolutions=tuple(int(r) for r in args.attn.split(",") if r))
    torch.manual_seed(0)
    return EDMDenoiser(cfg).eval()


def measure(model, device, precision, compile_, batches, repeats) -> tuple[dict[int, float], float]:
    """{batch: members/s} and the seconds spent in the first call (compilation, when compiled)."""
    prior = LearnedPrior(model, device=device, precision=precision, compile=compile_, max_batch=max(batches))
    sync = torch.cuda.synchronize if prior.device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    prior.denoise(torch.randn(batches[0], *model_shape(model), generator=gen).to(prior.device), 1.0)
    sync()
    first = time.perf_counter() - t0
    out = {}
    for b in batches:
        x = torch.randn(b, *model_shape(model), generator=gen).to(prior.device)
        out[b] = b / call_time(lambda: prior.denoise(x, 1.0), sync, repeats)
    return out, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="builtin:ns32", help="a checkpoint, builtin:NAME, or none")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--model-channels", type=int, default=32)
    ap.add_argument("--channel-mult", default="1,2,2")
    ap.add_argument("--num-blocks", type=int, default=1)
    ap.add_argument("--attn", default="8", help="attention resolutions, comma-separated")
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H200: 989)")
    ap.add_argument("--peak-tflops-fp32", type=float, default=495.0, help="GPU dense TF32 peak (H200: 495)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    model = build(args)
    cfg = model.config
    flops = forward_flops(model, 1, "cpu")  # per member: the count is linear in the batch
    params = sum(p.numel() for p in model.parameters())
    print(f"UNet {cfg.resolution}^2 channels={cfg.model_channels} mult={list(cfg.channel_mult)} "
          f"blocks={cfg.num_blocks} attn={list(cfg.attn_resolutions)} params={params} "
          f"forward={flops / 1e9:.3f} GFLOP/member; CPU threads={torch.get_num_threads()}")

    eager, _ = measure(model, "cpu", "float32", False, batches, args.repeats)
    compiled, first = (None, 0.0) if args.no_compile else measure(model, "cpu", "float32", True, batches, args.repeats)
    print("\nCPU, float32" + ("" if compiled is None else f" (compilation took {first:.0f} s)"))
    print("| batch | eager members/s | eager GFLOP/s | compiled members/s | compiled / eager |")
    print("|---|---|---|---|---|")
    for b in batches:
        c = "- | -" if compiled is None else f"{compiled[b]:.1f} | {compiled[b] / eager[b]:.2f}x"
        print(f"| {b} | {eager[b]:.1f} | {eager[b] * flops / 1e9:.1f} | {c} |", flush=True)

    if not torch.cuda.is_available():
        print("\nno CUDA device: GPU table skipped")
        return
    modes = [("float32", False), ("bfloat16", False)] + ([] if args.no_compile else [("float32", True),
                                                                                       ("bfloat16", True)])
    res = {m: measure(model, "cuda", m[0], m[1], batches, args.repeats)[0] for m in modes}
    peak = {"float32": args.peak_tflops_fp32, "bfloat16": args.peak_tflops}
    print(f"\nCUDA ({torch.cuda.get_device_name()}): members/s and fraction of peak "
          f"(bf16 {args.peak_tflops:g}, TF32 {args.peak_tflops_fp32:g} TFLOP/s)")
    names = [f"{p}{' compiled' if c else ''}" for p, c in modes]
    print("| batch | " + " | ".join(f"{n} members/s | {n} of peak" for n in names) + " | bf16 / fp32 (eager) |")
    print("|---|" + "---|---|" * len(modes) + "---|")
    for b in batches:
        cells = [f"{res[m][b]:.0f} | {res[m][b] * flops / (peak[m[0]] * 1e12):.3f}" for m in modes]
        ratio = res[("bfloat16", False)][b] / res[("float32", False)][b]
        print(f"| {b} | " + " | ".join(cells) + f" | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
