"""Gemma 4 built from megatron-core building blocks (parallel linears, MLP, SequentialMLP, TransformerConfig).

Public entry points: `build.build_model`, `build.load_model`, `build.init_parallel_state`, `model.Gemma4Model`.
"""
