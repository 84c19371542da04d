"""Memory and FLOPs planner: the per-GPU memory a megatron-exaone layout needs, and the model FLOPs
per token.

    python tools/planner.py --model k_exaone_236b --tp 4 --pp 8 --ep 8 --dp 2 --seq-len 4096 \
        --micro-batch 1 --precision bf16 --recompute full [--vpp N] \
        [--zero1 | --fsdp | --no-sharding] [--optimizer adamw|muon] \
        [--offload cpu [--host-memory 1024 --gpus-per-node 8]]
    # a layout of recipes/parallel/<name>.yaml:
    python tools/planner.py --layout k_exaone_236b_h100x64 [--seq-len 32768 ...]
    # the K-EXAONE layouts (recipes/parallel/k_exaone_236b_*: the published ones and ours):
    python tools/planner.py --all-published
    # each stage of recipes/experiment/<name>.yaml:
    python tools/planner.py --experiment k_exaone_236b_h100x64

This is an ESTIMATE of what this implementation keeps. It reports every pipeline rank and flags
ranks whose peak exceeds the GPU (80 GiB by default). These are the assumptions:

Parameters. They are counted from the real model built on the meta device, split by
`parallel.pipeline.pipeline_layout` and the rank's stages, and cut as the passes cut them:
  * q/o_proj, dense and shared-expert gate/up/down_proj, embed_tokens, lm_head and mtp.fc over tp;
  * k/v_proj over tp, or one KV head per rank when tp > KV heads;
  * routed experts over ep (etp = 1);
  * norms and the router replicated.
With MTP and pp > 1 the last stage holds a second copy of the embedding.

Training state per parameter, "fsdp" (the default; FSDP2 as `parallel/data_parallel.py` applies it):
  * an fp32 parameter and the optimizer state: AdamW 8 B, Muon 4 B on hidden matrices and AdamW on
    the embedding, lm_head, router and norms (`training/optim.py`), sharded over dp x cp for dense
    parameters and over edp = tp*cp*dp/ep for routed experts (unsharded when edp = 1);
  * an fp32 gradient. A step of several micro-batches accumulates it unsharded (FSDP2 without
    gradient sync, as the trainer and the pipeline schedules run it) and reduce-scatters it after
    the last one, so backward holds 4 B per local parameter and the optimizer step the sharded 4 B.
    `--reduce-each-micro-batch` (parallel.reduce_grads_each_micro_batch, or a step of one
    micro-batch) reduce-scatters it in every backward: sharded 4 B throughout.
  * Under pipeline parallelism the schedules also keep each stage's gathered bf16 parameters (2 B)
    from the first backward to the end of the step, unless gradients are reduced each micro-batch;
    `--keep-gathered` (parallel.reshard_after_forward=false) keeps them from the first forward.
"zero1" is Megatron's distributed optimizer, for comparison (this trainer does not implement it): a
bf16 parameter 2 B and an fp32 gradient 4 B, unsharded, and fp32 master + moments sharded over dp /
edp. "no-sharding" is this trainer with parallel.fsdp=false: everything fp32 and unsharded. It also
COMPUTES in fp32, so activations take 4 B per value. fp8 keeps the same master weights, gradients
and optimizer state as bf16; with --fp8-weight-cache (precision.fp8_weight_cache) the parameters row
adds the FP8 copies of each FP8 layer's weights that the step keeps (forward's and the transposed
one for backward: 2 B per element), and of the head's with --fp8-lm-head (precision.fp8_lm_head;
without the cache the loss makes those 2 B per head weight as a transient).

`--offload cpu` (optim.offload=cpu, `training/offload.py`) moves the AdamW groups' fp32 master
weights, gradients and moments to the host: 16 B per local element there, summed over the
--gpus-per-node ranks of a node (each counted as the worst rank) against --host-memory (default 1
TiB per node of 8 GPUs). With AdamW under FSDP2 the GPU then stores bf16 parameters (2 B, sharded)
and the reduced bf16 gradient (2 B, sharded; the unsharded accumulation stays fp32) and holds no
optimizer state; the step's copies convert dtypes on the GPU, one parameter shard at a time (an fp32
copy each way: 8 B per element of the largest shard). Under Muon only the AdamW groups' moments
leave the GPU; without sharding only the moments do.

Activations per micro-batch and decoder layer are what autograd saves in this model's code, with b*s
tokens, s/tp per rank under sequence parallel, a = 2 B (bf16):
  * RMSNorm keeps its fp32 input and its bf16 output.
  * Attention keeps:
    - the all-gathered input;
    - q and k before their QK-norm (fp32) and after it (plus RoPE);
    - v and the output;
    - the logsumexp;
    - the copy feeding o_proj.
    It runs SDPA's flash kernel (causal) or FlexAttention (sliding window, packed documents,
    context parallel): no S x S probabilities and no dense mask. Under context parallel (s/cp
    tokens per rank) attention also keeps the K and V it gathered over cp: the whole sequence's
    for global layers, every chunk's last W - 1 tokens for sliding layers.
  * The dense MLP keeps the gathered input and four [tokens, I/tp] tensors.
  * The MoE block keeps:
    - fp32 router input and scores;
    - the k*s/tp permuted tokens (times --moe-imbalance);
    - four expert intermediates;
    - the fp32 weighted copy in `combine`;
    - the shared expert like the dense MLP.
  * fp8: every FP8 linear saves its input quantized (1 B), once per linear. q/k/v and gate/up each
    quantize the same input. The first/last layers (--bf16-layers) and MTP (unless --fp8-mtp) stay
    bf16.
  * Recompute "full" keeps each layer's input and recomputes one layer at a time in backward
    (counted once). "selective" keeps the inputs of the recomputed modules (--recompute-modules).
  * Per micro-batch, each stage also keeps FlexAttention's block masks (int32 block indices of 128 x
    128 tiles, forward and backward, full and partial: 16 B per tile of [s/cp, s]): the sliding one,
    plus the global one when documents are packed or under context parallel (--no-packing drops it
    otherwise), and RoPE's cos/sin.
  * The last stage keeps, per loss call (main + MTP), the fused vocab-parallel cross entropy's saved
    hidden-state gradient and its fp32 [V/tp, H] weight gradient.
  * In flight: pipeline rank r holds pp - r micro-batches under 1F1B (the first rank pp). An
    interleaved schedule (--vpp > 1) holds (1 + (pp - 1) / (pp * vpp)) times more.
  * Transients at the peak, not saved:
    - the all-to-all send and receive buffers of one MoE layer;
    - one TP all-gather;
    - FSDP2's all-gather of the current and the prefetched layer (bf16; also over a group of one
      rank, where it casts) unless the step holds them all (see above), and the reduce-scatter of
      one layer (bf16 gradient + fp32 reduce buffer);
    - the root module's parameters (embedding, head, MTP fc), which stay gathered for the whole step
      (reshard_after_forward=False).
  * The optimizer step runs after backward, on reduced (sharded) gradients, with the gathered copies
    freed. foreach AdamW then allocates one fp32 copy of its local state (`exp_avg_sq.sqrt()`). Muon
    also holds three fp32 copies of the largest full matrix it orthogonalises. The peak is the
    larger of backward's (states + activations + training transients) and the step's (its states +
    step temporaries).
  * A fixed 2 GiB covers the CUDA context and the NCCL / cuBLAS workspaces. Allocator fragmentation
    is not modelled: keep a margin.

FLOPs per token: `megatron_exaone.training.flops.flops_per_token`. It counts model FLOPs: forward
and backward over active parameters, sliding vs global attention, and MTP. "With recompute" adds the
recomputed forward (full: every decoder layer; selective: the recomputed modules).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig
from megatron_exaone.model.config import DENSE, PRESETS, SLIDING
from megatron_exaone.model.init import is_stacked_experts
from megatron_exaone.model.model import mtp_enabled
from megatron_exaone.parallel.features import Build, validate_build
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims
from megatron_exaone.parallel.pipeline import (
    check_schedule,
    embedding_copies,
    local_stage_indices,
    pipeline_layout,
)
from megatron_exaone.training.flops import attended_keys, flops_per_token, fp8_matmul_flops

REPO = Path(__file__).resolve().parent.parent
PARALLEL_RECIPES = REPO / "recipes" / "parallel"
MODEL_RECIPES = REPO / "recipes" / "model"
GIB = 1024**3
RUNTIME_OVERHEAD_GIB = 2.0
# as training/optim.py _ADAMW_ONLY
ADAMW_ONLY = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")
SHARDINGS = ("fsdp", "zero1", "none")
# --all-published: each layout with these (optimizer, offload)
OPTIMIZER_ROWS = (("adamw", "none"), ("muon", "none"), ("adamw", "cpu"))
PUBLISHED_PREFIX = "k_exaone_236b_"

ROWS = (
    "parameters",
    "gradients",
    "optimizer state",
    "activations (saved)",
    "recompute / transient layer",
    "communication buffers",
    "optimizer step temporaries",
    "runtime overhead",
)


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PlanInput:
    model: ModelConfig
    dims: ParallelDims  # resolved (dp known)
    seq_len: int = 4096
    micro_batch: int = 1
    precision: str = "bf16"  # bf16 | fp8
    recompute: str = "full"  # full | selective | none
    recompute_modules: tuple[str, ...] = ("attention",)
    sharding: str = "fsdp"  # fsdp | zero1 | none
    keep_gathered: bool = False  # fsdp: parallel.reshard_after_forward=false
    reduce_each_micro_batch: bool = False  # fsdp: parallel.reduce_grads_each_micro_batch
    fp8_weight_cache: bool = False  # fp8: precision.fp8_weight_cache
    fp8_mtp: bool = False  # fp8: precision.fp8_mtp
    fp8_lm_head: bool = False  # fp8: precision.fp8_lm_head
    optimizer: str = "adamw"  # adamw | muon
    offload: str = "none"  # none | cpu: optim.offload
    host_gib: float = 1024.0  # host memory per node, for --offload cpu
    gpus_per_node: int = 8
    sequence_parallel: bool = True
    packed: bool = True
    bf16_layers: tuple[int, int] = (1, 1)  # fp8: decoder layers kept bf16 at each end
    moe_imbalance: float = 1.0
    gpu_gib: float = 80.0
    model_name: str = ""
    layout_name: str = ""


@dataclass
class RankMemory:
    """Bytes per category on one pipeline rank, and the stages it runs."""

    pp_rank: int
    stages: list[int]
    layers: int
    in_flight: float
    dense_params: int = 0
    expert_params: int = 0
    bytes: dict[str, float] = field(default_factory=dict)
    # parameters + gradients + optimizer state as the optimizer step holds them
    step_states: float = 0.0
    # host memory of optim.offload=cpu: masters, gradients and moments
    host_bytes: float = 0.0

    @property
    def peak(self) -> float:
        b = self.bytes
        states = b["parameters"] + b["gradients"] + b["optimizer state"]
        training = (
            b["activations (saved)"] + b["recompute / transient layer"] + b["communication buffers"]
        )
        step = self.step_states + b["optimizer step temporaries"]
        return max(states + training, step) + b["runtime overhead"]


@dataclass
class Plan:
    inp: PlanInput
    ranks: list[RankMemory]
    total_params: int
    flops_per_token: float
    flops_per_token_recompute: float
    fp8_flops_per_token: float  # of flops_per_token, in FP8 GEMMs

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def host_per_node(self) -> float:
        """Host bytes per node for optim.offload=cpu: the worst rank's, times the GPUs of a node."""
        return self.inp.gpus_per_node * max(r.host_bytes for r in self.ranks)

    @property
    def fits_host(self) -> bool:
        return self.host_per_node <= self.inp.host_gib * GIB

    def fits_gpu(self, rank: RankMemory) -> bool:
        return rank.peak <= self.inp.gpu_gib * GIB

    @property
    def fits(self) -> bool:
        return self.fits_gpu(self.worst) and self.fits_host


