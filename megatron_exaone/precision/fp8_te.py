"""Transformer Engine FP8 backend: precision=fp8_te_delayed | fp8_te_tensorwise | fp8_te_blockwise |
fp8_te_mxfp8.

Importing this module never imports Transformer Engine (TE); every entry point that needs TE imports
it then and raises `TEUnavailable` (a configuration error naming `pip install
'megatron-exaone[te]'`) when it cannot. API facts come from TE 2.20.2's Python source (the
`transformer-engine` wheel on PyPI); a file named in brackets is in its
`transformer_engine/pytorch/` ([module/linear.py]), [MCore ...] is a file of megatron-core 0.19's
`megatron/core/`.

Entry points
  recipe_spec(cfg) -> RecipeSpec   pure data: the TE recipe class and arguments of a precision
  build_recipe(cfg)                RecipeSpec -> TE recipe object (the one place recipes are named)
  fp8_context(cfg, group)          `te.autocast(enabled=True, recipe=..., amax_reduction_group)`,
                                   or a nullcontext for non-TE precisions
  apply_te(root, cfg, tp_group, sequence_parallel, amax_group=...)
                                   the precision pass (after tensor and expert parallel, on the meta
                                   device, before activation checkpointing, FSDP2 and materialize)
  recompute_checkpoint(...)        TE's `checkpoint`, to recompute modules holding TE modules
  te_extra_state / load_te_extra_state
                                   FP8 metadata (`_extra_state`) of the TE modules, for checkpoints

Design (each choice with its reason)
1. Tensor/sequence parallel: TE modules are built with `parallel_mode=None`, `tp_size=1` on the
   LOCAL shapes the tensor-parallel pass left, and our communication hooks on the parent modules
   stay as they are. TE therefore never communicates ([module/linear.py] `_linear_forward_impl`,
   `parallel_mode=None`), so nothing is communicated twice. This is what Megatron does for expert
   layers with explicit comms ([MCore extensions/transformer_engine.py]). TE's own column/row modes
   were not chosen: their SP all-gather and reduce-scatter work on dim 0 ([module/linear.py]), the
   batch dim in our [B, S, H] layout, and they would need the parameter classification of
   `parallel/tensor_parallel.py` redone. The cost is that SP all-gathers move BF16 instead of FP8
   and TE's comm/GEMM overlap (Userbuffers) is not used. With `parallel_mode=None` an activation is
   quantized after our all-gather, on the full (replicated) tensor, so per-tensor scales agree over
   TP without the TP amax reduction TE adds in its SP modes.
2. Names and shapes are unchanged, so checkpoints, the parallel plan, FSDP2 and the HF converter see
   the same model: `nn.Linear` -> `te.Linear` keeps the parameter `weight` [out, in]
   ([module/linear.py]). We move our Parameter object into it. Routed experts keep OUR stacked
   Parameters `gate_proj`/`up_proj` [E, I, H] and `down_proj` [E, H, I]. Each of the three grouped
   GEMMs is a `te.GroupedLinear(num_gemms=E_local)` whose own `weight0..weight{E-1}` Parameters
   ([module/grouped_linear.py]) are deregistered. Before every call they are bound to views of our
   stacked tensor (`stacked.unbind(0)`: a single backward node stacks the expert gradients into the
   stacked gradient). TE 2.20.2 reads the per-GEMM weights with `getattr(self, f"weight{i}")` and
   passes them to its autograd function as inputs ([module/grouped_linear.py] `_get_weight_tensors`,
   `forward`). A state-dict hook was not an option: our DCP checkpoints, the optimizer, FSDP2 and
   `materialize` use `named_parameters()`, not `state_dict()`. Per-expert token splits are padded
   for FP8 with `te.Fp8Padding` / `te.Fp8Unpadding` (16 rows, 32 for MXFP8; [quantization.py]
   `get_align_size_for_quantization`).
3. Autocast: `apply_te` wraps the forward of the root it converts (a model or a pipeline chunk) in
   `fp8_context(cfg, amax_group)`, so every pipeline micro-batch forward runs in its own autocast
   region. Backward runs outside it, as TE requires ([quantization.py] `autocast`). The amax
   reduction group should be the stage's TP x CP x DP group (`mesh.tp_cp_dp_group`, Megatron's
   default, [MCore fp8_utils.py] `get_fp8_context`). Only DelayedScaling uses it. `te.autocast`
   appeared in TE 2.9; older TEs get the deprecated `te.fp8_autocast(enabled, fp8_recipe,
   fp8_group)`.
4. BF16 layers: the first/last `keep_bf16_*` decoder layers, the router (`mlp.gate`, fp32 by
   design), the embedding, `lm_head` and the MTP module (unless `fp8_mtp=True`) are simply not
   converted. They stay torch modules that TE's autocast does not affect. One autocast region
   therefore covers a whole stage, also with DelayedScaling. Megatron rejects that combination only
   because it implements BF16 layers with nested per-layer autocasts ([MCore fp8_utils.py]). Weights
   whose local shape breaks the recipe's FP8 GEMM alignment ([utils.py], [quantization.py]) stay
   BF16. `apply_te` logs them and returns them in the report. `strict=True` makes that an error
   instead.
5. Activation recompute: the recomputed forward runs in backward, outside the autocast. Modules
   holding TE modules must therefore be checkpointed with TE's `checkpoint` (`recompute_checkpoint`
   here, `use_reentrant=False`). It re-enters the autocast with the forward's recipe and restores
   DelayedScaling metadata. torch's plain checkpoint would recompute in BF16 and fail the
   saved-tensor check. `parallel/recompute.py` calls `recompute_checkpoint` for modules where
   `holds_te_modules(module)` is true.
6. Checkpoints: TE modules add `_extra_state` to `state_dict()` ([module/base.py]
   `get_extra_state`). For the stateless recipes (tensorwise, blockwise, mxfp8) it is empty in TE >=
   2.18. For DelayedScaling it holds the amax history and scales: checkpoint/state.py saves each
   rank's non-empty `te_extra_state(root)` and restores it with `load_te_extra_state` when the
   layout is unchanged (TE >= 2.18 refuses to unpickle it unless
   NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, [module/base.py]; the run then warns and restarts the
   history).
7. Optional TE attention (`te_attention=True`): `te.DotProductAttention` with `window_size=(W-1, 0)`
   on sliding layers (our window: i - W < j <= i; [attention/dot_product_attention/utils.py]
   `check_set_window_size`), `"bshd"` with a causal mask, or packed documents as `"thd"` with
   `padding_causal` and int32 `cu_seqlens` (`DotProductAttention.forward`). The cu_seqlens are
   derived from the attention mask the model already builds. It runs in BF16 (recipes here keep
   `fp8_dpa=False`). It never builds the [S, S] mask inside TE, which is what long sequences need.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import GroupedExperts
from megatron_exaone.model.rope import apply_rope

from .apply import NOT_ALIGNED, Candidate, PrecisionReport, fp8_candidates, warn_misaligned
from .fp8_common import Fp8Unavailable
from .registry import PRECISIONS, TE_INSTALL_HINT, is_te

log = logging.getLogger(__name__)

# Precision name -> the one FP8 recipe it runs, from the table of precisions.
TE_PRECISIONS = {name: p.recipes[0] for name, p in PRECISIONS.items() if p.is_te}
# Our recipe name -> TE recipe class in transformer_engine.common.recipe, as [MCore fp8_utils.py]
# `get_fp8_recipe`.
RECIPE_CLASSES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}
# precision.fp8_format -> TE `Format` member (E5M2 alone is rejected by every FP8 recipe).
FP8_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}
# Rows each expert's token split is padded to under FP8 ([quantization.py]
# `get_align_size_for_quantization`).
SPLIT_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}
# Both weight dims must be multiples of this for the recipe's GEMMs. Per-tensor FP8 needs leading
# dims % 8 and the last % 16 on both operands ([utils.py]); 16 is used for both weight dims because
# backward uses the transpose. Block scaling: 128 (1x128 / 128x128 blocks). MXFP8: 32 (1x32 blocks).
WEIGHT_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}


class TEUnavailable(Fp8Unavailable):
    """A Transformer Engine precision was requested where TE cannot be imported or used (no silent
    fallback)."""


# ------------------------------------------------------------------------------------- import guard
def _unavailable(what: str, exc: BaseException | None = None) -> TEUnavailable:
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return TEUnavailable(
        f"{what} needs NVIDIA Transformer Engine, which cannot be used here{cause}. Fix: "
        f"`{TE_INSTALL_HINT}` on a CUDA machine (Hopper or Blackwell), or choose precision=bf16, "
        "fp8_torch (torch-native FP8) or fp8_emulated (CPU tests)."
    )


def import_te(what: str = "precision=fp8_te_*"):
    """`transformer_engine.pytorch`, or `TEUnavailable`. TE's import can also fail with RuntimeError
    (missing CUDA libraries, an empty meta package) or AssertionError (version mismatch), not only
    ImportError (`transformer_engine/common/__init__.py`)."""
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 - guarded, lazy import
    except Exception as exc:  # noqa: BLE001 - any failure to load TE is the same configuration problem
        raise _unavailable(what, exc) from exc
    return te


def import_te_recipes(what: str = "precision=fp8_te_*"):
    """`transformer_engine.common.recipe` (the recipe classes and `Format`), or `TEUnavailable`."""
    try:
        from transformer_engine.common import recipe  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        raise _unavailable(what, exc) from exc
    return recipe


def te_available() -> bool:
    try:
        import_te()
    except TEUnavailable:
        return False
    return True


# ------------------------------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class RecipeSpec:
    """A TE recipe as data: `recipe_class(fp8_format=Format.<fp8_format>, **dict(options))`."""

    recipe: str  # delayed | tensorwise | blockwise | mxfp8
    recipe_class: str
    fp8_format: str  # a member of transformer_engine.common.recipe.Format
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def split_align(self) -> int:
        return SPLIT_ALIGN[self.recipe]

    @property
    def weight_align(self) -> int:
        return WEIGHT_ALIGN[self.recipe]

    def kwargs(self, format_enum: Any = None) -> dict[str, Any]:
        """Constructor keyword arguments; `format_enum` is TE's `Format` (None keeps the member
        name)."""
        fmt = getattr(format_enum, self.fp8_format) if format_enum is not None else self.fp8_format
        return {"fp8_format": fmt, **dict(self.options)}


def recipe_spec(cfg: Any) -> RecipeSpec:
    """The TE recipe for a `PrecisionConfig` with an fp8_te_* name (the classes of
    `transformer_engine/common/recipe/__init__.py`, mapped as [MCore fp8_utils.py] does).

    delayed: DelayedScaling(fp8_format, amax_history_len, amax_compute_algo, margin=0,
        reduce_amax=True). Amax reduction is always on (TE asserts it under SP, [module/base.py],
        and it keeps ranks' scales identical).
    tensorwise: Float8CurrentScaling(fp8_format).
    blockwise: Float8BlockScaling(fp8_format, x_block_scaling_dim=1, w_block_scaling_dim=2,
        grad_block_scaling_dim=1): 1x128 activation and gradient blocks, 128x128 weight blocks
        (the DeepSeek-V3 scheme, Hopper's production choice). These are TE's defaults, pinned here.
    mxfp8: MXFP8BlockScaling(fp8_format): 1x32 blocks with E8M0 scales, Blackwell sm_100/103.
    """
    name = getattr(cfg, "name", None)
    if name not in TE_PRECISIONS:
        raise ValueError(
            f"precision {name!r} is not a Transformer Engine precision; use one of "
            f"{', '.join(TE_PRECISIONS)}."
        )
    recipe = cfg.recipe or TE_PRECISIONS[name]
    if recipe != TE_PRECISIONS[name]:
        raise ValueError(f"precision {name} runs recipe {TE_PRECISIONS[name]!r}, not {recipe!r}.")
    fmt = cfg.fp8_format
    if fmt not in FP8_FORMATS:
        raise ValueError(f"precision.fp8_format={fmt!r}: use one of {', '.join(FP8_FORMATS)}.")
    options: tuple[tuple[str, Any], ...] = ()
    if recipe == "delayed":
        algo = cfg.amax_compute_algo
        if algo not in ("max", "most_recent"):
            raise ValueError(f"precision.amax_compute_algo={algo!r}: use 'max' or 'most_recent'.")
        options = (
            ("margin", 0),
            ("amax_history_len", int(cfg.amax_history_len)),
            ("amax_compute_algo", algo),
            ("reduce_amax", True),
        )
    elif recipe == "blockwise":
        options = (
            ("x_block_scaling_dim", 1),
            ("w_block_scaling_dim", 2),
            ("grad_block_scaling_dim", 1),
        )
    return RecipeSpec(recipe, RECIPE_CLASSES[recipe], FP8_FORMATS[fmt], options)


_RECIPES: dict[RecipeSpec, Any] = {}


def build_recipe(cfg_or_spec: Any, recipe_module: Any = None) -> Any:
    """The TE recipe object for a PrecisionConfig (or RecipeSpec). `recipe_module` defaults to
    `transformer_engine.common.recipe`; one object per spec is cached, so every autocast reuses
    it."""
    spec = cfg_or_spec if isinstance(cfg_or_spec, RecipeSpec) else recipe_spec(cfg_or_spec)
    if recipe_module is None:
        if spec not in _RECIPES:
            module = import_te_recipes(f"FP8 recipe {spec.recipe!r}")
            _RECIPES[spec] = getattr(module, spec.recipe_class)(**spec.kwargs(module.Format))
        return _RECIPES[spec]
    return getattr(recipe_module, spec.recipe_class)(**spec.kwargs(recipe_module.Format))


# ----------------------------------------------------------------------------------------- autocast
def fp8_context(
    cfg: Any, group: Any = None, *, te: Any = None
) -> contextlib.AbstractContextManager:
    """The autocast region a stage's forward runs in: TE's `autocast(enabled=True, recipe=<recipe>,
    amax_reduction_group=group)` for fp8_te_* precisions, a nullcontext otherwise. Enter
    it around the forward only; call backward outside it. `group`: the amax reduction group
    (mesh.tp_cp_dp_group)."""
    if not is_te(cfg):
        return contextlib.nullcontext()
    te = te if te is not None else import_te(f"precision={cfg.name}")
    recipe = build_recipe(cfg)
    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        return autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    # TE < 2.9 (deprecated in 2.9+)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


# ---------------------------------------------------------------------------------- what to convert
def _attention_candidates(root: nn.Module) -> list[Candidate]:
    """With `te_attention`: every `Attention` gets TE's DotProductAttention (which computes in BF16;
    no FP8 attention recipe is used), unless its window is too small to tell packed documents
    apart."""
    out = []
    for name, module in root.named_modules():
        if isinstance(module, Attention):
            window = _window_of(root, name)
            why = ""
            if window is not None and window < 2:
                why = f"sliding window {window} < 2: packed documents cannot be told apart"
            out.append(Candidate(name, "attention", module, why))
    return out


def _window_of(root: nn.Module, attention_name: str) -> int | None:
    """The sliding window of the attention module `attention_name` (None: global, causal)."""
    layer_name = attention_name.rpartition(".")[0]
    layer = root.get_submodule(layer_name) if layer_name else None
    config = getattr(root, "config", None)
    if isinstance(layer, DecoderLayer) and layer.is_sliding and config is not None:
        return config.sliding_window
    return None


# ----------------------------------------------------------------------------------------- the pass
def apply_te(
    root: nn.Module,
    precision_cfg: Any,
    tp_group: Any = None,
    *,
    amax_group: Any = None,
    num_layers: int | None = None,
    autocast_forward: bool = True,
    strict: bool = False,
    te: Any = None,
) -> PrecisionReport:
    """Convert `root` (a model or pipeline chunk, after the TP and EP passes, on the meta device) to
    TE modules in place: the `apply.fp8_candidates` of every backend, at the recipe's alignment,
    plus TE attention with `precision_cfg.te_attention`; return what was done.

    TE modules run on the local shards with `parallel_mode=None` and our TP/SP hooks do the
    communication (module docstring, point 1), so `tp_group` is only the fallback amax reduction
    group when `amax_group` is None. `amax_group`: pass `mesh.tp_cp_dp_group`. `num_layers`: the
    model's decoder layer count (default `root.config.num_hidden_layers`). `autocast_forward`: wrap
    `root.forward` in `fp8_context` (leave False if the caller enters `fp8_context` around each
    stage forward itself). `strict`: raise instead of keeping misaligned modules in BF16. `te`: the
    `transformer_engine.pytorch` module (tests inject a stand-in).
    """
    spec = recipe_spec(precision_cfg)
    if te is None:
        te = import_te(f"precision={precision_cfg.name}")
        if not torch.cuda.is_available():
            raise TEUnavailable(
                f"precision={precision_cfg.name}: Transformer Engine modules need a CUDA device "
                "(TE raises 'TransformerEngine needs CUDA.' otherwise); run on a GPU or use "
                "precision=fp8_emulated / bf16 here."
            )
    if num_layers is None:
        num_layers = root.config.num_hidden_layers
    # attention first: its conversion reads the shapes of the projections before they are swapped
    candidates = _attention_candidates(root) if precision_cfg.te_attention else []
    candidates += fp8_candidates(root, precision_cfg, num_layers, spec.weight_align)
    misaligned = [c for c in candidates if NOT_ALIGNED in c.reason]
    if strict and misaligned:
        raise ValueError(
            f"these modules cannot run FP8 GEMMs with recipe {spec.recipe!r}: "
            + "; ".join(f"{c.name}: {c.reason}" for c in misaligned)
        )
    report = PrecisionReport()
    for c in candidates:
        if c.reason:
            report.bf16[c.name] = c.reason
        elif c.kind == "linear":
            _swap(root, c.name, _te_linear(c.module, te))
        elif c.kind == "experts":
            _convert_experts(c.module, te, spec)
        else:
            _convert_attention(c.module, te, _window_of(root, c.name))
        if not c.reason:
            report.fp8.append(c.name)
    if autocast_forward:
        _wrap_forward(root, precision_cfg, amax_group if amax_group is not None else tp_group, te)
    log.info(
        "Transformer Engine %s(%s): %d module(s) converted; kept in BF16: %s",
        spec.recipe_class,
        spec.fp8_format,
        len(report.fp8),
        ", ".join(sorted(report.bf16)) or "none",
    )
    warn_misaligned(precision_cfg.name, report)
    return report


def _wrap_forward(root: nn.Module, cfg: Any, group: Any, te: Any) -> None:
    original = root.forward

    def forward(*args, **kwargs):
        with fp8_context(cfg, group, te=te):
            return original(*args, **kwargs)

    root.forward = forward


# ------------------------------------------------------------------------------------- module swaps
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule `name` by `new`, carrying over the old module's hooks (e.g. mtp.fc's TP
    hooks)."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, attr)
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks) and hasattr(new, hooks):
            getattr(new, hooks).update(getattr(old, hooks))
    setattr(parent, attr, new)


def _materialize_plain_tensors_once(module: nn.Module) -> None:
    """TE stores absent biases as plain empty tensors on the construction device
    ([module/linear.py], [module/grouped_linear.py]); built on meta, `materialize`'s `to_empty` does
    not move them. Move them to the input's device before the first forward."""

    def hook(mod: nn.Module, args: tuple) -> None:
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
        if device is not None:
            for key, value in list(vars(mod).items()):
                if (
                    isinstance(value, torch.Tensor)
                    and not isinstance(value, nn.Parameter)
                    and value.device.type == "meta"
                ):
                    setattr(mod, key, torch.empty_like(value, device=device))
        handle.remove()

    handle = module.register_forward_pre_hook(hook)


def _te_linear(linear: nn.Linear, te: Any) -> nn.Module:
    """te.Linear with the local shape of `linear`, no bias, no TE parallelism, holding
    `linear`'s own weight Parameter. Built on "meta" (TE defers init there,
    `reset_parameters(defer_init=device == "meta")`)."""
    weight = linear.weight
    out_features, in_features = weight.shape
    new = te.Linear(
        in_features=in_features,
        out_features=out_features,
        bias=False,
        params_dtype=weight.dtype,
        parallel_mode=None,
        device="meta",
    )
    new.weight = weight
    _materialize_plain_tensors_once(new)
    return new


class TEGroupedExperts(GroupedExperts):
    """Routed experts whose grouped GEMMs run in `te.GroupedLinear`, over our stacked parameters
    (names, shapes and init unchanged). Set up by `_convert_experts`: `te_gate`, `te_up`, `te_down`
    (GroupedLinear with their per-GEMM weight Parameters removed), `te_pad` / `te_unpad` (Fp8Padding
    / Fp8Unpadding) and `te_align` (the rows each split is padded to)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        splits = [int(c) for c in counts.tolist()]
        rows = x.shape[0]
        if rows == 0:
            # Nothing routed here, but every TE module must still run: DelayedScaling registers a
            # module's amaxes on its first forward and all-reduces them by position over the amax
            # group, so a rank that skipped would misalign every rank's buffer. One aligned block of
            # zero rows for the first expert gives zero outputs (cut off below) and zero gradients.
            x = torch.cat([x, x.new_zeros(self.te_align, x.shape[1])])
            splits = [self.te_align] + [0] * (len(splits) - 1)
        x, padded = self.te_pad(x, splits)
        padded = [int(m) for m in padded]
        gate = _grouped_gemm(self.te_gate, x, padded, self.gate_proj)
        up = _grouped_gemm(self.te_up, x, padded, self.up_proj)
        out = _grouped_gemm(self.te_down, F.silu(gate) * up, padded, self.down_proj)
        out = out if padded == splits else self.te_unpad(out, splits)
        return out[:rows]


def _grouped_gemm(
    module: nn.Module, x: torch.Tensor, splits: list[int], stacked: torch.Tensor
) -> torch.Tensor:
    """y = per-split x_e @ stacked[e].T by `module` (a te.GroupedLinear), with its weight{e} bound
    to views of the stacked tensor; one UnbindBackward gathers the expert gradients into the stacked
    gradient."""
    for e, weight in enumerate(stacked.unbind(0)):
        setattr(module, f"weight{e}", weight)
    return module(x, splits)


_TE_EXPERT_CLASSES: dict[type, type] = {}


def _te_experts_class(cls: type) -> type:
    """TE variant of an experts class: TEGroupedExperts itself, or a subclass combining e.g.
    ExpertParallelExperts (whose all-to-all forward calls `super().forward`, which then resolves to
    the TE GEMMs)."""
    if issubclass(cls, TEGroupedExperts):
        return cls
    if cls is GroupedExperts:
        return TEGroupedExperts
    if cls not in _TE_EXPERT_CLASSES:
        _TE_EXPERT_CLASSES[cls] = type(
            f"TE{cls.__name__}", (cls, TEGroupedExperts), {"__module__": __name__}
        )
    return _TE_EXPERT_CLASSES[cls]


def _convert_experts(experts: GroupedExperts, te: Any, spec: RecipeSpec) -> None:
    num, inter, hidden = experts.gate_proj.shape
    dtype = experts.gate_proj.dtype

    def grouped(in_features: int, out_features: int) -> nn.Module:
        module = te.GroupedLinear(
            num_gemms=num,
            in_features=in_features,
            out_features=out_features,
            bias=False,
            params_dtype=dtype,
            parallel_mode=None,
            device="meta",
        )
        for e in range(num):  # our stacked Parameters are the weights; see _grouped_gemm
            delattr(module, f"weight{e}")
        _materialize_plain_tensors_once(module)
        return module

    experts.__class__ = _te_experts_class(type(experts))
    experts.te_gate = grouped(hidden, inter)
    experts.te_up = grouped(hidden, inter)
    experts.te_down = grouped(inter, hidden)
    experts.te_align = spec.split_align
    experts.te_pad = te.Fp8Padding(num, align_size=spec.split_align)
    experts.te_unpad = te.Fp8Unpadding(num, align_size=spec.split_align)


# ------------------------------------------------------------------------------------- TE attention
class TEAttention(Attention):
    """Attention whose core (softmax(QK^T)V) is `te.DotProductAttention` (`core_attention`);
    projections, QK-norm and RoPE as the model's. Sliding window from the constructor; packed
    documents as THD."""

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seq, -1, self.head_dim))
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        if self.use_rope:  # the model's RoPE works on [B, heads, S, D]
            q = apply_rope(q.transpose(1, 2), *rope).transpose(1, 2)
            k = apply_rope(k.transpose(1, 2), *rope).transpose(1, 2)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cu_seqlens = packed_cu_seqlens(mask, batch, seq)
        if cu_seqlens is None:
            out = self.core_attention(q, k, v, qkv_format="bshd", attn_mask_type="causal")
        else:
            tokens = batch * seq
            out = self.core_attention(
                q.view(tokens, *q.shape[2:]),
                k.view(tokens, *k.shape[2:]),
                v.view(tokens, *v.shape[2:]),
                qkv_format="thd",
                attn_mask_type="padding_causal",
                cu_seqlens_q=cu_seqlens,
                cu_seqlens_kv=cu_seqlens,
                max_seqlen_q=seq,
                max_seqlen_kv=seq,
            )
        return self.o_proj(out.reshape(batch, seq, -1))


def te_window_size(window: int | None) -> tuple[int, int]:
    """TE's inclusive (left, right) window for our sliding window W (query i sees keys i-W < j <=
    i): (W-1, 0); (-1, 0) is plain causal (`check_set_window_size`)."""
    return (-1, 0) if window is None else (window - 1, 0)


_CU_CACHE: list[tuple[weakref.ref, torch.Tensor | None]] = []


def packed_cu_seqlens(mask: Any, batch: int, seq: int) -> torch.Tensor | None:
    """int32 cumulative document lengths over the flattened [batch * seq] tokens, from the model's
    attention mask (`model.attention.attention_mask`: a boolean [B, 1, S, S] tensor, True = attend,
    or on GPU a FlexAttention BlockMask): a token starts a document when it cannot see its
    predecessor. None when no row holds more than one document (no mask, or only causal/window
    structure): use bshd + causal instead.

    Needs a sliding window >= 2 (a window of 1 hides every predecessor). One host sync per mask;
    every layer of a forward shares the mask objects, so the result is cached (by weak reference)
    for the last few masks."""
    if mask is None or seq < 2:
        return None
    for cached_mask, cached in _CU_CACHE:
        if cached_mask() is mask:
            return cached
    sees_previous = _sees_previous_token(mask, batch, seq)
    result = None
    if not bool(sees_previous.all()):
        starts = torch.ones(batch, seq, dtype=torch.bool, device=sees_previous.device)
        starts[:, 1:] = ~sees_previous
        first = starts.reshape(-1).nonzero().squeeze(1)
        end = torch.tensor([batch * seq], device=first.device, dtype=first.dtype)
        result = torch.cat([first, end]).to(torch.int32)
    _CU_CACHE.insert(0, (weakref.ref(mask), result))
    del _CU_CACHE[4:]
    return result


def _sees_previous_token(mask: Any, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq - 1] booleans: whether query i may attend to key i - 1, for i = 1 .. seq - 1."""
    if isinstance(mask, torch.Tensor):
        return mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1).expand(batch, seq - 1)
    # A BlockMask: evaluate its mask_mod (written with broadcasting tensor ops) on the sub-diagonal.
    device = mask.kv_num_blocks.device
    query = torch.arange(1, seq, device=device)[None, :]
    row = torch.arange(batch, device=device)[:, None]
    return mask.mask_mod(row, torch.zeros_like(row), query, query - 1).expand(batch, seq - 1)


