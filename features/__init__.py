"""Polars-only data layer: event contract, ingestion, quarantine, examples (no torch here)."""
