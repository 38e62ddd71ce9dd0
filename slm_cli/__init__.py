"""slm: selective language-model pretraining (CLM, RHO-1 SLM, ESLM, n-gram targets)."""

__version__ = "0.1.0"
