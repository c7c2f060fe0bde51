"""Tokenizers of perception outputs. Not the text tokenizer: in this package that one is `text_tokenizer`."""
