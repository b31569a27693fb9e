"""Model back-ends: each supplies its stages, voices, languages and warm-up."""
