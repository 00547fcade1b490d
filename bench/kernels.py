"""Benchmark fused_logprobs (forward + backward) against naive log_softmax and a bare-GEMM floor.

    python bench/kernels.py               # CUDA: N=16384 tokens, (H, V) in {(896, 151936), (3584, 152064)}, bf16
    python bench/kernels.py --cpu         # CPU: N=2048, (H, V) in {(256, 2048), (576, 49152), (896, 151936)}, float32
    python bench/kernels.py --cpu-smoke   # tiny float32 shapes on CPU, to check the script runs

Rows: naive = log_softmax((h @ W.T).float()).gather (log-probs only, full (N, V) logits); torch / triton =
fused_logprobs(..., return_entropy=True, impl=...) with a loss on log-probs *and* entropy; gemm floor = the
three bare GEMMs any method needs (h @ W.T, dlogits @ W, dlogits.T @ h) and nothing else; "bytes" (--cpu) = the
torch path with chunks of CHUNK_BYTES of logits whatever their row count (as before rlkit.kernels.logprobs.CHUNK_ROWS).
"extra" is the peak allocated memory during forward + backward above the inputs, not counting the gradients
returned. Errors are max |log p - reference| and max |entropy - reference| against float64 over the same (rounded)
inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# this checkout first; rlkit.kernels, .rewards, .rollout and .envs still come from the install (pip install -e .)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlkit.kernels import fused_logprobs  # noqa: E402
from rlkit.kernels.logprobs import CHUNK_BYTES  # noqa: E402

TARGET_MS = {896: 30.0, 3584: 110.0}  # triton path, H100, forward + backward at N = 16384
TARGET_EXTRA_GIB = 0.5
GIB = 2**30


def naive(h, w, t):
    logp = torch.log_softmax((h @ w.T).float(), -1)  # (N, V) float32, plus the bf16 logits under it
    return logp.gather(1, t[:, None])[:, 0], None


def fused(impl):
    return lambda h, w, t: fused_logprobs(h, w, t, return_entropy=True, impl=impl)


def bytes_chunks(h, w, t):
    """The torch path chunked by CHUNK_BYTES of float32 logits alone (its default before CHUNK_ROWS)."""
    rows = max(1, CHUNK_BYTES // (4 * w.shape[0]))
    return fused_logprobs(h, w, t, return_entropy=True, impl="torch", chunk_size=rows)


def gemm_floor(h, w, t):
    # not a log-prob: the three GEMMs, with the logits standing in for dlogits
    logits = h @ w.T
    return logits, (logits @ w, logits.T @ h)


def fwd_bwd(fn, h, w, t, coef):
    """One forward + backward; returns (log-probs, entropy or None, (grad_h, grad_w))."""
    if fn is gemm_floor:
        _, grads = gemm_floor(h, w, t)
        return None, None, grads
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    lp, ent = fn(h, w, t)
    loss = (lp * coef).sum() + (0.01 * ent.sum() if ent is not None else 0.0)
    return lp.detach(), None if ent is None else ent.detach(), torch.autograd.grad(loss, (h, w))


def reference(h, w, t, rows=256):
    """float64 log-probs and entropy of the given (rounded) inputs, a chunk of rows at a time."""
    w64 = w.double()
    lp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    ent = torch.empty_like(lp)
    for r in range(0, h.shape[0], rows):
        logp = torch.log_softmax(h[r : r + rows].double() @ w64.T, -1)
        lp[r : r + rows] = logp.gather(1, t[r : r + rows, None])[:, 0]
        ent[r : r + rows] = -(logp.exp() * logp).sum(-1)
    return lp, ent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(call, device, reps, warmup=2):
    """Median wall time of `call` in ms (CUDA events on GPU; the first calls also autotune)."""
    for _ in range(warmup):
        call()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def extra_gib(call, device):
    """Peak memory of one call above what was allocated before it, less the gradients it returns."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _, _, grads = call()
    sync(device)
    kept = sum(g.numel() * g.element_size() for g in grads)
    return (torch.cuda.max_memory_allocated(device) - base - kept) / GIB


