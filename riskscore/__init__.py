"""riskscore: risk scoring with explanations for customs shipments and money flows."""

__version__ = "0.1.0"
