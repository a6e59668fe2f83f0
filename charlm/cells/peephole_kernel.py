"""The peephole LSTM's training path: one layer over a whole window, with a backward pass of its own.

The input product for the whole window is made before (one matrix product, by autograd); this
function runs the recurrence: per step one recurrent product and the pointwise work, written into
preallocated buffers; its backward walks the window in reverse with the gradients written out by
hand (per step: the pointwise derivatives and one product with W_hh), then forms the gradients of
W_hh and of the peepholes for the whole window at once (one product, three reductions). Against
autograd through the same steps this saves the graph: autograd records ~15 nodes per step and keeps
each one's inputs; here five buffers hold everything the backward needs. Measured against autograd
and torch.compile in docs/results.md (cell table notes).

Shapes: time first, xp (T, B, 4H) in gate order (i, f, g, o), w_hh (4H, H), peep (3, H) for
(i, f, o), h0 and c0 (B, H). Computed in fp32 whatever autocast says: the recurrence accumulates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.products import Product


class PeepholeLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp: Tensor, w_hh: Tensor, peep: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
        T, B, H = xp.shape[0], xp.shape[1], h0.shape[1]
        with torch.autocast(xp.device.type, enabled=False):
            acts = torch.empty(T, B, 4 * H, dtype=xp.dtype, device=xp.device)  # i, f, g, o after activation
            cs = torch.empty(T + 1, B, H, dtype=xp.dtype, device=xp.device)  # c_0 .. c_T
            tcs, hs = torch.empty(T, B, H, dtype=xp.dtype, device=xp.device), torch.empty_like(cs[1:])
            cs[0] = c0
            p_i, p_f, p_o = peep
            recurrent = Product(w_hh, w_hh.dtype)  # packed once for the window: ~20% faster than addmm here
            h = h0
            for t in range(T):
                gates = torch.add(recurrent(h), xp[t], out=acts[t])
                i, f, g, o = gates.split(H, dim=1)
                c = cs[t]
                torch.addcmul(i, p_i, c, out=i).sigmoid_()
                torch.addcmul(f, p_f, c, out=f).sigmoid_()
                g.tanh_()
                c_new = torch.addcmul(f * c, i, g, out=cs[t + 1])
                torch.addcmul(o, p_o, c_new, out=o).sigmoid_()
                h = torch.mul(o, torch.tanh(c_new, out=tcs[t]), out=hs[t])
        ctx.save_for_backward(w_hh, peep, h0, acts, cs, tcs, hs)
        return hs, cs[T].clone()

    @staticmethod
    def backward(ctx, grad_hs: Tensor | None, grad_c: Tensor | None):
        w_hh, peep, h0, acts, cs, tcs, hs = ctx.saved_tensors
        T, B, H = hs.shape
        p_i, p_f, p_o = peep
        with torch.autocast(hs.device.type, enabled=False):
            grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs
            dc = torch.zeros_like(cs[0]) if grad_c is None else grad_c.clone()
            dgates = torch.empty_like(acts)  # gradients of the gates' pre-activations
            dh_rec = torch.zeros_like(h0)
            for t in range(T - 1, -1, -1):
                i, f, g, o = acts[t].split(H, dim=1)
                d_i, d_f, d_g, d_o = dgates[t].split(H, dim=1)
                tc, dh = tcs[t], grad_hs[t] + dh_rec
                torch.mul(dh * tc, o * (1 - o), out=d_o)
                dc += dh * o * (1 - tc * tc) + d_o * p_o
                torch.mul(dc * g, i * (1 - i), out=d_i)
                torch.mul(dc * cs[t], f * (1 - f), out=d_f)
                torch.mul(dc * i, 1 - g * g, out=d_g)
                dc = dc * f + d_i * p_i + d_f * p_f
                dh_rec = dgates[t] @ w_hh
            flat = dgates.view(T * B, 4 * H)
            h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).view(T * B, H)
            d_w_hh = flat.t() @ h_prev
            d_i, d_f, _, d_o = dgates.split(H, dim=2)
            d_peep = torch.stack([(d_i * cs[:-1]).sum((0, 1)), (d_f * cs[:-1]).sum((0, 1)), (d_o * cs[1:]).sum((0, 1))])
        return dgates, d_w_hh, d_peep, dh_rec, dc
