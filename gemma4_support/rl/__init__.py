"""RL tokenization from vLLM token ids: the data types (`trajectory`), the append-only collapse (`collapse`), and
SFT tokenization through the chat template (`sft`)."""
