"""A real torch export of the benchmark's shape, to check `bench` against what torch writes.

    python benches/export_llama.py OUT_DIR            (needs fixtures/gen/requirements.txt)
    target/release/bench --model OUT_DIR/model/model.onnx --adapter OUT_DIR/adapter

Builds a random-init LlamaForCausalLM with the performance issue's shape (hidden 1536,
12 layers, vocab 32000, intermediate 4096, untied embeddings; fp32, about 1.6 GB), exports it
with torch's dynamo exporter (external data, as torch writes it by default) with one input,
`input_ids` [1, 16], and saves a PEFT adapter with r 16, alpha 32 on all seven projection kinds
of every layer (84 modules), its B matrices set to small random values. CPU only; takes a few
minutes and about 8 GB of memory.
"""

import os
import sys
import time
import types

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SEQ = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(out):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        use_cache=False,
    )
    t = time.time()
    model = LlamaForCausalLM(cfg).eval()
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {time.time() - t:.1f}s", flush=True)

    # The graph takes input_ids only and returns logits.
    orig = type(model).forward

    def fwd(self, input_ids):
        return orig(self, input_ids=input_ids, use_cache=False).logits

    model.forward = types.MethodType(fwd, model)
    ids = torch.randint(3, cfg.vocab_size, (1, SEQ))
    path = os.path.join(out, "model", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = time.time()
    with torch.no_grad():
        torch.onnx.export(model, (ids,), path, dynamo=True, external_data=True,
                          input_names=["input_ids"], output_names=["logits"])
    print(f"exported {path} in {time.time() - t:.1f}s", flush=True)
    del model.forward

    cfg_lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    pm = get_peft_model(model, cfg_lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    pm.save_pretrained(os.path.join(out, "adapter"))
    readme = os.path.join(out, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    n = sum(1 for k, _ in pm.named_parameters() if "lora_A" in k)
    print(f"saved adapter with {n} modules to {os.path.join(out, 'adapter')}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
