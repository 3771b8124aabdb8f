"""Text steps (`type: TextGenerator`): chat completions over an OpenAI-compatible API, or a local causal LM."""
