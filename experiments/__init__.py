"""Experiments that check the pipeline from outside, built on dpo_pipeline (never imported by it): the known-answer
sentiment experiment (known_answer.py, notebooks/known_answer.ipynb)."""