def bench_shape(n, hdim, vocab, dtype, device, impls, reps):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hdim, device=device, generator=g).to(dtype)
    w = (torch.randn(vocab, hdim, device=device, generator=g) / hdim**0.5).to(dtype)
    t = torch.randint(0, vocab, (n,), device=device, generator=g)
    coef = torch.randn(n, device=device, generator=g)
    ref_lp, ref_ent = reference(h, w, t)
    rows = []
    for name, fn in impls:
        call = lambda: fwd_bwd(fn, h, w, t, coef)  # noqa: E731
        ms = time_ms(call, device, reps)
        with torch.no_grad():
            fwd = time_ms(lambda: fn(h, w, t), device, reps) if fn is not gemm_floor else float("nan")  # noqa: B023
        extra = extra_gib(call, device)
        lp, ent, _ = call()
        err_lp = (lp.double() - ref_lp).abs().max().item() if lp is not None else float("nan")
        err_ent = (ent.double() - ref_ent).abs().max().item() if ent is not None else float("nan")
        rows.append((name, ms, fwd, extra, err_lp, err_ent))
        del lp, ent
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(n, hdim, vocab, dtype, rows):
    print(f"\nN={n} H={hdim} V={vocab} {str(dtype).removeprefix('torch.')}")
    print(f"{'impl':<8}{'fwd+bwd ms':>12}{'x naive':>9}{'fwd ms':>9}{'extra GiB':>11}{'x naive':>9}"
          f"{'max|dlogp|':>12}{'max|dent|':>11}")
    base = {r[0]: r for r in rows}.get("naive")
    for name, ms, fwd, extra, err_lp, err_ent in rows:
        r_ms = ms / base[1] if base else float("nan")
        r_mem = extra / base[3] if base and base[3] == base[3] and base[3] > 0 else float("nan")
        print(f"{name:<8}{ms:>12.2f}{r_ms:>9.2f}{fwd:>9.2f}{extra:>11.3f}{r_mem:>9.3f}{err_lp:>12.2e}{err_ent:>11.2e}")


def check_targets(hdim, rows):
    for name, ms, _, extra, _, _ in rows:
        if name == "triton" and hdim in TARGET_MS:
            ok = ms <= TARGET_MS[hdim] and extra <= TARGET_EXTRA_GIB
            print(f"target (triton <= {TARGET_MS[hdim]:.0f} ms, extra <= {TARGET_EXTRA_GIB} GiB): "
                  f"{'met' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="float32 on CPU, the torch path's chunking against bytes")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny float32 shapes on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="N (default 16384, or 256 with --cpu-smoke)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    args = parser.parse_args()
    from rlkit.kernels.precision import describe_machine

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    if args.cpu_smoke:
        torch.set_num_threads(1)
        device, dtype, shapes = torch.device("cpu"), torch.float32, [(64, 1001), (96, 517)]
        n, reps = args.tokens or 256, args.reps or 3
        impls = [("naive", naive), ("torch", fused("torch")), ("gemm", gemm_floor)]
        from rlkit.kernels._dispatch import interpreting

        if interpreting():  # the Triton kernels on CPU, through the interpreter (slow, smoke only)
            impls.insert(2, ("triton", fused("triton")))
    elif args.cpu:
        device, dtype, shapes = torch.device("cpu"), torch.float32, [(256, 2048), (576, 49152), (896, 151936)]
        n, reps = args.tokens or 2048, args.reps or 3
        impls = [("naive", naive), ("bytes", bytes_chunks), ("torch", fused("torch")), ("gemm", gemm_floor)]
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/kernels.py needs a CUDA GPU; use --cpu-smoke to check it runs")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, [(896, 151936), (3584, 152064)]
        n, reps = args.tokens or 16384, args.reps or 5
        impls = [("naive", naive), ("torch", fused("torch")), ("triton", fused("triton")), ("gemm", gemm_floor)]
        print(torch.cuda.get_device_name(device))
    for hdim, vocab in shapes:
        rows = bench_shape(n, hdim, vocab, dtype, device, impls, reps)
        print_table(n, hdim, vocab, dtype, rows)
        if not args.cpu_smoke and n == 16384:
            check_targets(hdim, rows)


if __name__ == "__main__":
    main()
