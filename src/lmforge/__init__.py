"""lmforge: from raw text to your own language model and chatbot."""

__version__ = "0.1.0"
