"""LoRA for the Megatron Gemma 4 model: adapters attached by the weight table's layout, exported for vLLM."""
from gemma4_support.lora.adapter import (ATTENTION_TARGETS, MLP_TARGETS, LoraAdapters, LoraConfig, LoraModule,
                                         attach_lora, detach_lora, lora_modules)
from gemma4_support.lora.export import import_peft_adapter, load_adapter, read_adapter, save_adapter, save_merged

__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "LoraAdapters", "LoraConfig", "LoraModule", "attach_lora", "detach_lora",
           "import_peft_adapter", "load_adapter", "lora_modules", "read_adapter", "save_adapter", "save_merged"]
