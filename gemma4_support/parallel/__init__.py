"""Context parallelism: the load-balanced row planner (`cp_plan`) and CP attention (`cp_attention`)."""
from gemma4_support.parallel.cp_attention import (
    ContextParallelAttend,
    CPLayerMasks,
    CPMasks,
    FullRowRotary,
    allreduce_grads,
    context_parallel,
    cp_forward,
    gather_sequence,
)
from gemma4_support.parallel.cp_plan import CPMaskKey, CPPlan, attention_work, cp_chunk_mask, plan_cp, prepare_cp_masks

__all__ = [
    "CPLayerMasks", "CPMaskKey", "CPMasks", "CPPlan", "ContextParallelAttend", "FullRowRotary", "allreduce_grads",
    "attention_work", "context_parallel", "cp_chunk_mask", "cp_forward", "gather_sequence", "plan_cp",
    "prepare_cp_masks",
]
