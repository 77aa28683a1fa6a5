"""HF <-> Megatron weight conversion for Gemma 4: one declarative table (`mapping.TABLE`) and lazy
safetensors reading/writing (`checkpoint`)."""
