"""ChatFlow: continued multilingual LLM training with a dynamic data-mixture schedule."""

__version__ = "0.1.0"
