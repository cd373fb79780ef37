"""Caprese in one screen, on a tiny random-weight Llama built from a config (no download).

Shows the three model states from the same weights (teacher, GRIFFIN alone, Caprese), the
fact that an untrained Caprese path (R = 0) is exactly GRIFFIN, and an adapter round trip.
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import caprese

config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, pad_token_id=0)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config).eval()
prompt = torch.randint(3, 256, (2, 24))
settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0,
                attention_mask=torch.ones_like(prompt))

with torch.no_grad():
    dense = model.generate(prompt, **settings)
    caprese.attach(model, caprese.CapreseConfig(method="griffin", density=0.5, rank=16))
    untrained = model.generate(prompt, **settings)
    with caprese.teacher(model):
        teacher = model.generate(prompt, **settings)
    # A stand-in for distillation: give R random values so the path does something.
    for block in caprese.blocks(model).values():
        block.R.normal_(std=0.05)
    adapted = model.generate(prompt, **settings)

print("layers with GRIFFIN + Caprese:", sorted(caprese.blocks(model)))
print("teacher == original dense model:", torch.equal(teacher, dense))
print("generated tokens, sample 0")
print("  dense   :", dense[0, 24:].tolist())
print("  GRIFFIN :", untrained[0, 24:].tolist(), "(Caprese with R = 0)")
print("  Caprese :", adapted[0, 24:].tolist(), "(random R, not distilled)")

with tempfile.TemporaryDirectory() as directory:
    caprese.save(model, directory)
    fresh = transformers.AutoModelForCausalLM.from_config(config).eval()
    fresh.load_state_dict(caprese.detach(model).state_dict())
    caprese.load(fresh, directory)
    with torch.no_grad():
        reloaded = fresh.generate(prompt, **settings)
    print("adapter saved and reloaded, same tokens:", torch.equal(reloaded, adapted))
