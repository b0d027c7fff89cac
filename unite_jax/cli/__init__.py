"""The command-line programs: unite-train, unite-encode, unite-eval, unite-convert (and their launch/*.py)."""
