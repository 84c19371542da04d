"""`parallel.compile`: compiled decoder layers give the eager model's loss, gradients and routing counts (CPU
inductor, fp32), also under full activation checkpointing; names and state dicts are unchanged."""

import torch

from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.checkpointing import apply_activation_checkpointing
from megatron_exaone.parallel.compile import apply_compile


def _step(model, x, labels, positions):
    out = model(x, labels=labels, position_ids=positions, return_logits=False)
    out.loss.backward()
    return out.loss.detach()


def test_compiled_layers_match_eager_with_and_without_recompute():
    config = tiny(aux_loss_coeff=0.01)
    eager, compiled, recomputed = (build_model(config, seed=0) for _ in range(3))
    for model in (compiled, recomputed):
        assert apply_compile(model) == config.num_hidden_layers + config.num_nextn_predict_layers
    apply_activation_checkpointing(recomputed, "full")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (2, 48), generator=gen)
    positions = torch.cat([torch.arange(30), torch.arange(18)]).expand(2, -1)  # two packed documents
    labels = shift_left(x, 1, -100)
    want = _step(eager, x, labels, positions)
    for model in (compiled, recomputed):
        torch.testing.assert_close(_step(model, x, labels, positions), want, rtol=1e-6, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
        for a, b in zip(eager.modules(), model.modules()):
            if isinstance(a, MoEBlock):  # recompute must not count routed tokens twice
                torch.testing.assert_close(b.tokens_per_expert, a.tokens_per_expert, rtol=0, atol=0)
