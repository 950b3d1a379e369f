"""cola-ray."""
