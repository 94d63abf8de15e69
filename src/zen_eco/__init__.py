"""zen-eco: run, serve, evaluate and train the Zen-Eco family of small decoder LLMs.

    import zen_eco
    model = zen_eco.load()            # bundled SmolLM2-135M-Instruct; or a .gguf, an HF dir, a Hub id
    print(model.generate("Explain quantum computing", max_tokens=64).text)

Heavy modules (torch) load on first use, so `import zen_eco` and `zen-eco --help` stay instant.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "api", "ZenModel": "api", "GenerationResult": "api",
    "SamplingParams": "engine.sampling", "GenerationChunk": "engine.generate",
    "ModelConfig": "config", "preset": "config", "PRESETS": "config",
    "ZenError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "TokenizerError": "errors", "ContextLengthError": "errors", "SamplingError": "errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'zen_eco' has no attribute {name!r}")


__all__ = sorted(_LAZY)
