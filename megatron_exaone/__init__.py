"""megatron-exaone: Megatron-style pretraining for the EXAONE-MoE architecture."""
