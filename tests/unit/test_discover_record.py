"""Recording with HF hooks: left padding, prompt encoding and the running statistics."""

import numpy as np
import pytest
import torch

from cna_vllm.discover.record import (
    ActivationStats,
    collect_stats,
    decoder_layers,
    down_proj_modules,
    encode,
    last_token_activations,
    left_padded,
    pad_token_id,
)
from cna_vllm.errors import CnaError

from .planted import CHAT_WORDS, DIMS, TRIGGER, planted_model, planted_tokenizer, token_sets


def test_left_padding_gives_each_prompt_its_unbatched_activations():
    model = planted_model("qwen2")
    pos, neg, _ = token_sets(n=4)
    prompts = pos + neg
    batched = torch.cat(list(last_token_activations(model, prompts, batch_size=8, progress=False)))
    single = torch.cat(list(last_token_activations(model, prompts, batch_size=1, progress=False)))
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_left_padded_masks_and_positions_by_hand():
    batch = left_padded([[5, 6, 7], [9]], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]  # the lone token sits at position 0


def test_activations_are_the_down_proj_input_at_the_last_token():
    model = planted_model()
    pos, neg, _ = token_sets(n=3)
    (acts,) = last_token_activations(model, pos, batch_size=8, progress=False)
    assert acts.shape == (3, DIMS["num_hidden_layers"], DIMS["intermediate_size"]) and acts.dtype == torch.float32
    mlp = model.model.layers[1].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1]))
    try:
        with torch.no_grad():
            for ids in pos:  # one prompt at a time, no padding: recompute act(gate(x)) * up(x) from the MLP input
                model(torch.tensor([ids]))
    finally:
        handle.remove()
    with torch.no_grad():
        want = torch.stack([mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) for x in seen])
    torch.testing.assert_close(acts[:, 1], want, rtol=1e-4, atol=1e-5)
    assert (acts[:, 1, 5] > 0).all()  # planted neuron (1, 5) reads the trigger dimension ...
    (quiet,) = last_token_activations(model, neg, progress=False)
    assert quiet[:, 1, 5].abs().max() == 0  # ... which is 0 without the trigger
    assert all(not m._forward_pre_hooks for m in down_proj_modules(model)), "hooks are removed afterwards"


def test_collect_stats_is_the_mean_and_variance_over_prompts():
    model = planted_model()
    pos, _, _ = token_sets(n=5)
    acts = torch.cat(list(last_token_activations(model, pos, batch_size=2, progress=False))).double()
    stats = collect_stats(model, pos, batch_size=2, progress=False)
    assert stats.n == 5
    np.testing.assert_allclose(stats.mean, acts.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(stats.var, acts.var(0).numpy(), atol=1e-6)
    one = ActivationStats()
    one.update(acts[:1])
    assert (one.var == 0).all()


def test_empty_prompts_and_hookless_models_are_refused():
    model = planted_model()
    with pytest.raises(CnaError, match="empty prompt"):
        next(last_token_activations(model, [[3, 4], []], progress=False))
    wrapper = torch.nn.Module()
    wrapper.model = torch.nn.Linear(2, 2)
    with pytest.raises(CnaError, match="no decoder layers"):
        down_proj_modules(wrapper)
    wrapper.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(CnaError, match="no mlp.down_proj"):
        down_proj_modules(wrapper)
    assert len(decoder_layers(model)) == DIMS["num_hidden_layers"]


def test_encode_with_and_without_the_chat_template():
    tok = planted_tokenizer()
    assert encode(tok, ["w3 trigger"], chat_template=False) == [[3, TRIGGER]]
    chat = encode(tok, ["w3 trigger"], chat_template=True)
    assert chat == [[CHAT_WORDS["<u>"], 3, TRIGGER, CHAT_WORDS["</u>"], CHAT_WORDS["<a>"]]]
    assert pad_token_id(tok) == tok.eos_token_id  # no pad token: EOS
    tok.chat_template = None
    with pytest.raises(CnaError, match="no chat template"):
        encode(tok, ["w3"], chat_template=True)
