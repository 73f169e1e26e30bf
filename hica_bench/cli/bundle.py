"""placeholder: filled in by issue 34."""
