"""Per-parameter gradient error of the fused ops against the plain ones and against fp32, on a GPU.

loglinear_adaptive at 125m width, 2 layers, T = 1000, bf16 autocast: err(fused, fp32),
err(plain bf16, fp32) and err(fused, plain) for the parameters that differ most, then the
scale_rows kernel and the log-linear op with v_scale and with bf16 vs fp32 lambda.
    python scripts/fused_grad_diag.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.utils, the repo's mixerzoo

import torch, mixerzoo, math  # noqa: E402
from mixerzoo.ops import pointwise
from tests.utils import rel_err
torch.manual_seed(0)
m = mixerzoo.build_model("loglinear_adaptive", size="125m", vocab_size=32000).cuda().train()
for b in m.blocks[:2]:
    torch.nn.init.normal_(b.mixer.lambda_fc2.weight, std=0.05)
m.blocks = m.blocks[:2]
plain = m.with_kernels("reference")  # the same weights, the plain torch ops
x = torch.randint(0, 32000, (2, 1000), device="cuda")
def run(enabled, ac):
    model = m if enabled else plain
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ac):
        loss = model(input_ids=x, labels=x, return_logits=not enabled).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
l32, g32 = run(False, False)
lr, gr = run(False, True)
lf, gf = run(True, True)
print("loss fp32 %.6f ref-bf16 %.6f fused-bf16 %.6f" % (l32, lr, lf))
rows = sorted(((rel_err(gf[n], g32[n]), rel_err(gr[n], g32[n]), rel_err(gf[n], gr[n]), n) for n in g32), reverse=True)
print("err(fused,fp32) err(ref,fp32) err(fused,ref) name")
for r in rows[:14]: print("%.2e %.2e %.2e %s" % r)
# scale_rows kernel vs torch on GPU
xs = torch.randn(2, 1000, 2304, device="cuda", dtype=torch.bfloat16)[..., :1536].unflatten(-1, (24, 64)).requires_grad_()
for s in (torch.rand(2, 1000, 24, device="cuda", requires_grad=True), torch.rand(24, device="cuda", requires_grad=True)):
    a = torch.randn(2, 1000, 24, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y1 = pointwise.scale_rows(xs, s, a, backend="triton"); y2 = pointwise.scale_rows(xs, s, a, backend="torch")
    g = torch.randn_like(y1)
    d1 = torch.autograd.grad(y1, (xs, s, a), g); d2 = torch.autograd.grad(y2, (xs, s, a), g)
    print("scale_rows", tuple(s.shape), "y %.1e" % rel_err(y1, y2), " ".join("%.1e" % rel_err(p, q) for p, q in zip(d1, d2)))
from mixerzoo.ops.loglinear.triton_ops import triton_log_linear_attn
B, T, H, K, V = 2, 1000, 24, 128, 64
q = torch.randn(B, T, 1, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = (torch.randn(B, T, 1, K, device="cuda") / 11).to(torch.bfloat16).requires_grad_()
xv = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dt = (torch.rand(B, T, H, device="cuda") * 0.1).requires_grad_()
gg = (-torch.rand(B, T, H, device="cuda") * 0.1).requires_grad_()
lam = torch.nn.functional.softplus(torch.randn(B, T, H, 15, device="cuda")).to(torch.bfloat16).requires_grad_()
o1 = triton_log_linear_attn(q, k, pointwise.mul_dt(xv, dt), gg, lam)
o2 = triton_log_linear_attn(q, k, xv, gg, lam, v_scale=dt)
lam32 = lam.detach().float().requires_grad_()
o3 = triton_log_linear_attn(q, k, pointwise.mul_dt(xv, dt), gg, lam32)
do = torch.randn_like(o1)
i1 = (q, k, xv, dt, gg, lam)
d1 = torch.autograd.grad(o1, i1, do); d2 = torch.autograd.grad(o2, i1, do)
d3 = torch.autograd.grad(o3, (q, k, xv, dt, gg, lam32), do)
print("v_scale: o %.1e" % rel_err(o2, o1), " ".join("d%s %.1e" % (n, rel_err(a, b)) for n, a, b in zip("qkxdgl", d2, d1)))
print("bf16 vs fp32 lam: o %.1e" % rel_err(o1, o3), " ".join("d%s %.1e" % (n, rel_err(a, b)) for n, a, b in zip("qkxdgl", d1, d3)))
