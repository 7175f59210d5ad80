"""The bundled miniature: a seeded fictional world, its word-level tokenizer, and a tiny Llama
base model pretrained by the engine on a CPU (see DESIGN.md, "Embedded default").

Example:
    >>> world = build_world(seed=0)
    >>> sources = render_sources(world, Path("/tmp/mini"))   # MDQA / MuSiQue / SummHay files
    >>> model_dir = ensure_base_model(MiniatureSpec())       # pretrained once, then cached
"""

from .checks import format_table, retrieval_accuracy, summary
from .pretrain import MiniatureError, MiniatureSpec, ensure_base_model, sources_of, spec_hash
from .sources import SourceSizes, render_sources
from .tokenizer import build_tokenizer
from .world import World, build_world

__all__ = [
    "MiniatureError", "MiniatureSpec", "SourceSizes", "World", "build_tokenizer", "build_world",
    "ensure_base_model", "format_table", "render_sources", "retrieval_accuracy", "sources_of", "spec_hash",
    "summary",
]
