"""Model: every parameter and buffer by name, shape and dtype (`inventory`), from
whichever source the spec names (`sources`: config.json, a safetensors header, a parameter
count; `load`: the files, presets and the local Hugging Face cache), one file per architecture
family (`families`), the vocabulary of what a forward saves for backward (`forward`), other
stacks' model code (`stacks`: torchtitan's Llama 3 and Qwen3, LitGPT's GPT), the module
tree peft and bitsandbytes wrap (`module_tree`) and fine-tuning (`finetune`: LoRA, freezing,
QLoRA)."""
