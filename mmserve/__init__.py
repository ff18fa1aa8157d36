"""mmserve: one frozen CLIP backbone, many small trained prompts, served over HTTP."""

__version__ = "0.1.0"
