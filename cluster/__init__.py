"""The `baton` CLI, process launchers and discovery; glue only, no business logic."""
