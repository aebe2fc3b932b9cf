"""Thin adapters that wire training loops to the core; no ZO math lives here."""
