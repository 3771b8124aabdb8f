"""Embedders: stages that turn a clip into a vector (`stages.base.Embedding`) for later steps and the outbox."""
