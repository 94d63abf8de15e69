"""zen-eco: run, serve, evaluate and train the Zen-Eco family of small decoder LLMs."""

__version__ = "0.1.0"
