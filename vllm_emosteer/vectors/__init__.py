"""Emotion vectors: the bank file, extraction, interop with other formats, inspection."""
