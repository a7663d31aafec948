"""diffprune."""
