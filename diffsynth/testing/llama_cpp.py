"""Language models written as llama.cpp's converter writes them (GGUF), for the text-encoder loading tests.

Written from the format's definition, independently of the reader: llama.cpp's tensor names, Q8_0 matrices,
and (Llama-type models such as Mistral) each attention head's q/k rows interleaved for llama.cpp's rotary
kernel. Needs the `gguf` package (a test dependency).
"""
from __future__ import annotations

from pathlib import Path

import torch

# transformers' names -> llama.cpp's
LLAMA_CPP_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_name(key: str) -> str:
    layer, name = (f"blk.{key.split('.')[1]}.", key.split(".", 2)[2]) if key.startswith("layers.") else ("", key)
    return layer + LLAMA_CPP_NAMES[name.removesuffix(".weight")] + ".weight"


def write_llm_gguf(path: str | Path, model: torch.nn.Module, arch: str, interleave_head_dim: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """`model` (a transformers base model: `embed_tokens`, `layers.N.*`, `norm`) as a GGUF file: matrices in Q8_0,
    vectors in F32, plus an `output.weight` LM head. Returns {transformers key: the matrix as Q8_0 rounds it},
    rounded in the original row order (Q8_0 rounds each row on its own, so the interleaving does not change it)."""
    import gguf
    from gguf.quants import dequantize, quantize
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), arch=arch)
    rounded = {}
    for key, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if arr.ndim == 1:
            writer.add_tensor(llama_cpp_name(key), arr)
            continue
        rounded[key] = torch.from_numpy(dequantize(quantize(arr, q8), q8).reshape(arr.shape))
        if interleave_head_dim and key.endswith(("q_proj.weight", "k_proj.weight")):
            arr = arr.reshape(-1, 2, interleave_head_dim // 2, arr.shape[1]).swapaxes(1, 2).reshape(arr.shape)
        writer.add_tensor(llama_cpp_name(key), quantize(arr, q8), raw_dtype=q8)
    writer.add_tensor("output.weight", model.embed_tokens.weight.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return rounded
