"""Which FP8 backend and recipe `precision.fp8` names (the one registry of both), and which layers run in FP8."""


from __future__ import annotations

from typing import Any

from torch import nn

from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.numerics import RECIPES
from model.gemm import GemmBackend, GroupedLinear, Linear

FP8_BACKENDS = ("te", "emulated", "torch")  # Transformer Engine | model/fp8/emulated.py | model/fp8/scaled_mm.py
FP8_RECIPES = RECIPES  # blockwise | current | delayed | mxfp8 (model/fp8/numerics.py defines them)
# how the torch backend quantizes: eager torch ops | torch.compile | Triton kernels (model/fp8/triton_quant.py)
FP8_QUANTIZERS = ("eager", "compile", "triton")


def make_fp8_backend(fp8: Any, amax_group: object = None) -> GemmBackend | None:
    """The GEMM backend `precision.fp8` asks for (a trainer.config.FP8Config, or anything with its fields
    enabled / backend / recipe / amax_history / swiglu_inputs_fp8); None when FP8 is off. TE amaxes reduce
    over `amax_group`.
    `emulated`: EmulatedFP8Backend (any device); `torch`: model.fp8.scaled_mm.ScaledMMFP8Backend (real FP8 GEMMs
    through torch._scaled_mm, SM89+); `te`: model.fp8.te.TEBackend (Transformer Engine)."""
    if not fp8.enabled:
        return None
    swiglu = getattr(fp8, "swiglu_inputs_fp8", True)
    if fp8.backend == "emulated":
        return EmulatedFP8Backend(fp8.recipe, history=fp8.amax_history, fp8_swiglu_inputs=swiglu)
    if fp8.backend == "torch":
        from model.fp8.scaled_mm import ScaledMMFP8Backend

        quantizer = getattr(fp8, "quantizer", "eager")
        return ScaledMMFP8Backend(fp8.recipe, compile=quantizer == "compile", fused=quantizer == "triton",
                                  fp8_swiglu_inputs=swiglu)
    if fp8.backend == "te":
        from model.fp8.te import TEBackend

        return TEBackend(fp8.recipe, amax_group, fp8_swiglu_inputs=swiglu)
    raise ValueError(f"precision.fp8.backend: unknown backend {fp8.backend!r}; choose one of {FP8_BACKENDS}")


# ---- which layers run in FP8 -------------------------------------------------------------------------
# The report keeps the embedding, the output head, the router, norms and the attention core in high
# precision; the released checkpoints also keep the MTP projection (eh_proj) in BF16. The router, norms,
# embedding and attention core are not Linear modules here; these two are.
HIGH_PRECISION_LAYERS = ("head.lm_head", "eh_proj")


def is_fp8_layer(name: str) -> bool:
    return not any(name == p or name.endswith("." + p) for p in HIGH_PRECISION_LAYERS)


def fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear / GroupedLinear layers of attention, dense MLPs, shared and routed experts, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear | GroupedLinear) and is_fp8_layer(n)}


def apply_fp8(model: nn.Module, backend: GemmBackend) -> list[str]:
    """Route the FP8 layers of `model` through `backend` (through `backend.for_layer(name, layer)` when it
    has one: stateful backends get an instance per layer). Call before `defer_weight_grads`, which keeps
    each layer's numerics. Returns the names of the layers switched."""
    names = []
    for name, layer in fp8_layers(model).items():
        make = getattr(backend, "for_layer", None)
        layer.backend = make(name, layer) if make is not None else backend
        names.append(name)
    return names
