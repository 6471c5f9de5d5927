"""Hugging Face interop: `mapping` (pure name/shape/config mapping to and from
`NemotronHForCausalLM`) and `convert` (export, import, loading a checkpoint's model in one
process). The commands are `nemotron_train.commands.hf` and `nemotron_train.commands.score`."""
