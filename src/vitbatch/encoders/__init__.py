"""Encoders bundled with vitbatch (used by `vitbatch bench`)."""
