"""Fine-tuning as an inventory transform: which modules peft wraps (`targets`), the LoRA
adapters added and the base frozen (`lora`), bitsandbytes 4-bit weights packed for QLoRA
(`qlora`)."""
