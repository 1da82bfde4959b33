"""Load one MoE layer of a Hugging Face checkpoint directory and run it under jax.jit.

    python examples/load_layer.py /path/to/checkpoint --layer 3 [--family deepseek_v3] [--tokens 8] [--stack-shared]

The directory holds config.json and *.safetensors (bf16 or fp32; fp8 block-scaled or mxfp4
experts load quantized) of a Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 or gpt-oss checkpoint. Prints the output's shape, dtype and norm, and
how many tokens each expert received.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxmoe
from jaxmoe.models import FAMILIES, load_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint directory (config.json and *.safetensors)")
    parser.add_argument("--layer", type=int, required=True, help="decoder layer index")
    parser.add_argument("--family", choices=FAMILIES, default=None, help="default: from config.json")
    parser.add_argument("--tokens", type=int, default=8, help="random tokens to run")
    parser.add_argument("--implementation", default=None, help="triton | reference (default: best available)")
    parser.add_argument("--stack-shared", action="store_true",
                        help="shared experts stacked after the routed ones, in the routed launches")
    args = parser.parse_args()

    params, routing = load_layer(args.path, args.family, layer=args.layer, stack_shared=args.stack_shared)
    hidden = params["router"].shape[0]
    # activations in the router's dtype: the experts' own, or bf16 beside quantized experts
    x = jax.random.normal(jax.random.key(0), (args.tokens, hidden), jnp.float32).astype(params["router"].dtype)

    # The bias is an array: pass it as an argument so it is not baked into the program.
    bias = routing.pop("correction_bias")
    run = jax.jit(lambda p, x, b: jaxmoe.moe_layer(p, x, **routing, correction_bias=b,
                                                   implementation=args.implementation, return_routing=True))
    y, info = run(params, x, bias)
    experts = params["router"].shape[1]  # routed experts (stacked shared ones follow them in w1)
    counts = np.bincount(np.asarray(info["topk_ids"]).ravel(), minlength=experts)
    shared = "beside" if "shared" in params else f"{routing['shared_experts']} stacked"
    print(f"experts={experts} top_k={routing['top_k']} shared={shared}")
    print(f"y: shape={tuple(y.shape)} dtype={y.dtype} norm={float(jnp.linalg.norm(y.astype(jnp.float32))):.6g}")
    print(f"tokens per expert: {counts.tolist()}")


if __name__ == "__main__":
    main()
