"""`zen-eco serve`: an OpenAI- and Ollama-compatible HTTP server over the continuous-batching scheduler."""
