"""FP8 through NVIDIA Transformer Engine (Hopper and newer): a `GemmBackend` that runs our layers' GEMMs in
`te.Linear` / `te.GroupedLinear` under `te.autocast`.

Our `Linear` / `GroupedLinear` keep their parameters (names, init, checkpoints and HF export stay as they
are); each layer's backend holds a TE module that computes with those very parameters:
- `te.Linear(in, out, bias=False)` whose `weight` is replaced by the layer's Parameter (the same object, so
  DeepSpeed's bf16 cast and ZeRO's flat buffers, which swap `param.data`, reach it);
- `te.GroupedLinear(E, in, out, bias=False)` whose `weight{e}` slots are filled, for the duration of each
  call, with views `weight[e]` of the layer's stacked [E, out, in] Parameter, so the gradient flows back
  into it through autograd. Per-expert row counts (`m_splits`) are padded to the recipe's multiple with
  zero rows (16; 32 for MXFP8; 128 for blockwise) and the padding cut off again.

Autocast: the pipeline engine opens `autocast_context(...)` per stage per microbatch (amax reduction over
the stage's own data-parallel group: a group spanning pipeline stages would hang). A layer called outside
any FP8 autocast (the `none` schedule, evaluation, and activation-checkpoint recompute, which runs in
backward, outside the engine's context) opens one itself around its own GEMM, so recompute happens inside
autocast. TE computes weight-gradients inside its own backward: with this backend the zero-bubble W pass
has nothing to run (deferral is a scheduling choice, not numerics).

Nothing here runs without a CUDA build of TE and an SM89+ GPU; `import transformer_engine` raises
RuntimeError (not ImportError) on a machine without CUDA, which `import_te` turns into `TEUnavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from model.fp8.numerics import FP8Storage
from model.gemm import GemmBackend, GroupedLinear, Linear

RECIPE_CLASSES = {
    "blockwise": "Float8BlockScaling",  # DeepSeek-style 1x128 / 128x128; SM90 and a CUDA >= 12.9 torch
    "current": "Float8CurrentScaling",  # per tensor, current amax; SM89+
    "delayed": "DelayedScaling",  # per tensor, amax history; SM89+
    "mxfp8": "MXFP8BlockScaling",  # 1x32 E8M0 blocks; Blackwell (SM100)
}
MIN_CAPABILITY = {"blockwise": (9, 0), "current": (8, 9), "delayed": (8, 9), "mxfp8": (10, 0)}
GPU_NAMES = {(8, 9): "Ada (SM89)", (9, 0): "Hopper (SM90)", (10, 0): "Blackwell (SM100)"}
FIX = "use precision.fp8.backend=emulated"


class TEUnavailable(RuntimeError):
    """Transformer Engine cannot run the requested recipe here: one line, `<problem>; <fix>`."""

    def __init__(self, problem: str, fix: str = FIX) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


def import_te() -> Any:
    """`transformer_engine.pytorch`, or TEUnavailable with the reason (missing, or no CUDA/cuDNN)."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise TEUnavailable(f"Transformer Engine is not installed ({e})",
                            f"install transformer-engine[pytorch] on a CUDA machine, or {FIX}") from None
    except RuntimeError as e:  # TE raises RuntimeError when CUDA or cuDNN is missing
        raise TEUnavailable(f"Transformer Engine cannot load ({str(e).strip().splitlines()[0]})") from None
    return te


def check_te(recipe: str) -> None:
    """Fail with one line unless TE imports and this GPU supports `recipe`."""
    if recipe not in RECIPE_CLASSES:
        raise TEUnavailable(f"unknown recipe {recipe!r}", f"choose one of {', '.join(RECIPE_CLASSES)}")
    if not torch.cuda.is_available():
        raise TEUnavailable("Transformer Engine needs a CUDA GPU and none is visible")
    cap = torch.cuda.get_device_capability()
    need = MIN_CAPABILITY[recipe]
    if cap < need:
        raise TEUnavailable(f"recipe {recipe} needs a {GPU_NAMES[need]} GPU or newer, this one "
                            f"({torch.cuda.get_device_name()}) is SM{cap[0]}{cap[1]}",
                            f"choose another precision.fp8.recipe, or {FIX}")
    if recipe == "blockwise":
        cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
        if cuda < (12, 9):
            raise TEUnavailable(f"recipe blockwise needs a torch built for CUDA >= 12.9 (this one: "
                                f"{torch.version.cuda})", f"install a newer torch, use recipe=current, or {FIX}")
    te = import_te()
    probe = {"blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available"}.get(
        recipe, "is_fp8_available")
    available = getattr(te, probe, None)
    if available is not None:
        ok, reason = available(return_reason=True)
        if not ok:
            raise TEUnavailable(f"Transformer Engine cannot run recipe {recipe} here ({reason})")


