"""emotrain: fine-tune large speech and text encoders together for emotion recognition."""

__version__ = "0.1.0"
