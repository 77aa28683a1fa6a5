"""Chat templates rendered outside transformers, exactly as transformers and vLLM render them."""
