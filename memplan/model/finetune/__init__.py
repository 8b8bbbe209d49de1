"""Fine-tuning as an inventory transform: peft LoRA adapters added and the base frozen (`lora`),
bitsandbytes 4-bit weights packed for QLoRA (`qlora`)."""
