"""Reference baselines: small task-specific models that show how hard a split is without a VLM."""

from perceptio.baselines.film_vqa import FilmBaselineConfig, FilmVQA, train_film_baseline

__all__ = ["FilmBaselineConfig", "FilmVQA", "train_film_baseline"]
