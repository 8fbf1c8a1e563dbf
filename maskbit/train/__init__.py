"""Training of both MaskBit stages (tokenizer and generator) with the published recipe."""
