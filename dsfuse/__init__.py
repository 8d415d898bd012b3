"""dsfuse: DeepSeek-style multimodal building blocks, as a command-line toolbox."""

__version__ = "0.1.0"
