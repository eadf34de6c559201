"""graphopt's built-in pass catalogue. Each pass is one module here, registered through the
``graphopt.passes`` entry-point group in pyproject.toml (user passes register the same way)."""
