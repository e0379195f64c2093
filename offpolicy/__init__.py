"""offpolicy: off-policy reinforcement fine-tuning of language models.

Imports stay lazy: `import offpolicy` must not pull in torch or transformers,
so the CLI starts fast.
"""

__version__ = "0.1.0"
