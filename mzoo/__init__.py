"""mzoo: a model zoo on a Megatron-style parallel engine, with streaming checkpoint converters."""

__version__ = "0.1.0"
