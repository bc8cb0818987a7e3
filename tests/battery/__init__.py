"""The issue 7 battery: API fuzzing, the authorization matrix and other cross-cutting checks."""
