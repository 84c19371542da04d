"""The Transformer Engine FP8 backend (megatron_exaone.precision.fp8_te).

Without TE: the recipe mapping (as data, and built against a stand-in recipe module), the
configuration errors, which modules are converted, and the module swap itself, with a small stand-in
for `transformer_engine.pytorch` whose modules compute what TE documents (te.Linear: x @ W.T;
GroupedLinear: per-split GEMMs reading its `weight{i}` attributes at call time;
Fp8Padding/Unpadding; DotProductAttention: inclusive (left, right) windows, bshd causal and thd
padding_causal with cu_seqlens). The stand-in checks our wiring (names, views, gradients, hooks,
autocast placement), not TE's kernels. Tests marked `te` need the real TE (and a GPU where they run
it).
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_exaone.config.schema import PrecisionConfig
from megatron_exaone.model import ExaoneMoeForCausalLM, build_model, tiny
from megatron_exaone.model.attention import _block_mask, attention_mask, document_ids
from megatron_exaone.model.moe import GroupedExperts
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.sharding import materialize
from megatron_exaone.precision import PrecisionReport, fp8_te
from megatron_exaone.precision.apply import fp8_candidates
from megatron_exaone.precision.fp8_te import (
    TEGroupedExperts,
    TEUnavailable,
    apply_te,
    build_recipe,
    fp8_context,
    packed_cu_seqlens,
    recipe_spec,
    te_window_size,
)

SEED = 4


def precision(name: str, **kw) -> PrecisionConfig:
    return PrecisionConfig(name=name, **kw)


# ---------------------------------------------------------------------------------- recipes as data
@pytest.mark.parametrize(
    "name,cls,fmt,options",
    [
        (
            "fp8_te_delayed",
            "DelayedScaling",
            "HYBRID",
            {
                "margin": 0,
                "amax_history_len": 1024,
                "amax_compute_algo": "max",
                "reduce_amax": True,
            },
        ),
        ("fp8_te_tensorwise", "Float8CurrentScaling", "HYBRID", {}),
        (
            "fp8_te_blockwise",
            "Float8BlockScaling",
            "HYBRID",
            {"x_block_scaling_dim": 1, "w_block_scaling_dim": 2, "grad_block_scaling_dim": 1},
        ),
        ("fp8_te_mxfp8", "MXFP8BlockScaling", "HYBRID", {}),
    ],
)
def test_recipe_spec_names_the_te_class_and_arguments(name, cls, fmt, options):
    spec = recipe_spec(precision(name))
    assert (spec.recipe_class, spec.fp8_format, dict(spec.options)) == (cls, fmt, options)


def test_recipe_spec_follows_the_config_fields():
    spec = recipe_spec(
        precision(
            "fp8_te_delayed",
            fp8_format="e4m3",
            amax_history_len=16,
            amax_compute_algo="most_recent",
        )
    )
    assert spec.kwargs() == {
        "fp8_format": "E4M3",
        "margin": 0,
        "amax_history_len": 16,
        "amax_compute_algo": "most_recent",
        "reduce_amax": True,
    }
    assert recipe_spec(precision("fp8_te_blockwise", fp8_format="e4m3")).fp8_format == "E4M3"
    # the trainer hands the builder a PrecisionConfig: it carries the same recipe fields
    cfg = precision("fp8_te_delayed", amax_history_len=16, amax_compute_algo="most_recent")
    assert recipe_spec(cfg) == recipe_spec(cfg)
    # per-expert split padding and weight alignment (TE: 16 rows, 32 for MXFP8; blocks of 128 for
    # blockwise)
    assert [recipe_spec(precision(n)).split_align for n in fp8_te.TE_PRECISIONS] == [16, 16, 16, 32]
    assert [recipe_spec(precision(n)).weight_align for n in fp8_te.TE_PRECISIONS] == [
        16,
        16,
        128,
        32,
    ]


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp8_torch", "fp8_emulated"])
def test_recipe_spec_rejects_other_precisions(name):
    with pytest.raises(ValueError, match="not a Transformer Engine precision"):
        recipe_spec(precision(name))


class _Recorded:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _fake_recipe_module():
    import enum

    names = {cls: type(cls, (_Recorded,), {}) for cls in fp8_te.RECIPE_CLASSES.values()}
    return types.SimpleNamespace(Format=enum.Enum("Format", "E4M3 E5M2 HYBRID"), **names)


@pytest.mark.parametrize("name", list(fp8_te.TE_PRECISIONS))
def test_build_recipe_constructs_the_class_with_format_enum(name):
    module = _fake_recipe_module()
    recipe = build_recipe(precision(name), recipe_module=module)
    spec = recipe_spec(precision(name))
    assert type(recipe).__name__ == spec.recipe_class
    assert recipe.kwargs == {**dict(spec.options), "fp8_format": module.Format.HYBRID}


# --------------------------------------------------------------------------------------- without TE
@pytest.fixture
def no_te(monkeypatch):
    """Make `import transformer_engine...` fail here, whether or not TE is installed."""
    for mod in (
        "transformer_engine",
        "transformer_engine.pytorch",
        "transformer_engine.common",
        "transformer_engine.common.recipe",
    ):
        monkeypatch.setitem(sys.modules, mod, None)


def test_module_imports_without_te():
    import subprocess

    code = (
        "import sys; sys.modules['transformer_engine'] = None; "
        "import megatron_exaone.precision.fp8_te as m; assert not m.te_available(); "
        "assert 'transformer_engine.pytorch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_te_is_a_configuration_error_naming_the_fix(no_te):
    with pytest.raises(
        TEUnavailable,
        match=r"pip install --no-build-isolation 'transformer_engine\[pytorch\]>=2.10'"
        r".*CUDA machine",
    ):
        fp8_context(precision("fp8_te_tensorwise"))
    with pytest.raises(
        TEUnavailable, match="precision=fp8_te_blockwise needs NVIDIA Transformer Engine"
    ):
        with torch.device("meta"):
            model = ExaoneMoeForCausalLM(tiny())
        apply_te(model, precision("fp8_te_blockwise"))
    with pytest.raises(TEUnavailable, match="FP8 recipe 'delayed'"):
        fp8_te._RECIPES.clear()
        build_recipe(precision("fp8_te_delayed"))
    assert isinstance(TEUnavailable("x"), ValueError)


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp8_emulated"])
def test_fp8_context_is_a_no_op_for_other_precisions(no_te, name):
    assert isinstance(fp8_context(precision(name), group=None), contextlib.nullcontext)


# ------------------------------------------------------------------------------------ what converts
def meta_model(**overrides) -> ExaoneMoeForCausalLM:
    with torch.device("meta"):
        return ExaoneMoeForCausalLM(tiny(**overrides))


def test_plan_keeps_first_last_router_head_embedding_and_mtp_in_bf16():
    model = meta_model()  # 4 layers: 0 dense, 1-3 MoE; one MTP layer
    cfg = precision("fp8_te_tensorwise", keep_bf16_first_layers=1, keep_bf16_last_layers=1)
    plan = {c.name: c for c in fp8_candidates(model, cfg, 4, align=16)}
    converted = sorted(n for n, c in plan.items() if not c.reason)
    assert converted == sorted(
        f"model.layers.{i}.{m}"
        for i in (1, 2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.experts",
            "mlp.shared_experts.gate_proj",
            "mlp.shared_experts.up_proj",
            "mlp.shared_experts.down_proj",
        )
    )
    for layer in ("model.layers.0", "model.layers.3"):
        assert "keep_bf16_first/last_layers" in plan[layer].reason
    assert "fp8_mtp=False" in plan["mtp"].reason and "fp8_lm_head=False" in plan["lm_head"].reason
    assert not any(n.endswith(("mlp.gate", "embed_tokens")) or "norm" in n for n in plan)


def test_plan_with_fp8_mtp_and_no_bf16_layers_converts_every_projection():
    model = meta_model()
    cfg = precision(
        "fp8_te_tensorwise", keep_bf16_first_layers=0, keep_bf16_last_layers=0, fp8_mtp=True
    )
    plan = fp8_candidates(model, cfg, 4, align=16)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    experts = [n for n, m in model.named_modules() if isinstance(m, GroupedExperts)]
    assert sorted(c.name for c in plan if not c.reason) == sorted(linears + experts)


def test_plan_keeps_misaligned_weights_in_bf16_with_the_reason():
    model = meta_model()  # hidden 64, kv 2 x 16 = 32, moe_intermediate 32: not multiples of 128
    cfg = precision("fp8_te_blockwise", keep_bf16_first_layers=0, keep_bf16_last_layers=0)
    plan = fp8_candidates(model, cfg, 4, align=recipe_spec(cfg).weight_align)
    assert all(c.reason for c in plan)
    reason = {c.name: c.reason for c in plan}["model.layers.1.self_attn.k_proj"]
    assert "(32, 64)" in reason and "multiple of 128" in reason
    with pytest.raises(ValueError, match="cannot run FP8 GEMMs with recipe 'blockwise'"):
        apply_te(model, cfg, te=FakeTE(), strict=True)


# -------------------------------------------------------------------------------------- TE stand-in
class FakeLinear(nn.Module):
    """te.Linear's documented surface: keyword args, Parameter `weight` [out, in], an absent bias
    stored as a plain empty tensor on the construction device, `fp8_meta` and extra state."""

    def __init__(
        self,
        in_features,
        out_features,
        *,
        bias=True,
        params_dtype=None,
        parallel_mode=None,
        device="cuda",
        **kwargs,
    ):
        super().__init__()
        assert parallel_mode is None and not bias and not kwargs
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=params_dtype, device=device)
        )
        self.bias = torch.Tensor().to(dtype=params_dtype, device=device)
        self.fp8_meta = {}
        self.extra = torch.empty(0, dtype=torch.uint8)

    def forward(self, x):
        assert self.bias.device == x.device  # moved off meta before the first forward
        return F.linear(x, self.weight)

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


class FakeGroupedLinear(nn.Module):
    def __init__(
        self,
        num_gemms,
        in_features,
        out_features,
        *,
        bias=True,
        params_dtype=None,
        parallel_mode=None,
        device="cuda",
    ):
        super().__init__()
        assert parallel_mode is None and not bias
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            self.register_parameter(
                f"weight{i}",
                nn.Parameter(
                    torch.empty(out_features, in_features, dtype=params_dtype, device=device)
                ),
            )
            setattr(self, f"bias{i}", torch.Tensor().to(dtype=params_dtype, device=device))
        self.fp8_meta = {}

    def forward(self, inp, m_splits):
        assert isinstance(m_splits, list) and sum(m_splits) == inp.shape[0]
        # as TE 2.20's _get_weight_tensors
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        chunks = torch.split(inp, m_splits)
        return torch.cat([c @ w.T for c, w in zip(chunks, weights)])

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        assert state.numel() == 0


class FakePadding(nn.Module):
    def __init__(self, num_gemms, align_size=None):
        super().__init__()
        self.align = align_size

    def forward(self, inp, m_splits):
        padded = [-(-m // self.align) * self.align for m in m_splits]
        parts = [
            torch.cat([c, c.new_zeros(p - m, c.shape[1])])
            for c, m, p in zip(torch.split(inp, m_splits), m_splits, padded)
        ]
        return torch.cat(parts), padded


class FakeUnpadding(FakePadding):
    def forward(self, inp, m_splits):
        padded = [-(-m // self.align) * self.align for m in m_splits]
        return torch.cat([c[:m] for c, m in zip(torch.split(inp, padded), m_splits)])


class FakeDPA(nn.Module):
    """DotProductAttention semantics from the reference: window (left, right) inclusive, -1
    unbounded."""

    def __init__(
        self,
        num_attention_heads,
        kv_channels,
        num_gqa_groups=None,
        attention_dropout=0.0,
        qkv_format="sbhd",
        attn_mask_type="causal",
        window_size=None,
        softmax_scale=None,
    ):
        super().__init__()
        self.window = window_size
        self.scale = softmax_scale
        self.fp8_meta = {}

    def _allowed(self, q_pos, k_pos, same_doc):
        left, right = self.window
        ok = (k_pos[None, :] <= q_pos[:, None] + right) & same_doc
        if left >= 0:
            ok = ok & (k_pos[None, :] >= q_pos[:, None] - left)
        return ok

    def forward(
        self,
        q,
        k,
        v,
        qkv_format=None,
        attn_mask_type=None,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
        max_seqlen_q=None,
        max_seqlen_kv=None,
    ):
        if qkv_format == "bshd":
            assert attn_mask_type == "causal"
            seq = q.shape[1]
            pos = torch.arange(seq)
            mask = self._allowed(pos, pos, torch.ones(seq, seq, dtype=torch.bool))
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            return out.transpose(1, 2).flatten(2)
        assert (
            qkv_format == "thd"
            and attn_mask_type == "padding_causal"
            and cu_seqlens_q.dtype == torch.int32
        )
        assert cu_seqlens_q is cu_seqlens_kv and max_seqlen_q == max_seqlen_kv
        tokens = q.shape[0]
        doc = torch.repeat_interleave(
            torch.arange(len(cu_seqlens_q) - 1), cu_seqlens_q.diff().long()
        )
        assert int(cu_seqlens_q.diff().max()) <= max_seqlen_q
        mask = self._allowed(
            torch.arange(tokens), torch.arange(tokens), doc[:, None] == doc[None, :]
        )
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )
        return out.transpose(0, 1).flatten(1)


class FakeTE(types.SimpleNamespace):
    def __init__(self):
        entered = []

        @contextlib.contextmanager
        def autocast(enabled, recipe, amax_reduction_group):
            entered.append((enabled, recipe, amax_reduction_group))
            yield

        super().__init__(
            Linear=FakeLinear,
            GroupedLinear=FakeGroupedLinear,
            Fp8Padding=FakePadding,
            Fp8Unpadding=FakeUnpadding,
            DotProductAttention=FakeDPA,
            autocast=autocast,
            entered=entered,
        )


@pytest.fixture
def stub_recipe(monkeypatch):
    """build_recipe without TE: the stand-in recipe module."""
    module = _fake_recipe_module()
    monkeypatch.setattr(fp8_te, "import_te_recipes", lambda what="": module)
    fp8_te._RECIPES.clear()
    yield module
    fp8_te._RECIPES.clear()


# ----------------------------------------------------------------------------------------- the swap
def packed_batch(vocab):
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(1, vocab, (2, 32), generator=gen)
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(12)]), torch.arange(32)])
    return x, positions, shift_left(x, 1, -100)


def converted_model(config, te, **options):
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    cfg = precision(
        "fp8_te_tensorwise", keep_bf16_first_layers=0, keep_bf16_last_layers=0, **options
    )
    report = apply_te(model, cfg, amax_group="stage-group", te=te)
    materialize(model, config, SEED, "cpu")
    return model, report


@pytest.mark.parametrize("te_attention", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_converted_model_keeps_names_init_outputs_and_gradients(stub_recipe, te_attention, packed):
    config = tiny(vocab_size=128, sliding_window=4, aux_loss_coeff=0.01)
    ref = build_model(config, seed=SEED)
    te = FakeTE()
    model, report = converted_model(config, te, fp8_mtp=True, te_attention=te_attention)
    assert isinstance(report, PrecisionReport) and list(report.bf16) == ["lm_head"]
    assert dict(ref.named_parameters()).keys() == dict(model.named_parameters()).keys()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name  # layout-invariant init reaches the TE-held weights
    assert isinstance(model.model.layers[1].mlp.experts, TEGroupedExperts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeLinear)
    x, positions, labels = packed_batch(128)
    if not packed:
        positions = torch.arange(32).expand(2, 32)
    want, got = (m(x, labels=labels, position_ids=positions) for m in (ref, model))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # one autocast per forward, with the recipe and the amax group
    recipe = build_recipe(precision("fp8_te_tensorwise"))
    assert type(recipe) is stub_recipe.Float8CurrentScaling
    assert te.entered == [(True, recipe, "stage-group")]


@pytest.fixture
def grouped_splits(monkeypatch):
    """The m_splits of every FakeGroupedLinear call, in order."""
    seen = []
    original = FakeGroupedLinear.forward

    def spy(self, inp, m_splits):
        seen.append(list(m_splits))
        return original(self, inp, m_splits)

    monkeypatch.setattr(FakeGroupedLinear, "forward", spy)
    return seen


def test_expert_splits_are_padded_to_the_recipe_alignment(stub_recipe, grouped_splits):
    config = tiny(vocab_size=128)
    model, _ = converted_model(config, FakeTE())
    experts = model.model.layers[1].mlp.experts
    counts = torch.tensor([3, 0, 17, 1, 0, 0, 5, 2])
    x = torch.randn(int(counts.sum()), config.hidden_size)
    out = experts(x, counts)
    assert grouped_splits == [[16, 0, 32, 16, 0, 0, 16, 16]] * 3
    torch.testing.assert_close(out, GroupedExperts.forward(experts, x, counts))


def test_experts_with_no_routed_tokens_still_run_every_grouped_gemm(stub_recipe, grouped_splits):
    # DelayedScaling registers each TE module's amaxes on its first forward and all-reduces them by
    # position over the amax group, so a rank whose experts received no tokens must still call every
    # GroupedLinear.
    model, _ = converted_model(tiny(vocab_size=128), FakeTE())
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(0, 64, requires_grad=True)
    out = experts(x, torch.zeros(8, dtype=torch.long))
    out.sum().backward()
    assert grouped_splits == [[16, 0, 0, 0, 0, 0, 0, 0]] * 3
    assert out.shape == (0, 64) and x.grad.shape == (0, 64)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in experts.parameters())


def test_hooks_on_a_swapped_linear_are_kept(stub_recipe):
    model = meta_model()
    calls = []
    model.mtp.fc.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.mtp.fc.register_forward_hook(lambda m, args, out: calls.append("post"))
    apply_te(model, precision("fp8_te_tensorwise", fp8_mtp=True), te=FakeTE())
    fc = model.mtp.fc
    assert isinstance(fc, FakeLinear)
    fc.to_empty(device="cpu")
    fc(torch.randn(3, fc.weight.shape[1]))
    assert calls == ["pre", "post"]


def test_extra_state_round_trip(stub_recipe):
    model = meta_model()
    apply_te(
        model,
        precision("fp8_te_tensorwise", keep_bf16_first_layers=0, keep_bf16_last_layers=0),
        te=FakeTE(),
    )
    q = model.model.layers[1].self_attn.q_proj
    q.extra = torch.tensor([1, 2, 3], dtype=torch.uint8)
    state = fp8_te.te_extra_state(model)
    assert "model.layers.1.self_attn.q_proj._extra_state" in state
    assert "model.layers.1.mlp.experts.te_gate._extra_state" in state
    q.extra = torch.empty(0, dtype=torch.uint8)
    fp8_te.load_te_extra_state(model, state)
    assert q.extra.tolist() == [1, 2, 3]
    assert fp8_te.holds_te_modules(model.model.layers[1]) and not fp8_te.holds_te_modules(
        model.model.norm
    )


def _checkpoint_round_trip(rank, world, directory):
    from megatron_exaone.checkpoint import state as ckpt
    from megatron_exaone.parallel.mesh import ParallelDims, build_mesh

    fp8_te.import_te_recipes = lambda what="": _fake_recipe_module()  # forked rank: patch freely
    mesh = build_mesh(ParallelDims(), "cpu")
    model, _ = converted_model(tiny(vocab_size=128), FakeTE())
    q = model.model.layers[1].self_attn.q_proj
    q.extra = torch.tensor([7, 8, 9], dtype=torch.uint8)  # a DelayedScaling payload stands in
    ckpt.save(directory, 1, [model], None, mesh)
    q.extra = torch.empty(0, dtype=torch.uint8)
    ckpt.load(directory, [model], None, mesh)
    restored = q.extra.tolist()

    def refuse(state):  # TE >= 2.18 without NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1
        raise RuntimeError("Refusing to load pickled Transformer Engine extra state")

    q.set_extra_state = refuse
    ckpt.load(directory, [model], None, mesh)  # warns and goes on
    return restored


def test_checkpoints_keep_the_te_extra_state(tmp_path):
    """DelayedScaling's amax history (TE `_extra_state`) survives save and resume under the same
    layout."""
    from megatron_exaone.parallel.testing import run_distributed

    assert run_distributed(_checkpoint_round_trip, 1, str(tmp_path)) == [[7, 8, 9]]


def test_recompute_checkpoint_calls_te_checkpoint_non_reentrant():
    calls = []
    te = types.SimpleNamespace(checkpoint=lambda fn, *a, **kw: calls.append(kw) or fn(*a))
    assert fp8_te.recompute_checkpoint(lambda x: x + 1, 1, context_fn="ctx", te=te) == 2
    assert calls == [{"use_reentrant": False, "context_fn": "ctx"}]


# ------------------------------------------------------------------------------------- TE attention
def test_window_maps_to_te_inclusive_left_bound():
    assert te_window_size(128) == (127, 0)  # K-EXAONE: i - 128 < j <= i
    assert te_window_size(None) == (-1, 0)


def test_cu_seqlens_follow_the_document_boundaries_of_the_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    docs = document_ids(positions)
    for window in (None, 2, 3):
        # the boolean mask (CPU) and the FlexAttention BlockMask (what attention_mask gives on GPU)
        for mask in (attention_mask(positions, window), _block_mask(docs, window, 2, 8, "cpu")):
            cu = packed_cu_seqlens(mask, 2, 8)
            assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 16]
            flat = docs.reshape(-1) + torch.tensor([0, 10]).repeat_interleave(8)
            assert (
                cu.diff().tolist() == torch.unique_consecutive(flat, return_counts=True)[1].tolist()
            )
    unpacked = torch.arange(8).expand(2, 8)
    for mask in (attention_mask(unpacked, 3), _block_mask(None, 3, 2, 8, "cpu")):
        assert packed_cu_seqlens(mask, 2, 8) is None  # windowed but one document per row
    assert packed_cu_seqlens(None, 2, 8) is None


def _build_with_te_options(rank, world):
    from megatron_exaone.parallel.build import build_parallel_model
    from megatron_exaone.parallel.mesh import ParallelDims, build_mesh

    # forked rank: patch freely. apply_te refuses machines without CUDA before it builds anything.
    fp8_te.import_te_recipes = lambda what="": _fake_recipe_module()
    fp8_te.import_te = lambda what="": FakeTE()
    torch.cuda.is_available = lambda: True
    config = tiny(vocab_size=128, sliding_window=4)
    mesh = build_mesh(ParallelDims(), "cpu")
    found = []
    for te_attention, fp8_mtp in ((False, False), (True, True)):
        cfg = precision("fp8_te_tensorwise", te_attention=te_attention, fp8_mtp=fp8_mtp)
        model = build_parallel_model(config, mesh, SEED, "cpu", precision=cfg)
        found.append(
            (
                [type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn")],
                isinstance(model.mtp.fc, FakeLinear),
                isinstance(model.model.layers[0].self_attn.q_proj, FakeLinear),
            )
        )
    return found


def test_builder_applies_the_configured_te_options():
    from megatron_exaone.parallel.testing import run_distributed

    (found,) = run_distributed(_build_with_te_options, 1)
    layers = tiny().num_hidden_layers + 1  # and the MTP layer
    # layer 0 stays BF16: keep_bf16_first_layers=1
    assert found == [
        (["Attention"] * layers, False, False),
        (["TEAttention"] * layers, True, False),
    ]


# ------------------------------------------------------------------------------------------ layouts
def _tp2_ep2_rank(rank, world):
    import torch.distributed as dist

    from megatron_exaone.parallel.expert_parallel import apply_expert_parallel
    from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
    from megatron_exaone.parallel.sharding import layout_of
    from megatron_exaone.parallel.tensor_parallel import (
        apply_tensor_parallel,
        reduce_tp_partial_grads,
    )

    fp8_te.import_te_recipes = lambda what="": _fake_recipe_module()  # forked rank: patch freely
    config = tiny(vocab_size=128, sliding_window=4, aux_loss_coeff=0.01)
    mesh = build_mesh(ParallelDims(tp=2, ep=2), "cpu")
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    apply_tensor_parallel(model, mesh.tp_group, sequence_parallel=True)
    apply_expert_parallel(model, mesh.ep_group)
    te = FakeTE()
    cfg = precision(
        "fp8_te_tensorwise", keep_bf16_first_layers=0, keep_bf16_last_layers=0, te_attention=True
    )
    apply_te(model, cfg, mesh.tp_group, amax_group=mesh.tp_cp_dp_group, te=te)
    materialize(model, config, SEED, "cpu")
    experts = model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "TEExpertParallelExperts" and isinstance(
        experts, TEGroupedExperts
    )
    x, positions, labels = packed_batch(128)
    out = model(x, labels=labels, position_ids=positions, loss_normalizer=(labels != -100).sum())
    out.loss.backward()
    reduce_tp_partial_grads(model, mesh.tp_group)
    ref = build_model(config, seed=SEED)
    want = ref(x, labels=labels, position_ids=positions, loss_normalizer=(labels != -100).sum())
    want.loss.backward()
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        expected = layout_of(model, name, p).slice_of(ref_params[name].grad)
        worst = max(worst, (p.grad - expected).abs().max().item())
    assert len(te.entered) == 1 and te.entered[0][2] is mesh.tp_cp_dp_group
    dist.barrier()
    return abs(out.loss.item() - want.loss.item()), worst


def test_tp2_ep2_sp_with_te_modules_matches_the_single_process_model():
    from megatron_exaone.parallel.testing import run_distributed

    for loss_diff, grad_diff in run_distributed(_tp2_ep2_rank, 2):
        assert loss_diff < 1e-5 and grad_diff < 1e-5


# ------------------------------------------------------------------------------------------ real TE
def _real_te():
    try:
        return pytest.importorskip("transformer_engine.pytorch")
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - TE installed but not loadable here (no CUDA libraries, ...)
        pytest.skip(f"Transformer Engine does not load here: {exc}")


@pytest.mark.te
@pytest.mark.parametrize("name", list(fp8_te.TE_PRECISIONS))
def test_real_recipes_have_the_requested_fields(name):
    _real_te()
    fp8_te._RECIPES.clear()
    recipe = build_recipe(precision(name, fp8_format="e4m3"))
    spec = recipe_spec(precision(name, fp8_format="e4m3"))
    from transformer_engine.common.recipe import Format

    assert type(recipe).__name__ == spec.recipe_class and recipe.fp8_format == Format.E4M3
    for key, value in spec.options:
        assert getattr(recipe, key) == value


@dataclass
class _GpuCase:
    name: str
    tol: float


@pytest.mark.te
@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        _GpuCase("fp8_te_tensorwise", 0.15),
        _GpuCase("fp8_te_delayed", 0.15),
        _GpuCase("fp8_te_blockwise", 0.15),
    ],
    ids=lambda c: c.name,
)
def test_real_te_model_trains_close_to_bf16(case):
    """A small model whose every projection is a multiple of 128: converted with real TE modules
    (names kept), forward/backward on the GPU in FP8 close to the BF16 model; extra state
    readable."""
    te = _real_te()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if case.name == "fp8_te_blockwise" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("block scaling needs sm_90+")
    config = tiny(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        moe_intermediate_size=128,
        num_experts=8,
        sliding_window=16,
    )
    ref = build_model(config, seed=SEED).cuda().to(torch.bfloat16)
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    cfg = precision(case.name, keep_bf16_first_layers=0, keep_bf16_last_layers=1, te_attention=True)
    fp8_te._RECIPES.clear()
    report = apply_te(model, cfg)
    assert (
        report.fp8 and dict(model.named_parameters()).keys() == dict(ref.named_parameters()).keys()
    )
    materialize(model, config, SEED, "cuda")
    model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 512, (2, 256), generator=gen).cuda()
    positions = torch.cat([torch.arange(160), torch.arange(96)]).expand(2, 256).cuda()
    labels = shift_left(x, 1, -100)
    got = model(x, labels=labels, position_ids=positions)
    want = ref(x, labels=labels, position_ids=positions)
    assert abs(got.loss.item() - want.loss.item()) < case.tol * want.loss.item()
    got.loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )
    assert fp8_te.te_extra_state(model)
    del te