# --------------------------------------------------------------------------------------- parameters
_PARAMS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}


def _model_params(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, full shape) of every parameter of the model, built once per config on the meta
    device."""
    key = repr(model)
    if key not in _PARAMS:
        with torch.device("meta"):
            built = ExaoneMoeForCausalLM(model)
        _PARAMS[key] = tuple((name, tuple(p.shape)) for name, p in built.named_parameters())
    return _PARAMS[key]


def _unit_of(name: str) -> str:
    """E (embedding), L<i> (decoder layer i) or H (final norm, lm_head, MTP)."""
    if name.startswith("model.embed_tokens."):
        return "E"
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return f"L{match.group(1)}" if match else "H"


def local_numel(name: str, shape: tuple[int, ...], model: ModelConfig, dims: ParallelDims) -> int:
    """Elements of parameter `name` one rank holds after the tensor and expert parallel passes."""
    n = math.prod(shape)
    if is_stacked_experts(name):
        return n // dims.ep // dims.etp
    tp = dims.tp
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        kv = model.num_key_value_heads
        return n // tp if kv % tp == 0 else n // kv
    if name.endswith(
        (
            "q_proj.weight",
            "o_proj.weight",
            "gate_proj.weight",
            "up_proj.weight",
            "down_proj.weight",
            "embed_tokens.weight",
            "lm_head.weight",
            "mtp.fc.weight",
        )
    ):
        return n // tp
    return n  # norms, router (mlp.gate.weight): replicated


@dataclass
class UnitParams:
    dense: int = 0
    expert: int = 0
    dense_adamw: int = 0  # dense parameters in the AdamW group under Muon
    largest_matrix: int = 0
    largest_local: int = 0  # elements of the largest parameter shard on a rank (after FSDP2)


def unit_params(model: ModelConfig, dims: ParallelDims) -> dict[str, UnitParams]:
    units: dict[str, UnitParams] = {}
    for name, shape in _model_params(model):
        u = units.setdefault(_unit_of(name), UnitParams())
        n = local_numel(name, shape, model, dims)
        shards = dims.edp if is_stacked_experts(name) else dims.dp * dims.cp
        u.largest_local = max(u.largest_local, -(-n // shards))
        if is_stacked_experts(name):
            u.expert += n
            u.largest_matrix = max(u.largest_matrix, math.prod(shape[1:]))
        else:
            u.dense += n
            if len(shape) < 2 or name.endswith(ADAMW_ONLY):
                u.dense_adamw += n
            else:
                u.largest_matrix = max(u.largest_matrix, math.prod(shape))
    return units


# -------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Ctx:
    m: ModelConfig
    tokens: int  # b * s (per cp rank)
    seq: int
    batch: int
    tp: int
    sp: bool
    a: int  # activation bytes
    imbalance: float
    cp: int = 1

    @property
    # the keys each query may attend to: the whole sequence (gathered under cp)
    def keys(self) -> int:
        return self.seq * self.cp

    @property
    def ts(self) -> float:  # tokens of sequence-parallel regions on one rank
        return self.tokens / self.tp if self.sp else self.tokens

    @property
    def tm(self) -> float:  # tokens a MoE block routes on one rank (always split over tp)
        return self.tokens / self.tp

    @property
    def q_loc(self) -> int:
        return self.m.num_attention_heads * self.m.head_dim // self.tp

    @property
    def kv_loc(self) -> int:
        kv = self.m.num_key_value_heads
        return (kv // self.tp if kv % self.tp == 0 else 1) * self.m.head_dim


def _norm(c: _Ctx) -> float:
    return c.ts * c.m.hidden_size * (4 + c.a)


def _attention(c: _Ctx, fp8: bool, sliding: bool) -> float:
    h, t = c.m.hidden_size, c.tokens
    gathered = 3 * t * h * 1 if fp8 else t * h * c.a
    q = t * c.q_loc * (4 + 2 * c.a)
    k = t * c.kv_loc * (4 + 2 * c.a)
    v = t * c.kv_loc * c.a
    out = t * c.q_loc * c.a + t * c.q_loc * (1 if fp8 else c.a)  # SDPA output + o_proj input copy
    lse = c.batch * (c.m.num_attention_heads // c.tp) * c.seq * 4
    return (
        gathered + q + k + v + out + lse + 2 * c.batch * _gathered_keys(c, sliding) * c.kv_loc * c.a
    )


def _gathered_keys(c: _Ctx, sliding: bool) -> int:
    """Keys a layer gathers over cp (K and V each): the whole sequence, or for a sliding layer every
    chunk's last W - 1 tokens when a chunk is that long (parallel/context_parallel.py); none without
    cp."""
    if c.cp == 1:
        return 0
    window = c.m.sliding_window
    if sliding and window and window - 1 <= c.seq // 2:
        return 2 * c.cp * (window - 1) + c.seq
    return c.keys


def _swiglu(c: _Ctx, tokens: float, inter_local: float, fp8: bool) -> float:
    h = c.m.hidden_size
    gathered = 2 * tokens * h * 1 if fp8 else tokens * h * c.a
    return gathered + tokens * inter_local * (3 * c.a + (1 if fp8 else c.a))


def _moe(c: _Ctx, fp8: bool) -> float:
    m, h = c.m, c.m.hidden_size
    k, rows = m.num_experts_per_tok, c.tm * m.num_experts_per_tok * c.imbalance
    router = c.tm * h * 4 + 3 * c.tm * m.num_experts * 4
    dispatched = 2 * rows * h * 1 if fp8 else rows * h * c.a
    experts = rows * m.moe_intermediate_size * (3 * c.a + (1 if fp8 else c.a))
    combine = c.tm * k * h * 4
    shared = (
        _swiglu(c, c.tokens, m.moe_intermediate_size * m.num_shared_experts / c.tp, fp8)
        if m.num_shared_experts
        else 0
    )
    return router + dispatched + experts + combine + shared


def layer_activations(
    c: _Ctx, attention_type: str, mlp_type: str, fp8: bool, recompute: str, modules: tuple[str, ...]
) -> tuple[float, float]:
    """(saved bytes of one decoder layer for one micro-batch, bytes alive while it is
    recomputed/backpropagated)."""
    attention = _attention(c, fp8, attention_type == SLIDING)
    mlp = (
        _swiglu(c, c.tokens, c.m.intermediate_size / c.tp, fp8)
        if mlp_type == DENSE
        else _moe(c, fp8)
    )
    whole = 2 * _norm(c) + attention + mlp
    layer_input = c.ts * c.m.hidden_size * c.a
    if recompute == "full":
        return layer_input, whole
    if recompute == "selective":
        saved, peak = whole, 0.0
        if "attention" in modules:
            saved += c.tokens * c.m.hidden_size * c.a - attention
            peak = max(peak, attention)
        kind = "mlp" if mlp_type == DENSE else "moe"
        if kind in modules:
            saved += (c.tokens if kind == "mlp" else c.ts) * c.m.hidden_size * c.a - mlp
            peak = max(peak, mlp)
        return saved, peak
    return whole, 0.0


def head_activations(
    c: _Ctx, fp8_mtp: bool, recompute: str, modules: tuple[str, ...], fp8_head_operands: float = 0
) -> tuple[float, float]:
    """(saved, transient) bytes of the last stage's final norm, losses and MTP for one micro-batch.
    `fp8_head_operands`: the FP8 head weight copies a loss call makes (precision.fp8_lm_head without
    the cache)."""
    m, h = c.m, c.m.hidden_size
    losses = 1 + (m.num_nextn_predict_layers if mtp_enabled(m) else 0)
    saved = _norm(c) + losses * (c.tokens * h * c.a + m.vocab_size / c.tp * h * 4)
    # a chunk of fp32 logits, exp and gradient
    transient = 3 * 1024 * m.vocab_size / c.tp * 4 + fp8_head_operands
    if mtp_enabled(m):
        for kind in m.mtp_layer_types:
            per_depth = (
                3 * _norm(c) + c.ts * 2 * h * c.a + c.tokens * 2 * h * c.a + c.tokens * h * c.a
            )
            layer_saved, layer_peak = layer_activations(c, kind, DENSE, fp8_mtp, recompute, modules)
            saved += per_depth + layer_saved
            transient = max(transient, layer_peak)
    return saved, transient


# ----------------------------------------------------------------------------------------- the plan
def _schedule(dims: ParallelDims) -> str:
    return "1f1b" if dims.vpp == 1 else "interleaved_1f1b"


def in_flight(pp_rank: int, dims: ParallelDims) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at once (1F1B warm-up
    depth)."""
    if dims.pp == 1:
        return 1.0
    base = float(dims.pp - pp_rank)
    if dims.vpp > 1:
        base *= 1 + (dims.pp - 1) / (dims.pp * dims.vpp)
    return base