def _convert_attention(attn: Attention, te: Any, window: int | None) -> None:
    heads = attn.q_proj.out_features // attn.head_dim
    kv_heads = attn.k_proj.out_features // attn.head_dim
    attn.__class__ = (
        TEAttention
        if type(attn) is Attention
        else type(f"TE{type(attn).__name__}", (type(attn), TEAttention), {"__module__": __name__})
    )
    attn.core_attention = te.DotProductAttention(
        num_attention_heads=heads,
        kv_channels=attn.head_dim,
        num_gqa_groups=kv_heads,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="causal",
        window_size=te_window_size(window),
        softmax_scale=attn.head_dim**-0.5,
    )


# ---------------------------------------------------------------------------------------- recompute
def holds_te_modules(module: nn.Module) -> bool:
    """Whether `module` contains a module `apply_te` created (a recompute of it must re-enter the
    autocast)."""
    return any(
        isinstance(m, (TEGroupedExperts, TEAttention)) or _is_te_module(m) for m in module.modules()
    )


def recompute_checkpoint(
    function: Callable,
    *args: Any,
    context_fn: Callable | None = None,
    te: Any = None,
    **kwargs: Any,
) -> Any:
    """Drop-in for `torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
    context_fn=...)` that recomputes under the forward's FP8 autocast: TE's `checkpoint`
    (transformer_engine.pytorch.checkpoint)."""
    te = te if te is not None else import_te("activation recompute of Transformer Engine modules")
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    return te.checkpoint(function, *args, use_reentrant=False, **kwargs)


