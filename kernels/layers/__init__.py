"""Building blocks shared by every architecture."""