def te_recipe(recipe: str) -> Any:
    """The TE recipe object; E4M3 for every operand (the report does not use E5M2 for gradients)."""
    from transformer_engine.common import recipe as te_recipes

    cls = getattr(te_recipes, RECIPE_CLASSES[recipe])
    if recipe in ("current", "delayed"):
        return cls(fp8_format=te_recipes.Format.E4M3)
    return cls()


def split_multiple(recipe: str) -> int:
    """Rows of each expert's GEMM are padded to this multiple (TE's grouped FP8 GEMM alignment)."""
    return {"blockwise": 128, "mxfp8": 32}.get(recipe, 16)


def shape_problems(cfg: ModelConfig, recipe: str, tokens_per_microbatch: int) -> list[str]:
    """TE's divisibility rules for every FP8 GEMM of `cfg`: a GEMM's last dims (in and out features, the
    contraction dim of one of its three GEMMs each) by 16 (blockwise: 128; mxfp8: 32), its leading product
    (tokens) by 8 (blockwise 128, mxfp8 32). Returns one entry per violation, naming the model key."""
    mult = split_multiple(recipe)
    token_mult = 8 if mult == 16 else mult
    q_out = cfg.num_attention_heads * cfg.qk_head_dim
    dims: list[tuple[str, int]] = [("hidden_size", cfg.hidden_size),
                                   ("kv_lora_rank + qk_rope_head_dim", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                   ("kv_lora_rank", cfg.kv_lora_rank),
                                   ("num_attention_heads * (qk_nope_head_dim + v_head_dim)",
                                    cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                                   ("num_attention_heads * v_head_dim", cfg.num_attention_heads * cfg.v_head_dim),
                                   ("num_attention_heads * qk_head_dim", q_out)]
    if cfg.q_lora_rank is not None:
        dims.append(("q_lora_rank", cfg.q_lora_rank))
    if cfg.first_k_dense_replace > 0 or cfg.n_routed_experts == 0:
        dims.append(("intermediate_size", cfg.intermediate_size))
    if cfg.n_routed_experts > 0:
        dims.append(("moe_intermediate_size", cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            dims.append(("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts))
    out = [f"model.{name}={value} is not a multiple of {mult}" for name, value in dims if value % mult]
    if tokens_per_microbatch % token_mult:
        out.append(f"train.micro_batch_size x train.seq_len = {tokens_per_microbatch} tokens is not a multiple "
                   f"of {token_mult}")
    return out


def _fp8_autocast_active() -> bool:
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:  # TE < 2.8
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager.is_fp8_enabled()


def _autocast_fn(te: Any) -> Callable[..., contextlib.AbstractContextManager]:
    """te.autocast (TE >= 2.9), or the older fp8_autocast with its argument names."""
    if hasattr(te, "autocast"):
        return te.autocast

    def old(enabled: bool, recipe: Any, amax_reduction_group: Any) -> contextlib.AbstractContextManager:
        return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=amax_reduction_group)

    return old


def autocast_context(recipe: str, amax_group: Any = None) -> Callable[[int, int], contextlib.AbstractContextManager]:
    """The pipeline engine's `precision_context(chunk, mb)`: FP8 autocast around each forward piece,
    amaxes reduced over `amax_group` (the stage's data-parallel group, never the world)."""
    te = import_te()
    rec, enter = te_recipe(recipe), _autocast_fn(te)

    def context(chunk: int, mb: int) -> contextlib.AbstractContextManager:
        return enter(enabled=True, recipe=rec, amax_reduction_group=amax_group)

    return context


class TEBackend(GemmBackend):
    """A layer's GEMMs in a TE module under FP8 autocast (see the module docstring). Built for a recipe
    and an amax group, then specialised per layer by `for_layer` (which `model.fp8.apply_fp8` calls)."""

    def __init__(self, recipe: str, amax_group: Any = None, layer: nn.Module | None = None,
                 fp8_swiglu_inputs: bool = True) -> None:
        self.recipe, self.amax_group = recipe, amax_group
        # our SwiGLU (not TE's) keeps its input in E4M3 for the backward, as with the other FP8 backends
        self.fp8_swiglu_inputs = fp8_swiglu_inputs
        self.activation_storage = FP8Storage() if fp8_swiglu_inputs else None
        self.name = f"te-{recipe}"
        self.te = import_te()
        self._recipe = te_recipe(recipe)
        self._autocast = _autocast_fn(self.te)
        self.module: nn.Module | None = None
        if layer is not None:
            self.module = self._build(layer)

    def for_layer(self, name: str, layer: nn.Module) -> TEBackend:
        return TEBackend(self.recipe, self.amax_group, layer, self.fp8_swiglu_inputs)

    def _build(self, layer: nn.Module) -> nn.Module:
        te, w = self.te, layer.weight
        kw = {"bias": False, "params_dtype": w.dtype, "device": w.device}
        if isinstance(layer, Linear):
            mod = te.Linear(layer.in_features, layer.out_features, **kw)
            mod.weight = w  # the layer's own Parameter: one copy, seen by the optimizer and checkpoints
            return mod
        if isinstance(layer, GroupedLinear):
            mult = split_multiple(self.recipe)
            if layer.in_features % mult or layer.out_features % mult:
                raise TEUnavailable(f"experts of {layer.in_features} x {layer.out_features} break TE's rule that "
                                    f"GEMM dims be multiples of {mult} for recipe {self.recipe}",
                                    f"change model.moe_intermediate_size / model.hidden_size, or {FIX}")
            mod = te.GroupedLinear(layer.num_groups, layer.in_features, layer.out_features, **kw)
            for e in range(layer.num_groups):  # the stacked Parameter is the storage: drop TE's own copies
                mod._parameters[f"weight{e}"] = None
            return mod
        raise TypeError(f"TEBackend cannot run {type(layer).__name__}")

    @property
    def is_plain(self) -> bool:
        return False

    def _context(self) -> contextlib.AbstractContextManager:
        # inside the engine's autocast already: nothing to open; else (recompute, `none` schedule) open one
        if _fp8_autocast_active():
            return contextlib.nullcontext()
        return self._autocast(enabled=True, recipe=self._recipe, amax_reduction_group=self.amax_group)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        assert self.module is not None, "TEBackend.for_layer was not called for this layer (use apply_fp8)"
        with self._context():
            return self.module(x)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        assert self.module is not None, "TEBackend.for_layer was not called for this layer (use apply_fp8)"
        mult = split_multiple(self.recipe)
        ends = offsets.tolist()
        rows = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        padded = [-(-r // mult) * mult for r in rows]
        # destination of every real row inside the padded buffer
        starts = torch.tensor([0, *padded[:-1]], device=x.device).cumsum(0)
        first = torch.tensor([0, *ends[:-1]], device=x.device)
        group = torch.repeat_interleave(torch.arange(len(rows), device=x.device),
                                        torch.tensor(rows, device=x.device))
        dest = torch.arange(x.shape[0], device=x.device) - first[group] + starts[group]
        xp = x.new_zeros(sum(padded), x.shape[1]).index_copy(0, dest, x)
        slots = self.module._parameters
        try:
            for e in range(weight.shape[0]):
                slots[f"weight{e}"] = weight[e]  # views: their gradients flow into the stacked Parameter
            with self._context():
                y = self.module(xp, padded)
        finally:
            for e in range(weight.shape[0]):
                slots[f"weight{e}"] = None
        return y.index_select(0, dest)

    def with_wgrad_store(self, store: object | None) -> GemmBackend:
        # TE fuses the weight-gradient GEMM into its backward; W instructions of the zero-bubble schedule
        # then have nothing to run. The store is kept only so the pipeline's bookkeeping stays uniform.
        return super().with_wgrad_store(store)
