"""Assembled models, each a class taking one config dataclass (`Class.Config`)."""
