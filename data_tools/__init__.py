"""Data tools: preprocessing to Megatron .bin/.idx, tokenizers, inspection, the bundled corpus."""
