"""Worker bodies for the expert-parallel tests: ep ranks, each with its own tokens, against the single-process
model fed every rank's tokens."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.moe import MoE
from model.transformer import DeepseekV3
from parallel.dispatcher import AllToAllDispatcher, overlapped_moe_forward
from parallel.expert_shard import is_expert_key, shard_experts
from tests.conftest import tiny_config

# skewed router biases (selection only: sigmoid scores lie in (0, 1), so +-10 decides): per scenario, which
# experts (of 8; rank 0 holds 0-3 at ep=2) are favoured or never chosen
SKEWS = {
    "rank1_empty": {"favour": [0, 1, 2, 3]},  # groups 0 and 1 always win: rank 1 receives no rows at all
    "experts_empty": {"ban": [1, 2, 6], "favour": [5]},  # empty experts on both ranks, uneven loads
    "plain": {},
}


def skew(moe: MoE, scenario: str) -> None:
    bias = moe.gate.e_score_correction_bias
    for e in SKEWS[scenario].get("favour", []):
        bias[e] = 10.0
    for e in SKEWS[scenario].get("ban", []):
        bias[e] = -10.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for two empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def _layer_case(rank: int, world: int, scenario: str, tokens: list[int]) -> dict:
    cfg = tiny_config()
    torch.manual_seed(0)
    full = MoE(cfg).train()
    skew(full, scenario)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(1, t, cfg.hidden_size, generator=g) for t in tokens]  # uneven token counts per rank
    projs = [torch.randn(1, t, cfg.hidden_size, generator=g) for t in tokens]

    # reference: every rank's tokens through the full layer; loss = sum of the ranks' losses
    x_all = torch.cat(xs, 1).requires_grad_(True)
    ref_out, ref_routing = full(x_all)
    (ref_out * torch.cat(projs, 1)).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in full.named_parameters()}
    lo = sum(tokens[:rank])
    ref_mine = ref_out.detach()[:, lo:lo + tokens[rank]]
    ref_xgrad = x_all.grad[:, lo:lo + tokens[rank]]

    report = {}
    outs = {}
    for path in ("sync", "async"):
        torch.manual_seed(0)
        moe = MoE(cfg).train()
        skew(moe, scenario)
        shard_experts(moe, rank, world)
        assert isinstance(moe.dispatcher, AllToAllDispatcher)
        x = xs[rank].clone().requires_grad_(True)
        out, routing = moe(x) if path == "sync" else overlapped_moe_forward(moe, x)
        (out * projs[rank]).sum().backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in moe.named_parameters()}
        outs[path] = (out.detach(), x.grad.clone(), grads)
        if path == "sync":
            lo_e, hi_e = moe.dispatcher.first, moe.dispatcher.last
            counts = routing.counts.clone()
            dist.all_reduce(counts)
            report["rows_received"] = int(counts[lo_e:hi_e].sum())  # what this rank's experts computed
            report["out"] = rel(out.detach(), ref_mine)
            report["xgrad"] = rel(x.grad, ref_xgrad)
            report["counts_equal"] = bool(torch.equal(counts, ref_routing.counts))
            report["expert_loads"] = counts[lo_e:hi_e].tolist()  # global rows per local expert
            diffs = {}
            for n, gr in grads.items():
                if is_expert_key(n):  # this rank's experts saw every rank's tokens: no reduction needed
                    diffs[n] = rel(gr, ref_grads[n][lo_e:hi_e])
                else:  # replicated parameters: each rank has its own tokens' part; the sum is the whole
                    total = gr.clone()
                    dist.all_reduce(total)
                    diffs[n] = rel(total, ref_grads[n])
            report["grads"] = diffs
    so, sx, sg = outs["sync"]
    ao, ax, ag = outs["async"]
    report["async_bitwise"] = bool(torch.equal(so, ao) and torch.equal(sx, ax)
                                   and all(torch.equal(sg[n], ag[n]) for n in sg))
    return report


def _model_case(rank: int, world: int) -> dict:
    """The tiny model (MoE layers 1, 2 and the MTP block) with layer 1 skewed so rank 1 gets no rows."""
    cfg = tiny_config()
    seq, per_rank = 8, 2
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (per_rank * world, seq + 2), generator=g)
    mine = tokens[rank * per_rank:(rank + 1) * per_rank]

    def build() -> DeepseekV3:
        torch.manual_seed(0)
        model = DeepseekV3(cfg).train()
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        for moe, scenario in zip(moes, ["rank1_empty", "experts_empty", "plain"]):
            skew(moe, scenario)
        return model

    ref = build()
    ref(tokens).loss.backward()  # the mean loss over both ranks' tokens (equal shares)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_counts = {n: m.step_counts.clone() for n, m in ref.named_modules() if hasattr(m, "step_counts")}
    with torch.no_grad():
        ref_mine = ref(mine, return_logits=True)

    model = shard_experts(build(), rank, world)
    out = model(mine, return_logits=True)
    out.loss.backward()
    report = {"logits": rel(out.logits.detach(), ref_mine.logits), "loss": rel(out.loss.detach(), ref_mine.loss)}
    diffs = {}
    for n, p in model.named_parameters():
        gr = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if is_expert_key(n):
            # backward of the local mean loss on every rank: this rank's experts got the sum over ranks of
            # d(loss_r)/dW, so 1/dp makes it the gradient of the mean (no expert-DP all-reduce when dp == ep)
            lo = model.get_submodule(n.rsplit(".", 2)[0]).first_expert
            diffs[n] = rel(gr / world, ref_grads[n][lo:lo + gr.shape[0]])
        else:
            dist.all_reduce(gr)
            diffs[n] = rel(gr / world, ref_grads[n])
    report["grads"] = diffs
    counts_ok, loads = True, {}
    for n, m in model.named_modules():
        if hasattr(m, "step_counts"):
            c = m.step_counts.clone()
            dist.all_reduce(c)
            counts_ok &= bool(torch.equal(c, ref_counts[n]))
            loads[n] = c.view(world, -1).sum(1).tolist()  # rows each ep rank's experts received
    report["counts_equal"], report["rank_loads"] = counts_ok, loads
    return report


def run_ep(rank: int, world: int) -> dict:
    layer = {s: _layer_case(rank, world, s, [6, 3] if world == 2 else [5] * world) for s in SKEWS}
    return {"layer": layer, "model": _model_case(rank, world)}


def run_fp8_dispatch(rank: int, world: int) -> dict:
    """ep=2 MoE layer with the dispatch rows sent in FP8, against the full-precision dispatch of rows that were
    quantized and dequantized before sending (same values arrive: the layer's output and input gradient must be
    equal), the quantization error of every dispatched value against E4M3's rounding bound, and which transfers
    the trace saw (values and scales for the dispatch only)."""
    from unittest import mock

    from parallel import dispatcher as dispatcher_module
    from parallel.all_to_all import dequantize_dispatch, quantize_dispatch
    from parallel.dispatcher import set_fp8_dispatch

    cfg = tiny_config()
    g = torch.Generator().manual_seed(3 + rank)
    x = torch.randn(1, 16, cfg.hidden_size, generator=g)
    plain_all_to_all = dispatcher_module._AllToAll.apply
    sent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, dequantized, tile scales)

    def quantized_rows(rows, *args):
        """The dispatch rows as FP8 would deliver them, sent in full precision (gradient: straight through)."""
        if args[4].startswith("dispatch"):
            values, scales = quantize_dispatch(rows.detach())
            back = dequantize_dispatch(values, scales, rows.dtype).view_as(rows)
            sent.append((rows.detach().clone(), back, scales))
            rows = back + (rows - rows.detach())  # + exactly 0: the values of `back`, the gradient of rows
        return plain_all_to_all(rows, *args)

    out = {}
    for mode in ("plain", "fp8", "quantized_rows"):
        torch.manual_seed(0)
        moe = shard_experts(MoE(cfg).train(), rank, world)
        assert set_fp8_dispatch(moe, mode == "fp8") == 1
        trace: list = []
        moe.dispatcher.trace = trace
        xi = x.clone().requires_grad_(True)
        with mock.patch.object(dispatcher_module._AllToAll, "apply",
                               quantized_rows if mode == "quantized_rows" else plain_all_to_all):
            y, _ = moe(xi)
        y.sum().backward()
        out[mode] = (y.detach(), xi.grad.clone(), [c.label for c in trace])
    (y0, _, labels0), (y1, g1, labels1), (y2, g2, _) = out["plain"], out["fp8"], out["quantized_rows"]
    # E4M3 (3 mantissa bits, round to nearest): a normal value is off by <= 2^-4 of itself, a subnormal one (below
    # 2^-6 in scaled units) by <= half its spacing 2^-9, i.e. 2^-10 scale; scale = the 1 x 128 tile's amax / 448
    worst = 0.0
    for rows, back, scales in sent:
        tile_scale = scales.repeat_interleave(128, dim=-1)[..., : rows.shape[-1]]
        bound = 2.0**-4 * rows.abs() + 2.0**-10 * tile_scale
        worst = max(worst, float(((back - rows).abs() / bound).max()))
    return {"out_equal": torch.equal(y1, y2), "grad_equal": torch.equal(g1, g2), "out_rel": rel(y1, y0),
            "quantization_vs_bound": worst, "dispatched": sum(r.shape[0] for r, _, _ in sent),
            "labels_plain": labels0, "labels_fp8": labels1,
            "finite": bool(torch.isfinite(y1).all() and torch.isfinite(g1).all())}
