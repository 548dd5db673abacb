"""Streaming HF checkpoint tools (fp8⇄bf16, resharding, MTP strip); never imports the model."""
