"""Data tools: preprocessing to Megatron .bin/.idx, inspection, cache preparation, BPE training
and regenerating the bundled corpus. The library they use lives in `nemotron_train.data`."""
