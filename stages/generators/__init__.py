"""Generation stages on diffusers: one file per model family (see stages/registry.py for the names)."""
