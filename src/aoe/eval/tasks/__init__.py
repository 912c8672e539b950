"""lm-evaluation-harness task configs that read local dataset copies (``aoe eval --data-dir``)."""
