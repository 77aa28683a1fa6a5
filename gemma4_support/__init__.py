"""gemma4-support: Gemma 4 on a Megatron-core RL stack, validated against HF transformers and vLLM."""
__version__ = "0.1.0"