# -------------------------------------------------------------------------------------- extra state
def _is_te_module(module: nn.Module) -> bool:
    """A Transformer Engine module (they all carry `fp8_meta` and FP8 `get_extra_state`), without
    importing TE."""
    return hasattr(module, "fp8_meta") and callable(getattr(module, "get_extra_state", None))


def te_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if _is_te_module(module):
            yield name, module


def te_extra_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """`<module name>._extra_state` -> TE's uint8 extra state (FP8 metadata; empty for stateless
    recipes) for every TE module of `root`. Per rank: save it next to the RNG states."""
    return {f"{name}._extra_state": module.get_extra_state() for name, module in te_modules(root)}


def load_te_extra_state(
    root: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Restore `te_extra_state` output into `root`'s TE modules; returns the keys it set. `strict`:
    every TE module must have an entry. DelayedScaling payloads need
    NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 on TE >= 2.18."""
    loaded = []
    for name, module in te_modules(root):
        key = f"{name}._extra_state"
        if key in state:
            module.set_extra_state(state[key])
            loaded.append(key)
        elif strict:
            raise KeyError(f"no saved FP8 extra state for {name}")
    return loaded


__all__ = [
    "RECIPE_CLASSES",
    "TE_PRECISIONS",
    "RecipeSpec",
    "TEAttention",
    "TEGroupedExperts",
    "TEUnavailable",
    "apply_te",
    "build_recipe",
    "fp8_context",
    "holds_te_modules",
    "import_te",
    "load_te_extra_state",
    "packed_cu_seqlens",
    "recipe_spec",
    "recompute_checkpoint",
    "te_available",
    "te_extra_state",
    "te_window_size",
]
