"""Model code other than transformers': the tensors another stack's own model saves for
backward (`torchtitan`: torchtitan's Llama 3; `litgpt`: LitGPT's GPT; `megatron`:
Megatron-Core's GPTModel, local and Transformer Engine layer specs), in the vocabulary of
memplan.model.forward."""
