"""Emotion vectors: the bank file format, interop with other formats, inspection."""
