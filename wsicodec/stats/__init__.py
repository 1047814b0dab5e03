"""Storage-team statistics: what containers take, and what compressing slides would save."""
