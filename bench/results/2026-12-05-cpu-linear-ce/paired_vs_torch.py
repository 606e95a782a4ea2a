"""Paired CPU timing and peak memory of fp.linear_cross_entropy against torch's chunked
F.linear_cross_entropy: python paired_vs_torch.py ROWS TRAINABLE(0|1) BUDGETS_MIB|auto BACKENDS ROUNDS
(H 512, V 32000, a quarter of the rows ignored, fp32; run from the repository root)."""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, '.')
import fusedpeft as fp
from bench.memory import cpu_peak_extra_bytes
torch.manual_seed(0)
n, h, v = int(sys.argv[1]), 512, 32000
trainable = sys.argv[2] == '1'
budgets = [None if b == "auto" else int(float(b) * 2**20) for b in sys.argv[3].split(",")]
backends = (sys.argv[4] if len(sys.argv) > 4 else 'cpu').split(',')
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 5
hidden = torch.randn(n, h, requires_grad=True)
weight = (torch.randn(v, h) / h**0.5).requires_grad_(trainable)
labels = torch.randint(0, v, (n,)); labels[torch.randperm(n)[: n // 4]] = -100
def clear():
    hidden.grad = None; weight.grad = None
def tstep():
    F.linear_cross_entropy(hidden, weight, labels, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions()).backward()
def ostep(b, be):
    return lambda: fp.linear_cross_entropy(hidden, weight, labels, chunk_budget_bytes=b, backend=be).backward()
fns = [tstep] + [ostep(b, be) for b in budgets for be in backends]
names = ['torch'] + [f'{be} {b}' for b in budgets for be in backends]
for f in fns: clear(); f()
peaks = []
for f in fns:
    clear(); peaks.append(cpu_peak_extra_bytes(f)); clear()
ratios = {i: [] for i in range(len(fns))}; times = {i: [] for i in range(len(fns))}
for r in range(rounds):
    order = list(range(len(fns))); order = order[r % len(order):] + order[: r % len(order)]
    t = {}
    for i in order:
        clear(); s = time.perf_counter(); fns[i](); t[i] = time.perf_counter() - s
    for i in t: ratios[i].append(t[i] / t[0]); times[i].append(t[i])
for i, nm in enumerate(names):
    print(f'{nm:24s} peak {peaks[i]/2**20:7.1f} MiB  time {statistics.median(times[i]):.3f}s  paired x torch {statistics.median(ratios[i]):.3f}')
