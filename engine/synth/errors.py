"""The one error synthesis raises, in a module of its own: the backends and the synthesizer
raise it, and `engine.synth.backend` imports the backends, so it lives in neither."""


class SynthError(RuntimeError):
    """Synthesis could not produce what was asked (backend failure, or invalid with on_invalid=raise)."""
