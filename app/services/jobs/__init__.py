"""The job engine: one service over three interfaces, each with an in-process and a scaled
implementation side by side (see interfaces.py)."""
