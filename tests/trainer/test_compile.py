"""Regional torch.compile of the decoder layers (fast_paths.compile_layers, training.performance.compile: on)
computes the same loss and LoRA gradients as eager mode, under PEFT, non-reentrant
gradient checkpointing and packed rows whose length changes between batches."""

from __future__ import annotations

import copy

import pytest
import torch

from kubetune.trainer import fast_paths

pytestmark = pytest.mark.trainer


def _lora_model(base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # off its zero init, so that the adapter takes part in the check
            torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def test_compiled_layers_match_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    eager, compiled = _lora_model(base), _lora_model(base)
    assert fast_paths.compile_layers(compiled) == 2 and len(fast_paths.decoder_layers(eager)) == 2
    for n in (48, 72):  # a packed row of two samples; the second length makes dynamo go dynamic
        ids = torch.randint(0, 256, (1, n))
        pos = torch.cat([torch.arange(n // 3), torch.arange(n - n // 3)]).unsqueeze(0)
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids, position_ids=pos).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (eager, compiled)]
        assert len(grads[0]) == 2 * 4 * 2 and all(g is not None for g in grads[1])
        for ge, gc in zip(*grads):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
