"""Model interchange with other ecosystems (Hugging Face directories; GGUF in ``io.gguf``)."""

from .hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