def validate_layout(inp: PlanInput) -> None:
    """Raise LayoutError (with the mesh's message) unless this trainer can run the layout."""
    d = inp.dims
    d.validate(d.tp * d.cp * d.pp * d._resolved_dp(), inp.model)
    validate_build(Build(inp.model, dims=d))
    if d.pp > 1:
        check_schedule(_schedule(d), d.pp, d.vpp, d.pp * d.vpp)
    pipeline_layout(inp.model, d.pp, d.vpp)
    if inp.offload == "cpu" and inp.sharding == "zero1":
        raise LayoutError(
            "--offload cpu with --zero1: zero1 is Megatron's distributed optimizer, shown for "
            "comparison; this trainer offloads under FSDP2 (--fsdp) or without sharding."
        )
    if inp.seq_len % (d.tp * d.cp) and inp.sequence_parallel:
        raise LayoutError(
            f"seq_len={inp.seq_len} does not split over tp*cp={d.tp * d.cp} for sequence parallel."
        )


def plan(inp: PlanInput) -> Plan:
    validate_layout(inp)
    m, d = inp.model, inp.dims
    units = unit_params(m, d)
    specs = pipeline_layout(m, d.pp, d.vpp)
    fp8 = inp.precision == "fp8"
    a = 4 if inp.sharding == "none" else 2
    c = _Ctx(
        m,
        inp.micro_batch * inp.seq_len // d.cp,
        inp.seq_len // d.cp,
        inp.micro_batch,
        d.tp,
        inp.sequence_parallel and d.tp > 1,
        a,
        inp.moe_imbalance,
        d.cp,
    )
    first_bf16, last_bf16 = inp.bf16_layers

    # the precision pass's rule: the first/last decoder layers stay bf16
    def is_fp8_layer(j: int) -> bool:
        return fp8 and first_bf16 <= j < m.num_hidden_layers - last_bf16

    dense_shards = d.dp * d.cp
    expert_shards = d.edp
    head_weights = m.vocab_size // d.tp * m.hidden_size
    ranks = []
    for pp_rank in range(d.pp):
        stage_ids = local_stage_indices(_schedule(d), pp_rank, d.pp, d.vpp) if d.pp > 1 else [0]
        r = RankMemory(
            pp_rank, stage_ids, sum(len(specs[i].layers) for i in stage_ids), in_flight(pp_rank, d)
        )
        names: list[str] = []
        for i in stage_ids:
            spec = specs[i]
            names += (["E"] if spec.embedding else []) + [f"L{j}" for j in spec.layers]
            if spec.head:
                names += ["H"] + (["E"] * (embedding_copies(m, d.pp) - 1))
        rank_units = [units[n] for n in names]
        r.dense_params = sum(u.dense for u in rank_units)
        r.expert_params = sum(u.expert for u in rank_units)
        dense_adamw = sum(u.dense_adamw for u in rank_units)
        _state_bytes(r, inp, dense_adamw, dense_shards, expert_shards)
        if inp.offload == "cpu":
            _offload(r, inp, dense_adamw, max(u.largest_local for u in rank_units))
        # forward's and backward's FP8 copies of every FP8 layer's weights
        if fp8 and inp.fp8_weight_cache:
            fp8_layers = [f"L{j}" for i in stage_ids for j in specs[i].layers if is_fp8_layer(j)]
            r.bytes["parameters"] += 2 * sum(units[n].dense + units[n].expert for n in fp8_layers)
            if inp.fp8_lm_head and "H" in names:
                r.bytes["parameters"] += 2 * head_weights
        # Newton-Schulz on one gathered full matrix at a time (x, gram, update)
        if inp.optimizer == "muon":
            r.bytes["optimizer step temporaries"] += (
                3 * 4 * max(u.largest_matrix for u in rank_units)
            )
        # activations: each chunk's layers for every micro-batch in flight; the head for one (the
        # last stage runs its backward right after its forward)
        saved = transient = 0.0
        masks = 1 + (inp.packed or d.cp > 1)
        block_masks = masks * 16 * c.batch * -(-c.seq // 128) * -(-c.keys // 128)
        per_microbatch = block_masks + 2 * c.batch * c.seq * m.head_dim * a  # + RoPE's cos and sin
        for i in stage_ids:
            spec = specs[i]
            chunk = per_microbatch
            for j in spec.layers:
                layer_saved, layer_peak = layer_activations(
                    c,
                    m.layer_types[j],
                    m.mlp_layer_types[j],
                    is_fp8_layer(j),
                    inp.recompute,
                    inp.recompute_modules,
                )
                chunk += layer_saved
                transient = max(transient, layer_peak)
            saved += chunk * r.in_flight
            if spec.head:
                head_operands = (
                    2 * head_weights if fp8 and inp.fp8_lm_head and not inp.fp8_weight_cache else 0
                )
                head_saved, head_peak = head_activations(
                    c, fp8 and inp.fp8_mtp, inp.recompute, inp.recompute_modules, head_operands
                )
                saved += head_saved
                transient = max(transient, head_peak)
        r.bytes["activations (saved)"] = saved
        r.bytes["recompute / transient layer"] = transient
        r.bytes["communication buffers"] = _comm_bytes(inp, c, units, names)
        r.bytes["runtime overhead"] = RUNTIME_OVERHEAD_GIB * GIB
        ranks.append(r)
    total = sum(math.prod(s) for _, s in _model_params(m))
    fpt = flops_per_token(m, inp.seq_len)
    fp8_fpt = (
        fp8_matmul_flops(m, first_bf16, last_bf16, fp8_mtp=inp.fp8_mtp, fp8_lm_head=inp.fp8_lm_head)
        if fp8
        else 0
    )
    return Plan(
        inp,
        ranks,
        total,
        fpt,
        fpt + recompute_flops_per_token(m, inp.seq_len, inp.recompute, inp.recompute_modules),
        fp8_fpt,
    )


def _state_bytes(
    r: RankMemory, inp: PlanInput, dense_adamw: int, dense_shards: int, expert_shards: int
) -> None:
    """Parameters, gradients, optimizer state and the optimizer step's temporaries."""
    dense, expert = r.dense_params, r.expert_params
    muon = inp.optimizer == "muon"
    dense_moments = (8 * dense_adamw + 4 * (dense - dense_adamw)) if muon else 8 * dense
    expert_moments = (4 if muon else 8) * expert
    adamw_params = dense_adamw if muon else dense + expert
    if inp.sharding == "fsdp":
        sharded = 4 * dense / dense_shards + 4 * expert / expert_shards
        r.bytes["parameters"] = sharded + (2 * (dense + expert) if _holds_gathered(inp) else 0)
        r.bytes["gradients"] = 4 * (dense + expert) if _accumulates(inp) else sharded
        r.bytes["optimizer state"] = dense_moments / dense_shards + expert_moments / expert_shards
        # gathered copies freed, gradients reduced
        r.step_states = 2 * sharded + r.bytes["optimizer state"]
        adamw_local = (
            adamw_params / dense_shards if muon else dense / dense_shards + expert / expert_shards
        )
    elif inp.sharding == "zero1":
        r.bytes["parameters"] = 2 * (dense + expert)
        r.bytes["gradients"] = 4 * (dense + expert)
        r.bytes["optimizer state"] = (4 * dense + dense_moments) / dense_shards + (
            4 * expert + expert_moments
        ) / expert_shards
        adamw_local = (
            adamw_params / dense_shards if muon else dense / dense_shards + expert / expert_shards
        )
    else:
        r.bytes["parameters"] = 4 * (dense + expert)
        r.bytes["gradients"] = 4 * (dense + expert)
        r.bytes["optimizer state"] = dense_moments + expert_moments
        adamw_local = adamw_params
    # foreach AdamW: one fp32 copy (exp_avg_sq.sqrt())
    r.bytes["optimizer step temporaries"] = 4 * adamw_local
    if inp.sharding != "fsdp":
        r.step_states = r.bytes["parameters"] + r.bytes["gradients"] + r.bytes["optimizer state"]


def _offload(r: RankMemory, inp: PlanInput, dense_adamw: int, largest_local: int) -> None:
    """optim.offload=cpu: the AdamW groups' state moves to the host (see the module docstring)."""
    d = inp.dims
    if inp.optimizer == "muon":  # the AdamW groups' moments and their step temporary leave
        host = dense_adamw / (d.dp * d.cp) if inp.sharding == "fsdp" else dense_adamw
        r.bytes["optimizer state"] -= 8 * host
        r.bytes["optimizer step temporaries"] -= 4 * host
        r.step_states -= 8 * host
    elif inp.sharding == "fsdp":  # bf16 parameters and reduced gradients over host masters
        dense, expert = r.dense_params, r.expert_params
        host = dense / (d.dp * d.cp) + expert / d.edp
        r.bytes["parameters"] = 2 * host + (2 * (dense + expert) if _holds_gathered(inp) else 0)
        r.bytes["gradients"] = 4 * (dense + expert) if _accumulates(inp) else 2 * host
        r.bytes["optimizer state"] = 0
        # the copies convert on the GPU: an fp32 copy of one parameter shard each way
        r.bytes["optimizer step temporaries"] = 8 * largest_local
        r.step_states = 4 * host
    else:  # no sharding: fp32 parameters and gradients stay, the moments leave
        host = r.dense_params + r.expert_params
        r.step_states -= r.bytes["optimizer state"]
        r.bytes["optimizer state"] = r.bytes["optimizer step temporaries"] = 0
    r.host_bytes = 16 * host


def _accumulates(inp: PlanInput) -> bool:
    """FSDP2 accumulates unsharded gradients over the step's micro-batches."""
    return not inp.reduce_each_micro_batch


def _holds_gathered(inp: PlanInput) -> bool:
    """FSDP2 keeps gathered bf16 parameters through the step: the pipeline schedules do (from the
    first backward) unless gradients are reduced each micro-batch, and
    parallel.reshard_after_forward=false does."""
    return inp.keep_gathered or (inp.dims.pp > 1 and not inp.reduce_each_micro_batch)


def _comm_bytes(inp: PlanInput, c: _Ctx, units: dict[str, UnitParams], names: list[str]) -> float:
    m, h = c.m, c.m.hidden_size
    layers = [units[n] for n in names if n.startswith("L")]
    rows = c.tm * m.num_experts_per_tok * c.imbalance
    has_moe = any(u.expert for u in layers)
    # all-to-all send+recv, one TP gather
    total = (2 * rows * h * c.a if has_moe else 0) + c.tokens * h * c.a
    total += 2 * c.ts * h * c.a  # pipeline send/recv
    # FSDP2 gathers a BF16 copy of every unit on GPU, also over a group of one rank (that is where
    # it casts).
    if inp.sharding == "fsdp" and layers:
        total += _gathered(inp, [u.dense for u in layers])
        if not _holds_gathered(inp):  # else counted with the parameters
            root = sum(units[n].dense for n in names if not n.startswith("L"))
            total += 2 * root  # root unit stays gathered (reshard_after_forward=False)
        if has_moe:
            total += _gathered(inp, [u.expert for u in layers])
    return total


def _gathered(inp: PlanInput, layer_params: list[int]) -> float:
    """FSDP2's bf16 all-gathers of the current and the prefetched layer (unless the step holds every
    layer's, counted with the parameters) and one layer's reduce-scatter (bf16 gradient + fp32
    buffer)."""
    biggest = max(layer_params)
    return (0 if _holds_gathered(inp) else 2 * 2 * biggest) + (2 + 4) * biggest


def recompute_flops_per_token(
    m: ModelConfig, seq_len: int, recompute: str, modules: tuple[str, ...]
) -> float:
    """Forward FLOPs recomputed in backward, per token."""
    if recompute == "none":
        return 0.0
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    attn_proj = m.hidden_size * (2 * q + 2 * kv)
    dense = 3 * m.hidden_size * m.intermediate_size
    moe = (
        3 * m.hidden_size * m.moe_intermediate_size * (m.num_experts_per_tok + m.num_shared_experts)
        + m.num_experts * m.hidden_size
    )
    kinds = list(zip(m.layer_types, m.mlp_layer_types))
    if mtp_enabled(m):
        kinds += [(t, DENSE) for t in m.mtp_layer_types]
    total = 0.0
    for attention_type, mlp_type in kinds:
        attention = 2 * attn_proj + 4 * q * attended_keys(attention_type, seq_len, m.sliding_window)
        mlp = 2 * (dense if mlp_type == DENSE else moe)
        if recompute == "full":
            total += attention + mlp
        else:
            total += attention * ("attention" in modules)
            total += mlp * (("mlp" if mlp_type == DENSE else "moe") in modules)
    return total


# ------------------------------------------------------------------------------------------- output
def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def describe(inp: PlanInput) -> str:
    d = inp.dims
    layout = (
        f"tp{d.tp} pp{d.pp} ep{d.ep} etp{d.etp} dp{d.dp} cp{d.cp}"
        + (f" vpp{d.vpp}" if d.vpp > 1 else "")
        + f" = {d.world_size} GPUs (edp {d.edp})"
    )
    sharding = {
        "fsdp": f"FSDP2 (dense over dp*cp={d.dp * d.cp}, experts over edp={d.edp})",
        "zero1": f"distributed optimizer (master+moments over dp*cp={d.dp * d.cp} / edp={d.edp})",
        "none": "no sharding (fp32 compute)",
    }[inp.sharding]
    recompute = inp.recompute + (
        f" ({','.join(inp.recompute_modules)})" if inp.recompute == "selective" else ""
    )
    return (
        f"{inp.model_name or 'model'}{' / ' + inp.layout_name if inp.layout_name else ''}: "
        f"{layout}\n  seq {inp.seq_len}, micro-batch {inp.micro_batch}, {inp.precision}, recompute "
        f"{recompute}, {sharding}, {inp.optimizer}"
        f"{' (offloaded to the host)' if inp.offload == 'cpu' else ''}, "
        f"{_schedule(d) if d.pp > 1 else 'no pipeline'}{'' if inp.sequence_parallel else ', no SP'}"
    )


def format_plan(p: Plan) -> str:
    inp = p.inp
    ranks = p.ranks if len(p.ranks) <= 8 else _pick(p.ranks)
    fp8_share = (
        f"; {100 * p.fp8_flops_per_token / p.flops_per_token:.0f}% of them in FP8 GEMMs"
        if p.fp8_flops_per_token
        else ""
    )
    lines = [
        describe(inp),
        f"  parameters {p.total_params / 1e9:.1f}B; model FLOPs/token {p.flops_per_token:.3e} "
        f"(fwd+bwd), {p.flops_per_token_recompute:.3e} with recompute{fp8_share}",
        "",
    ]
    header = f"  {'per-GPU memory (GiB)':<34}" + "".join(
        f"{'pp' + str(r.pp_rank):>9}" for r in ranks
    )
    lines.append(header)
    lines.append(
        f"  {'  layers / micro-batches in flight':<34}"
        + "".join(f"{f'{r.layers}/{r.in_flight:g}':>9}" for r in ranks)
    )
    for row in ROWS:
        lines.append(f"  {row:<34}" + "".join(f"  {_gib(r.bytes[row])}" for r in ranks))
    lines.append(f"  {'peak':<34}" + "".join(f"  {_gib(r.peak)}" for r in ranks))
    lines.append(
        f"  {'fits ' + format(inp.gpu_gib, 'g') + ' GiB':<34}"
        + "".join(f"{'yes' if p.fits_gpu(r) else 'NO':>9}" for r in ranks)
    )
    w = p.worst
    if inp.offload == "cpu":
        lines.append(
            f"  {'host memory (optimizer offload)':<34}"
            + "".join(f"  {_gib(r.host_bytes)}" for r in ranks)
        )
    verdict = "fits" if p.fits_gpu(w) else "DOES NOT FIT"
    lines.append(
        f"  => {verdict}: worst pipeline rank {w.pp_rank} needs {w.peak / GIB:.1f} GiB of "
        f"{inp.gpu_gib:g} GiB"
    )
    if inp.offload == "cpu":
        lines.append(
            f"  => host memory {'fits' if p.fits_host else 'DOES NOT FIT'}: "
            f"{p.host_per_node / GIB:.0f} GiB per node of {inp.gpus_per_node} GPUs (worst rank x "
            f"{inp.gpus_per_node}) of {inp.host_gib:g} GiB"
        )
    return "\n".join(lines)


def _pick(ranks: list[RankMemory]) -> list[RankMemory]:
    worst_middle = max(ranks[1:-1], key=lambda r: r.peak)
    return [ranks[0], worst_middle, ranks[-1]]


# ---------------------------------------------------------------------------------------------- CLI
def load_model(name: str) -> ModelConfig:
    if name in PRESETS:
        return PRESETS[name]()
    path = MODEL_RECIPES / f"{name}.yaml"
    if path.is_file():
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in data.items() if k in fields})
    raise SystemExit(
        f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a recipes/model/*.yaml "
        "name."
    )


def load_layout(name: str) -> dict[str, Any]:
    import yaml

    path = Path(name) if name.endswith(".yaml") else PARALLEL_RECIPES / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PARALLEL_RECIPES.glob("*.yaml")))
        raise SystemExit(f"no parallel recipe {str(path)!r}; choose one of: {choices}")
    return yaml.safe_load(path.read_text()) or {}


def published_layouts() -> list[str]:
    return sorted(p.stem for p in PARALLEL_RECIPES.glob(f"{PUBLISHED_PREFIX}*.yaml"))


def build_input(
    args: argparse.Namespace,
    layout: dict[str, Any] | None = None,
    layout_name: str = "",
    precision: str | None = None,
) -> PlanInput:
    layout = layout or {}

    def pick(key: str, default: Any) -> Any:
        value = getattr(args, key, None)
        if value is not None:
            return value
        return layout.get(key, default) if layout.get(key) is not None else default

    tp, pp, cp = pick("tp", 1), pick("pp", 1), pick("cp", 1)
    dp = pick("dp", None)
    if dp is None:
        dp = (args.world_size // (tp * pp * cp)) if args.world_size else 1
    dims = ParallelDims(
        tp=tp, pp=pp, vpp=pick("vpp", 1), ep=pick("ep", 1), etp=pick("etp", 1), dp=dp, cp=cp
    )
    sharding = args.sharding or ("fsdp" if layout.get("fsdp", True) else "none")
    keep_gathered = args.keep_gathered or not layout.get("reshard_after_forward", True)
    reduce_each = args.reduce_each_micro_batch or layout.get("reduce_grads_each_micro_batch", False)
    return PlanInput(
        model=load_model(args.model),
        dims=dims,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        precision=precision or args.precision,
        recompute=pick("recompute", "full"),
        recompute_modules=tuple(args.recompute_modules.split(",")),
        sharding=sharding,
        keep_gathered=keep_gathered and sharding == "fsdp",
        fp8_weight_cache=args.fp8_weight_cache,
        fp8_mtp=args.fp8_mtp,
        fp8_lm_head=args.fp8_lm_head,
        reduce_each_micro_batch=reduce_each,
        optimizer=args.optimizer,
        offload=args.offload,
        host_gib=args.host_memory,
        gpus_per_node=args.gpus_per_node,
        sequence_parallel=layout.get("sequence_parallel", True) and not args.no_sequence_parallel,
        packed=not args.no_packing,
        bf16_layers=tuple(args.bf16_layers),
        moe_imbalance=args.moe_imbalance,
        gpu_gib=args.gpu_gib,
        model_name=args.model,
        layout_name=layout_name,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="k_exaone_236b",
        help="preset (k_exaone_236b, tiny) or recipes/model name",
    )
    p.add_argument(
        "--layout", help="a recipes/parallel/<name>.yaml (flags given explicitly override it)"
    )
    p.add_argument(
        "--all-published",
        action="store_true",
        help="summarise the K-EXAONE layouts (recipes/parallel/k_exaone_236b_*)",
    )
    p.add_argument(
        "--experiment",
        metavar="NAME",
        help="summarise every curriculum stage of recipes/experiment/NAME.yaml with its own layout",
    )
    for name in ("tp", "pp", "ep", "etp", "dp", "cp", "vpp"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--world-size", type=int, help="derive dp from it when --dp is not given")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--recompute", choices=("full", "selective", "none"))
    p.add_argument(
        "--recompute-modules",
        default="attention",
        help="selective: comma list of attention,mlp,moe",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp")
    group.add_argument("--zero1", dest="sharding", action="store_const", const="zero1")
    group.add_argument("--no-sharding", dest="sharding", action="store_const", const="none")
    p.add_argument(
        "--keep-gathered",
        action="store_true",
        help="fsdp: keep gathered parameters from forward to backward "
        "(parallel.reshard_after_forward=false)",
    )
    p.add_argument(
        "--reduce-each-micro-batch",
        action="store_true",
        help="fsdp: gradients reduce-scattered in every micro-batch's backward (parallel."
        "reduce_grads_each_micro_batch, or one micro-batch per step)",
    )
    p.add_argument(
        "--fp8-weight-cache",
        action="store_true",
        help="fp8: FP8 weight copies kept through the step (precision.fp8_weight_cache)",
    )
    p.add_argument(
        "--fp8-mtp", action="store_true", help="fp8: the MTP layer in FP8 too (precision.fp8_mtp)"
    )
    p.add_argument(
        "--fp8-lm-head",
        action="store_true",
        help="fp8: the output head's logits and input gradient in FP8 (precision.fp8_lm_head)",
    )
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument(
        "--offload",
        choices=("none", "cpu"),
        default="none",
        help="optim.offload: cpu keeps the AdamW groups' masters and moments in host memory",
    )
    p.add_argument(
        "--host-memory",
        type=float,
        default=1024.0,
        metavar="GIB",
        help="host memory per node to fit with --offload cpu (GiB; default 1 TiB)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument(
        "--no-packing", action="store_true", help="one document per sequence (no global-layer mask)"
    )
    p.add_argument(
        "--bf16-layers",
        type=int,
        nargs=2,
        default=(1, 1),
        metavar=("FIRST", "LAST"),
        help="fp8: decoder layers kept in bf16 at each end",
    )
    p.add_argument(
        "--moe-imbalance", type=float, default=1.0, help="max/mean routed tokens per EP rank"
    )
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to fit (GiB)")
    return p


def experiment_plans(
    name: str, world_size: int | None = None, gpu_gib: float = 80.0, host_gib: float = 1024.0
) -> list[Plan]:
    """One plan per curriculum stage of the experiment recipe `name`
    (recipes/experiment/<name>.yaml): the stage's layout and sequence length with the recipe's
    micro-batch, precision, optimizer, recompute and FSDP settings, on `world_size` GPUs (default:
    the recipe's layout with its dp)."""
    from megatron_exaone.config.load import load_config  # composes the Hydra recipe
    from megatron_exaone.precision import is_fp8
    from megatron_exaone.training.plan import validate

    cfg = load_config([f"experiment={name}"])
    p = cfg.parallel
    world = world_size or p.tp * p.cp * p.pp * (p.dp or 1)
    checked = validate(cfg, world)
    precision = cfg.precision
    plans = []
    for stage, layout in zip(cfg.curriculum.stages, checked.stage_parallel):
        inp = PlanInput(
            model=checked.model,
            dims=ParallelDims.of(layout),
            seq_len=stage.seq_len,
            micro_batch=cfg.trainer.micro_batch_size,
            precision="fp8" if is_fp8(precision) else "bf16",
            recompute=layout.recompute,
            recompute_modules=tuple(layout.recompute_modules),
            sharding="fsdp" if layout.fsdp else "none",
            keep_gathered=not layout.reshard_after_forward,
            reduce_each_micro_batch=layout.reduce_grads_each_micro_batch,
            fp8_weight_cache=precision.fp8_weight_cache,
            fp8_mtp=precision.fp8_mtp,
            fp8_lm_head=precision.fp8_lm_head,
            optimizer=cfg.optim.name,
            offload=cfg.optim.offload,
            host_gib=host_gib,
            sequence_parallel=layout.sequence_parallel,
            bf16_layers=(precision.keep_bf16_first_layers, precision.keep_bf16_last_layers),
            gpu_gib=gpu_gib,
            model_name=name,
            layout_name=f"{stage.name} ({_tokens(stage.seq_len)})",
        )
        plans.append(plan(inp))
    return plans


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


SUMMARY_HEADER = (
    f"{'layout':<30}{'GPUs':>5}  {'parallel':<22}{'prec':<6}{'optim':<11}{'GiB/GPU':>8}  "
    f"{'host GiB/node':>13}  {'fits':<5}{'FLOPs/token':>11}"
)


def summary_row(p: Plan) -> str:
    d, w = p.inp.dims, p.worst
    layout = (
        f"tp{d.tp} pp{d.pp} ep{d.ep}"
        + (f" cp{d.cp}" if d.cp > 1 else "")
        + f" dp{d.dp}"
        + (f" vpp{d.vpp}" if d.vpp > 1 else "")
    )
    optimizer = p.inp.optimizer + ("+cpu" if p.inp.offload == "cpu" else "")
    host = f"{p.host_per_node / GIB:.0f}" if p.inp.offload == "cpu" else "-"
    return (
        f"{p.inp.layout_name:<30}{d.world_size:>5}  "
        f"{layout:<22}{p.inp.precision:<6}{optimizer:<11}{w.peak / GIB:>8.1f}  "
        f"{host:>13}  {'yes' if p.fits else 'NO':<5}{p.flops_per_token:>11.3e}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.experiment:
            from megatron_exaone.config.schema import RecipeError

            try:
                plans = experiment_plans(
                    args.experiment, args.world_size, args.gpu_gib, args.host_memory
                )
            except RecipeError as exc:
                print(f"invalid recipe: {exc}", file=sys.stderr)
                return 2
            print(SUMMARY_HEADER.replace("layout  ", "stage   "))
            for result in plans:
                print(summary_row(result))
            print(
                f"(experiment {args.experiment}: each stage's layout, sequence length and "
                "settings; worst pipeline rank)"
            )
            return 0 if all(result.fits for result in plans) else 1
        if args.all_published:
            print(SUMMARY_HEADER)
            for name in published_layouts():
                for precision in ("bf16", "fp8"):
                    for optimizer, offload in OPTIMIZER_ROWS:
                        inp = dataclasses.replace(
                            build_input(args, load_layout(name), name, precision),
                            optimizer=optimizer,
                            offload=offload,
                        )
                        print(summary_row(plan(inp)))
            print(
                f"(seq {args.seq_len}, micro-batch {args.micro_batch}; worst pipeline rank; "
                "details: --layout NAME)"
            )
            return 0
        layout = load_layout(args.layout) if args.layout else None
        result = plan(build_input(args, layout, args.layout or ""))
    except LayoutError as exc:
        print(f"invalid layout: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
