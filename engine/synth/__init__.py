"""LLM data synthesis behind one interface: template, hf (Ray Data), http (OpenAI API), vllm.

Example:
    >>> from engine.synth import SynthConfig, make_request, make_synthesizer
    >>> synth = make_synthesizer(SynthConfig(backend="template"), cache_dir=None)
    >>> synth.generate([make_request("simplify_insight", template="Cats nap.", insight="Cats nap often.")])
    ['Cats nap.']
"""

from engine.synth.backend import Backend, make_backend
from engine.synth.errors import SynthError
from engine.synth.config import SynthConfig, synth_config_from_dict
from engine.synth.request import KINDS, SynthRequest, make_request, read_requests, write_requests
from engine.synth.synthesizer import Synthesizer, make_synthesizer, run_synth
from engine.synth.validate import Paragraph, format_paragraph, parse_paragraph, split_lines

__all__ = [
    "KINDS",
    "Backend",
    "Paragraph",
    "SynthConfig",
    "SynthError",
    "SynthRequest",
    "Synthesizer",
    "format_paragraph",
    "make_backend",
    "make_request",
    "make_synthesizer",
    "parse_paragraph",
    "read_requests",
    "run_synth",
    "split_lines",
    "synth_config_from_dict",
    "write_requests",
]
