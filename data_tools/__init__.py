"""Data preparation commands behind `exaone-data`: SuperBPE tokenizer training, tokenization into
Megatron `.bin/.idx` shards, and shard inspection. Formats and training-time data live in
`megatron_exaone.data`."""
