"""The shipped drafts (one folder each, with its model card), installed as ``dovetail_gguf.drafts``."""
