"""The HuggingFace checkpoint layout: the tensor schema, safetensors reading and writing, sharded form.

Modules: `schema` (every HF tensor family: name ⇄ module parameter ⇄ split ⇄ FP8 ⇄ shape), `reader`
(header validation, CheckpointReader through the index, the dtype table), `stream` (bounded-memory
band reads and the header-first shard writer), `writer` (an in-memory state as a checkpoint
directory), `sharded` (the per-rank form written by `convert shard`), `values` (the NaN / infinity
checks the loader and the converters share).
"""
