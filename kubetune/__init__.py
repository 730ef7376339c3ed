"""kubetune: one FineTuneJob from data validation to a served, fine-tuned model."""

__version__ = "0.1.0"
