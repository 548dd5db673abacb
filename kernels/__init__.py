"""FP8 block-quantized kernels (Triton) and their pure-torch twins; `ops` is the dispatch point."""
