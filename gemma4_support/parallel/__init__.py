"""Context parallelism: the load-balanced row planner (`cp_plan`) and the CP attention backend (`cp_attention`)."""
from gemma4_support.parallel.cp_attention import (
    ContextParallelBackend,
    CPLayerMasks,
    CPMasks,
    allreduce_grads,
    cp_forward,
    gather_sequence,
)
from gemma4_support.parallel.cp_plan import CPMaskKey, CPPlan, attention_work, plan_cp

__all__ = [
    "CPLayerMasks", "CPMaskKey", "CPMasks", "CPPlan", "ContextParallelBackend", "allreduce_grads", "attention_work",
    "cp_forward", "gather_sequence", "plan_cp",
]
